import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run through Triton's interpreter. The switch is read when a
# kernel is defined, so it must be set before anything (transformers, peft, the tests) imports
# triton in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """fp32 aligned/unaligned tiny Llama (GQA, 9 shards) and task/safety adapters, built once."""
    from safemerge_ext.demo import build

    return build(tmp_path_factory.mktemp("fx") / "m", layers=3, dtype=torch.float32, seed=0)


@pytest.fixture(scope="session")
def fx_bf16(tmp_path_factory):
    """The same layout saved in bf16, as real checkpoints are."""
    from safemerge_ext.demo import build

    return build(tmp_path_factory.mktemp("fxbf16") / "m", layers=2, dtype=torch.bfloat16, seed=1)


@pytest.fixture
def matmul_precision_restored():
    """Puts torch's fp32 matmul precision back as a test found it: the legacy setting, then the
    per-backend ones (torch >= 2.9), whose "none" inherits the legacy one. (Restoring only one of
    them left "medium" behind for the next test, bf16 products on AMX CPUs.)"""
    per_backend = [m for m in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(m, "fp32_precision")]
    legacy, saved = torch.get_float32_matmul_precision(), [m.fp32_precision for m in per_backend]
    yield
    torch.set_float32_matmul_precision(legacy)
    for m, value in zip(per_backend, saved):
        m.fp32_precision = value


@pytest.fixture
def alias(tmp_path):
    """alias(folder) -> another path to the same folder, by a bind mount (as a case-insensitive
    file system gives one folder two spellings, Task and task): no string compare tells them apart.
    Skips where mounting is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    import subprocess

    mounted = []

    def make(folder) -> "os.PathLike":
        where = tmp_path / f"alias{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "--bind", str(folder), str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a bind mount is not permitted here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=True)
