"""Greedy, batched chat generation for the models under evaluation (transformers, or vLLM when installed).

A model is ``DIR`` or ``DIR+ADAPTER`` (a PEFT LoRA folder, merged into the weights after loading so
generation runs at base-model speed). Prompts go through the tokenizer's chat template; batches are
left-padded and sorted by length so little compute is spent on padding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from safemerge_ext.errors import SafeMergeError, not_a_folder


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    adapter: str | None = None

    @property
    def label(self) -> str:
        return self.path + (f"+{self.adapter}" if self.adapter else "")


def _split(text: str, sep: str, ok) -> tuple[str, str]:
    """``text`` split at the first ``sep`` whose sides ``ok`` accepts (the whole text, unsplit, first),
    so folder names that contain ``=`` or ``+`` still work; else at the first ``sep``."""
    if ok(text, ""):
        return text, ""
    cuts = [i for i, c in enumerate(text) if c == sep]
    for i in cuts:
        if ok(text[:i], text[i + 1:]):
            return text[:i], text[i + 1:]
    return (text[:cuts[0]], text[cuts[0] + 1:]) if cuts else (text, "")


# The date every chat template is given: templates that read the clock (Llama 3.x: strftime_now, "Today Date:
# ...") would otherwise put the day of the run into the prompt, and greedy outputs would change with it.
# 26 Jul 2024 is the date Llama 3.1's own template falls back to.
CHAT_DATE = "26 Jul 2024"


def chat_prompt(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """``messages`` through the tokenizer's chat template, as text, with the fixed ``CHAT_DATE``. A
    template that renders only list-form content (``[{"type": "text", ...}]``, as llava-hf's
    vision-language templates do) dropped every prompt given as a string (review168): where the text
    lacks a message's words, the messages are given in that form."""
    def render(msgs: list[dict[str, Any]]) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       date_string=CHAT_DATE)

    def keeps(text: str) -> bool:  # (a template may trim a message)
        return all(m["content"].strip() in text for m in messages)

    text = render(messages)
    if keeps(text):
        return text
    try:
        other = render([{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages])
    except Exception:  # (a template that reads only strings: the string form stands)
        return text
    # (a template that prints its content whole shows the list itself: the string form stands)
    return other if keeps(other) and "'type': 'text'" not in other else text


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# files one of which a tokenizer folder has (fast tokenizers, SentencePiece, GPT-2 BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model weights (safetensors, sharded or not, or PyTorch .bin files)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def parse_model(text: str, adapter: str | None = None) -> ModelSpec:
    """``[NAME=]DIR[+ADAPTER]``; NAME defaults to the folder name (of the adapter when there is one).

    ``=`` and ``+`` may also appear in folder names: the split that names existing folders wins."""
    def is_spec(rest: str) -> bool:
        path, ad = _split(rest, "+", lambda a, b: Path(a).is_dir() and (not b or Path(b).is_dir()))
        return Path(path).is_dir() and (not ad or Path(ad).is_dir())

    if "=" in text and not is_spec(text):
        name, rest = _split(text, "=", lambda a, b: bool(b) and is_spec(b))
    else:
        name, rest = "", text
    path, ad = _split(rest, "+", lambda a, b: Path(a).is_dir() and (not b or Path(b).is_dir()))
    if not ad and path != rest:  # ("DIR+": an unset $ADAPTER would evaluate the model alone under the adapter's name)
        raise SafeMergeError(f"--model {text!r}: nothing follows '+'; give the adapter folder (DIR+ADAPTER), "
                             "or drop the '+' to evaluate the model alone")
    if ad and adapter and ad != adapter:
        raise SafeMergeError(f"--model {text!r} names the adapter {ad} and --adapter {adapter}; give one")
    ad = ad or adapter
    if not path:
        raise SafeMergeError(f"--model {text!r}: expected [NAME=]DIR[+ADAPTER]")
    for p, what in ((path, "model"), (ad, "adapter")):
        if p and not Path(p).is_dir():
            raise not_a_folder(f"--model {text!r}:", p, "a Hugging Face model folder" if what == "model" else
                               "a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    if not (Path(path) / "config.json").is_file():
        raise SafeMergeError(f"--model {text!r}: {path} has no config.json; give a Hugging Face model folder")
    if not has_weights(Path(path)):
        raise SafeMergeError(f"--model {text!r}: {path} has no weights (no *.safetensors or pytorch_model*.bin "
                             "file); give the folder save_pretrained wrote")
    if ad and not (Path(ad) / "adapter_config.json").is_file():
        raise SafeMergeError(f"--model {text!r}: {ad} has no adapter_config.json; give a PEFT LoRA adapter folder")
    # (without its weights file, peft takes the folder for a Hub repo id and goes to the network)
    if ad and not any((Path(ad) / n).is_file() for n in ADAPTER_WEIGHTS):
        raise SafeMergeError(f"--model {text!r}: adapter folder {ad} has no {' or '.join(ADAPTER_WEIGHTS)}; "
                             "give the folder PEFT's save_pretrained wrote")
    return ModelSpec(name or Path(ad or path).absolute().name, path, ad)  # (a symlink keeps its own name)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or unreadable (the load that follows says why)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


# a PEFT factor's tensor name: MODULE.lora_A|B[.ADAPTER].weight, or MODULE.lora_embedding_A|B[.ADAPTER]
_FACTOR = re.compile(r"^(?P<module>.+?)\.lora_(?P<which>A|B|embedding_A|embedding_B)(?:\.[^.]+)*$")


def _header_shapes(folder: Path, single: str | None = None, wanted: set[str] | None = None) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape (of those in ``wanted``, or all) from a folder's safetensors headers
    (``io.models.ModelReader``: the index's shards or ``single``), without reading any tensor; None when
    they cannot be read, .bin files say (the load that follows says why)."""
    from safemerge_ext.io.models import SINGLE, ModelReader

    try:
        reader = ModelReader(folder, single=single or SINGLE)
        try:
            names = reader.names if wanted is None else [n for n in wanted if n in reader]
            return {n: tuple(reader.meta(n)[0]) for n in names}
        finally:
            reader.close()
    except SafeMergeError:
        return None


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of an adapter's weights, without loading them: from the safetensors header,
    or from a memory-mapped adapter_model.bin; None when they cannot be read."""
    if (folder / ADAPTER_WEIGHTS[0]).is_file():
        return _header_shapes(folder, single=ADAPTER_WEIGHTS[0])
    import pickle

    import torch

    try:
        sd = torch.load(folder / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True, mmap=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError):
        return None
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")} if isinstance(sd, dict) else None


def check_adapter_fits(spec: ModelSpec) -> None:
    """Fail with one line, before any model loads, when a module of ``spec``'s adapter does not fit the
    base model: lora_B @ lora_A must have the shape of that module's weight in the base model's files.

    Only shapes are read (safetensors headers), so this takes a moment where loading and failing takes
    minutes, after the models before it have run. A module the base files do not name, a quantized base
    model (packed weights) and a base model in .bin files are left to the load, which reports them. On an
    MoE model, also refuse a transformers-4 adapter that PEFT would fold otherwise than it was trained
    (``adapters.check_fold_keeps_scalings``): its load gives no error, only another model."""
    if not spec.adapter:
        return
    from safemerge_ext.io.adapters import peft_module
    from safemerge_ext.io.models import is_conv1d

    adapter, base = Path(spec.adapter), Path(spec.path)
    shapes = _adapter_shapes(adapter)
    if shapes is None or _read_json(base / "config.json").get("quantization_config"):
        return
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        m = _FACTOR.match(name)
        if m and m["which"] in ("A", "B") and len(shape) == 2:
            factors.setdefault(peft_module(m["module"]), {})[m["which"]] = shape
    model = _header_shapes(base, wanted={f"{mod}.weight" for mod in factors}) or {}
    # (GPT-2's Conv1D layers, by the module: PEFT sets fan_in_fan_out per module and saves the last one's)
    model_type = _read_json(base / "config.json").get("model_type")
    for mod, ab in factors.items():
        have = model.get(f"{mod}.weight")
        if have is None or len(have) != 2 or len(ab) != 2:
            continue
        update = (ab["B"][0], ab["A"][1])
        want = update[::-1] if is_conv1d(model_type, mod) else update
        if have != want:
            raise SafeMergeError(
                f"--model {spec.label}: the adapter does not fit the model: adapter {spec.adapter} changes {mod} by a "
                f"{update} update (lora_B {ab['B']} @ lora_A {ab['A']}), but {mod}.weight in {spec.path} has shape "
                f"{have}; give the base model it was trained on")
    from safemerge_ext.io.adapters import check_fold_keeps_scalings, read_adapter
    from safemerge_ext.io.models import experts_count

    if experts_count(base) is None:
        return
    try:
        lora = read_adapter(adapter)
    except SafeMergeError:  # (what only PEFT takes, DoRA and the like: its load says what it cannot)
        return
    check_fold_keeps_scalings(lora, base, f"--model {spec.label}")


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise SafeMergeError(f"--dtype {name!r}: use auto, {', '.join(table)}")
    return table[name]


def _gist(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (transformers writes several), cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a missing or broken file of a local folder (an OSError for a missing
    file or bad JSON config, ValueError for an unknown architecture or unusable tokenizer, RuntimeError
    for weights of other shapes, SafetensorError for a damaged weights file)."""
    from safetensors import SafetensorError

    return OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError


def _bad_json(folder: Path) -> str | None:
    """``FILE is not valid JSON (why)`` for the first JSON file of ``folder`` that does not parse, else None
    (transformers' own error leaves the file unnamed)."""
    for f in sorted(folder.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # (UnicodeDecodeError is a ValueError)
            return f"{f} is not valid JSON ({_gist(exc, 80)})"
    return None


def chat_tokenizer(path: str | Path, flag: str,
                   no_template: str = "use a chat/instruct model or add chat_template to tokenizer_config.json") -> Any:
    """The tokenizer of a local folder, left-padding, with a chat template; ``flag`` names the folder in
    errors, ``no_template`` says what to do when it has no chat template."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        # (transformers 5.0 builds a blank tokenizer from config.json alone instead of failing)
        raise SafeMergeError(f"{flag}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer into it with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # (transformers 4.x lets tokenizers' bare Exception for a bad tokenizer.json through)
        bad = _bad_json(folder)
        if bad:
            raise SafeMergeError(f"{flag}: {bad}; repair or replace the file") from None
        # (an AttributeError: a field of tokenizer_config.json of another type, added_tokens_decoder a list)
        if not isinstance(exc, _load_errors() + (AttributeError,)):
            raise
        if not any((folder / n).is_file() for n in TOKENIZER_FILES):
            raise SafeMergeError(f"{flag}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                 "save the tokenizer into it with tokenizer.save_pretrained") from None
        raise SafeMergeError(f"{flag}: cannot load the tokenizer of {folder} ({_gist(exc)}); "
                             "save it again with tokenizer.save_pretrained") from None
    if tok.chat_template is None:
        tok.chat_template = _processor_template(folder, flag)
    if tok.chat_template is None:
        raise SafeMergeError(f"{flag}: the tokenizer of {folder} has no chat template; {no_template}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _processor_template(folder: Path, flag: str) -> str | None:
    """The chat template a vision-language model's processor saved as ``chat_template.json`` (as
    transformers 4 did, and llava-hf's folders have it), which the tokenizer does not read; None
    where the folder has no such file."""
    legacy = folder / "chat_template.json"
    if not legacy.is_file():
        return None
    try:
        template = json.loads(legacy.read_bytes()).get("chat_template")
    except (OSError, ValueError, AttributeError, RecursionError):
        template = None
    if not isinstance(template, str) or not template.strip():
        raise SafeMergeError(f"{flag}: {legacy} holds no chat template (a \"chat_template\" string); repair it, "
                             "or save the processor again with processor.save_pretrained")
    return template


def _generating_class(folder: Path, adapter: str | None) -> Any:
    """The auto class to load ``folder`` with: ``AutoModelForCausalLM``, or, for a vision-language
    model, ``AutoModelForImageTextToText`` where the first has no class for its config (Qwen3-VL-MoE)
    or where its adapter names the text model as the full model does (``model.language_model.``;
    the causal-LM class of Qwen3.5-MoE names it ``model.``, and PEFT loaded none of it, review165).
    Its text-only prompts are answered by the same text model either way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers import AutoModelForImageTextToText

        cfg = AutoConfig.from_pretrained(folder)
    except Exception:  # (an older transformers; a config it cannot read: the load below says what is wrong)
        return AutoModelForCausalLM
    config = type(cfg)
    if config not in AutoModelForImageTextToText._model_mapping or not _answers_text(cfg):
        return AutoModelForCausalLM
    if config not in AutoModelForCausalLM._model_mapping:
        return AutoModelForImageTextToText
    names = _adapter_shapes(Path(adapter)) if adapter else None
    return AutoModelForImageTextToText if names and any(".language_model." in n for n in names) else AutoModelForCausalLM


def _answers_text(cfg: Any) -> bool:
    """Whether the image-text-to-text class of the config ``cfg`` generates from text alone: a decoder-only
    model whose ``generate`` needs no image (BLIP-2's does, Pix2Struct is an encoder-decoder: eval
    refuses them in one line at load, not with a traceback at the first prompt, review168)."""
    import inspect

    from transformers import AutoModelForImageTextToText

    if getattr(cfg, "is_encoder_decoder", False):
        return False
    try:
        needs = inspect.signature(AutoModelForImageTextToText._model_mapping[type(cfg)].generate).parameters.get(
            "pixel_values")
    except Exception:  # (a class transformers cannot import: the load says what is wrong)
        return True
    return needs is None or needs.default is not inspect.Parameter.empty or needs.kind == needs.VAR_KEYWORD


def load_causal_lm(path: str | Path, flag: str, dtype: Any, adapter: str | None = None) -> Any:
    """The model in ``path`` for generation (see :func:`_generating_class`; ``adapter``: the one that
    will be merged into it), with a one-line error naming ``flag``."""
    folder = Path(path)
    try:
        return _generating_class(folder, adapter).from_pretrained(folder, dtype=dtype)
    except _load_errors() as exc:
        bad = _bad_json(folder)
        if bad:
            raise SafeMergeError(f"{flag}: {bad}; repair or replace the file") from None
        if not has_weights(folder):
            raise SafeMergeError(f"{flag}: {folder} has no weights (no *.safetensors or pytorch_model*.bin file); "
                                 "give the folder save_pretrained wrote") from None
        raise SafeMergeError(f"{flag}: cannot load the model in {folder} ({_gist(exc)}); give a folder that "
                             "save_pretrained wrote, with the config and weights of one model") from None


# the device types generation can run on (when this machine and this torch build have one)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def check_device(name: str) -> None:
    """Fail with one line, before anything loads, when ``--device`` cannot run generation here: cpu,
    cuda[:N], xpu[:N] (Intel GPUs) and mps (Apple) are supported, when present."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SafeMergeError(f"--device {name}: not a device name torch knows; "
                             "use cpu, cuda[:N], xpu[:N] or mps") from None
    if dev.type in ("cpu", "cuda"):
        from safemerge_ext.pipeline import resolve_device

        resolve_device(name, scoring=False)
        return
    if dev.type not in _DEVICE_TYPES:
        raise SafeMergeError(f"--device {name}: eval generates on cpu, cuda[:N], xpu[:N] or mps, not {dev.type}; "
                             "use one of them")
    if dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not hasattr(xpu, "is_available") or not xpu.is_available():
            raise SafeMergeError(f"--device {name}: no Intel XPU is available to this torch ({torch.__version__}); "
                                 "use --device cpu or cuda")
        if dev.index is not None and dev.index >= xpu.device_count():
            raise SafeMergeError(f"--device {name}: this machine has {xpu.device_count()} XPU device(s); "
                                 "use xpu or xpu:N with a smaller N")
    else:  # mps
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not hasattr(mps, "is_available") or not mps.is_available():
            raise SafeMergeError(f"--device {name}: Apple's MPS is not available to this torch ({torch.__version__}); "
                                 "use --device cpu or cuda")
        if dev.index not in (None, 0):
            raise SafeMergeError(f"--device {name}: there is one MPS device; use --device mps")


class TransformersEngine:
    """One model at a time in memory; ``generate`` returns the decoded continuations."""

    name = "transformers"

    def __init__(self, device: str = "cpu", dtype: str = "auto", batch_size: int = 8) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model = self.tok = None

    def load(self, spec: ModelSpec) -> None:
        self.label = spec.label
        self.tok = chat_tokenizer(spec.path, f"--model {spec.label}")
        model = load_causal_lm(spec.path, f"--model {spec.label}", _torch_dtype(self.dtype, self.device), spec.adapter)
        if spec.adapter:
            model = _merge_adapter(model, spec)
        self.model = model.to(self.device).eval()

    def chat_texts(self, prompts: Sequence[str]) -> list[str]:
        return [chat_prompt(self.tok, [{"role": "user", "content": p}]) for p in prompts]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        texts = self.chat_texts(prompts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[str] = [""] * len(texts)
        # (a generation config may list several end tokens, as Llama 3's does)
        ends = (self.tok.eos_token_id, self.model.generation_config.eos_token_id)
        stop = list(dict.fromkeys(x for t in ends if t is not None for x in (t if isinstance(t, list) else [t])))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            # (a fast tokenizer without model_input_names returns token_type_ids, which generate()
            # refuses in transformers 4.x)
            enc = self.tok([texts[j] for j in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False, return_token_type_ids=False).to(self.device)
            rows = self.model.get_input_embeddings().num_embeddings
            top = int(enc["input_ids"].max())
            if top >= rows:  # (else an IndexError from the embedding, 30 frames deep)
                raise SafeMergeError(f"--model {self.label}: its tokenizer gives token id {top}, but the model's "
                                     f"embedding has {rows} rows; put the model's own tokenizer in its folder")
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=self.tok.pad_token_id, eos_token_id=stop or None,
                                          temperature=None, top_p=None, top_k=None)
            dec = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, s in zip(idx, dec):
                out[j] = s.strip()
        return out

    def unload(self) -> None:
        self.model = None


def _merge_adapter(model: Any, spec: ModelSpec) -> Any:
    """``model`` with the LoRA adapter of ``spec`` merged in; every adapter weight must land on a module.

    PeftModel.from_pretrained only warns about weights that matched no module (and keeps the random or zero
    LoRA factors it made), so the adapter is loaded with load_adapter, which returns what did not load.
    """
    from peft import PeftConfig, PeftModel
    from safetensors import SafetensorError

    try:
        config = PeftConfig.from_pretrained(spec.adapter)
        config.inference_mode = True
        peft_model = PeftModel(model, config)
        result = peft_model.load_adapter(spec.adapter, "default")
    except (OSError, SafetensorError) as exc:  # (a damaged or unreadable weights file)
        raise SafeMergeError(f"--model {spec.label}: cannot read the adapter in {spec.adapter} ({_gist(exc)}); "
                             "save it again with PEFT's save_pretrained") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        bad = _bad_json(Path(spec.adapter))
        if bad:
            raise SafeMergeError(f"--model {spec.label}: {bad}; repair or replace the file") from None
        lines = [ln.strip() for ln in str(exc).strip().splitlines()] or [type(exc).__name__]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0])
        raise SafeMergeError(f"--model {spec.label}: the adapter does not fit the model ({first}); "
                             "give the base model it was trained on") from None
    if result.unexpected_keys or result.missing_keys:
        if result.unexpected_keys:
            what = (f"{len(result.unexpected_keys)} of its weights match no module of the model, e.g. "
                    f"{result.unexpected_keys[0]}")
        else:
            what = f"{len(result.missing_keys)} LoRA weights got no value from it, e.g. {result.missing_keys[0]}"
        raise SafeMergeError(f"--model {spec.label}: the adapter does not fit the model ({what}); "
                             "give the base model it was trained on, or an adapter saved by PEFT for this model")
    return peft_model.merge_and_unload()


def require_vllm() -> None:
    """Fail with one line when vLLM cannot be imported: checked before any judge or model loads."""
    from importlib import import_module

    try:
        import_module("vllm")
    except ImportError:
        raise SafeMergeError("--engine vllm: vLLM is not installed; pip install vllm, or use --engine transformers") from None


def _vllm_auto_dtype() -> str:
    """bfloat16, or float16 on a CUDA GPU without it (compute capability below 8.0), which vLLM
    refuses only when it starts, after the judge has loaded. Asked through vLLM's platform (NVML),
    which starts no CUDA context in this process (torch.cuda's check would, and counts bf16
    emulation as support)."""
    try:
        from vllm.platforms import current_platform

        cap = current_platform.get_device_capability() if current_platform.is_cuda() else None
        old = cap is not None and tuple(cap)[:2] < (8, 0)
    except Exception:  # (a broken or absent set-up raises many kinds: vLLM will say what is wrong)
        old = False
    return "float16" if old else "bfloat16"


class VllmEngine:
    """vLLM for multi-GPU scale: tensor parallel over the visible GPUs, adapters through LoRARequest."""

    name = "vllm"

    def __init__(self, dtype: str = "auto", tensor_parallel: int = 1) -> None:
        require_vllm()
        # auto: bfloat16, as the transformers engine on CUDA (vLLM's own auto takes the config's dtype,
        # float16 for a float32 model), so the engine does not change the numbers through the dtype
        self.dtype = _vllm_auto_dtype() if dtype == "auto" else dtype
        self.tp, self.llm, self.spec = tensor_parallel, None, None
        self.held = self._held_by_this_process()  # (the judge's, loaded first; not what vLLM later leaves)

    def _held_by_this_process(self) -> tuple[int, int]:
        """(bytes this process holds on the GPUs vLLM will take, the smallest of their sizes)."""
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):  # (never start CUDA here for vLLM)
            return 0, 0
        gpus = range(min(self.tp, torch.cuda.device_count()))
        return (max((torch.cuda.memory_reserved(i) for i in gpus), default=0),
                min((torch.cuda.get_device_properties(i).total_memory for i in gpus), default=0))

    def load(self, spec: ModelSpec) -> None:
        from vllm import LLM

        check_vllm_adapter(spec)
        self.unload()
        self.spec = spec
        kw = {"enable_lora": True, "max_lora_rank": _vllm_lora_rank(spec.adapter)} if spec.adapter else {}
        share = self.gpu_share()
        if share is not None:
            kw["gpu_memory_utilization"] = share
        self.llm = LLM(model=spec.path, dtype=self.dtype, tensor_parallel_size=self.tp, **kw)

    def gpu_share(self) -> float | None:
        """vLLM's ``gpu_memory_utilization``: its default (0.9) less what this process held on the
        GPUs vLLM takes when the engine was made (a Llama Guard judge, loaded first) and 1 GiB for the
        judge's work, so that both fit; None (vLLM's default) when it held nothing there."""
        held, total = self.held
        if held == 0:
            return None
        share = 0.9 - (held + (1 << 30)) / total
        if share < 0.2:
            raise SafeMergeError(
                f"--engine vllm: the judge holds {held / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB, which "
                "leaves vLLM too little; use --engine transformers, or the keyword judge")
        return round(share, 3)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(self.spec.name, 1, self.spec.adapter) if self.spec.adapter else None
        # the prompt is rendered here, as TransformersEngine does (the same text, the fixed CHAT_DATE), and
        # given as token ids: vLLM would add a second BOS to the template's own
        tok = self.llm.get_tokenizer()
        if tok.chat_template is None:  # (as chat_tokenizer does for the transformers engine)
            tok.chat_template = _processor_template(Path(self.spec.path), f"--model {self.spec.label}")
        ids = [tok(chat_prompt(tok, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
               for p in prompts]
        res = self.llm.generate([{"prompt_token_ids": x} for x in ids],
                                SamplingParams(temperature=0.0, max_tokens=max_new_tokens), lora_request=lora,
                                use_tqdm=False)
        return [r.outputs[0].text.strip() for r in res]

    def unload(self) -> None:
        """Free the GPUs for the next model (dropping the reference alone leaves vLLM's memory held)."""
        if self.llm is None:
            return
        import gc

        self.llm = None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # (names moved between vLLM versions; freeing below still helps)
            pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# the LoRA ranks vLLM accepts for max_lora_rank
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _vllm_lora_rank(adapter: str) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every module of the adapter (a merged
    SafeMERGE adapter has rank r_task + r_safety in its flagged modules)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_bytes())
    rank = max([int(cfg.get("r") or 8), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise SafeMergeError(f"{adapter}: LoRA rank {rank} is above vLLM's largest ({_VLLM_LORA_RANKS[-1]}); "
                         "use --engine transformers")


def check_vllm_adapter(spec: ModelSpec) -> None:
    """Fail with one line, before anything loads, when vLLM would evaluate another model than PEFT builds
    from ``spec``'s adapter: vLLM scales every module by lora_alpha / r (/ sqrt(r) with use_rslora), and
    reads neither rank_pattern nor alpha_pattern, so a module they give another scaling would be wrong
    in silence. Also checks the adapter's rank against vLLM's largest."""
    if not spec.adapter:
        return
    from safemerge_ext.io.adapters import pattern_key, peft_module

    _vllm_lora_rank(spec.adapter)
    cfg = _read_json(Path(spec.adapter) / "adapter_config.json")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not (rank_pattern or alpha_pattern):
        return
    r, alpha, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))

    def scaling(a: float, rank: int) -> float:
        return a / (math.sqrt(rank) if rslora else rank)

    def text(a: float, rank: int) -> str:
        return (f"{a:g} / " + (f"sqrt({rank})" if rslora else f"{rank}")
                + (f" = {scaling(a, rank):.4g}" if rank > 0 else ""))

    shapes = _adapter_shapes(Path(spec.adapter))
    # the adapted modules, from the weights' names (without them: the patterns' keys, taken as names)
    modules = (list(dict.fromkeys(peft_module(m["module"]) for m in map(_FACTOR.match, shapes) if m))
               if shapes else list(dict.fromkeys([*rank_pattern, *alpha_pattern])))
    off = []
    for mod in modules:
        rk, ak = pattern_key(rank_pattern, mod), pattern_key(alpha_pattern, mod)
        m_rank = rank_pattern[rk] if rk is not None else r
        m_alpha = alpha_pattern[ak] if ak is not None else alpha
        if not (r > 0 and m_rank > 0 and math.isclose(scaling(m_alpha, m_rank), scaling(alpha, r), rel_tol=1e-9)):
            off.append((mod, m_alpha, m_rank))
    if off:
        mod, m_alpha, m_rank = off[0]
        raise SafeMergeError(
            f"--model {spec.label}: --engine vllm scales every module of the adapter by lora_alpha / r "
            f"({text(alpha, r)}), but its rank_pattern/alpha_pattern give {len(off)} of {len(modules)} modules "
            f"another scaling (first: {mod}, {text(m_alpha, m_rank)}); use --engine transformers, or fold the "
            "adapter into its model (PEFT: merge_and_unload, save_pretrained) and pass that folder as --model; "
            "safemerge merge/project now write adapters with no such patterns: rerun one written by an older "
            "version")


def make_engine(name: str, *, device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                tensor_parallel: int = 1) -> TransformersEngine | VllmEngine:
    """``transformers`` (default) or ``vllm``."""
    if name == "transformers":
        return TransformersEngine(device, dtype, batch_size)
    if name == "vllm":
        return VllmEngine(dtype, tensor_parallel)
    raise SafeMergeError(f"--engine {name!r}: use transformers or vllm")
