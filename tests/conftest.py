import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """fp32 aligned/unaligned tiny Llama (GQA, 9 shards) and task/safety adapters, built once."""
    from safemerge_ext.demo import build

    return build(tmp_path_factory.mktemp("fx") / "m", layers=3, dtype=__import__("torch").float32, seed=0)


@pytest.fixture(scope="session")
def fx_bf16(tmp_path_factory):
    """The same layout saved in bf16, as real checkpoints are."""
    import torch

    from safemerge_ext.demo import build

    return build(tmp_path_factory.mktemp("fxbf16") / "m", layers=2, dtype=torch.bfloat16, seed=1)
