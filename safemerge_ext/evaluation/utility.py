"""Task utility: GSM8K-format (final number, exact match) and PubMedQA-format (yes/no/maybe) scorers.

Both read local JSONL. GSM8K: ``question`` and ``answer`` ending in ``#### N``. PubMedQA: ``question``,
optional ``context`` (a string, a list, or PubMedQA's ``{"contexts": [...]}``) and ``final_decision``
(or ``answer``) in yes/no/maybe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safemerge_ext.errors import SafeMergeError
from safemerge_ext.evaluation.data import read_jsonl

_NUM = re.compile(r"-?(?:\d[\d,]*)?\.?\d+")  # 1,234  -7  0.5  .5
_LABEL = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)

GSM8K_INSTRUCTION = "Solve the problem. End with the final answer on its own line as '#### <number>'."
PUBMEDQA_INSTRUCTION = "Answer the question with yes, no or maybe."


def _canon(num: str) -> str:
    s = num.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = re.sub(r"^(-?)\.", r"\g<1>0.", s)  # .5 -> 0.5
    return "0" if s in ("-0", "", "-") else s


def gsm8k_gold(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K answer."""
    if "####" not in answer:
        raise SafeMergeError(f"GSM8K answer has no '#### N' line: {answer[:60]!r}")
    m = _NUM.search(answer.rsplit("####", 1)[1])
    if m is None:
        raise SafeMergeError(f"GSM8K answer has no number after '####': {answer[:60]!r}")
    return _canon(m.group())


def gsm8k_prediction(text: str) -> str | None:
    """The model's final number: the first after its last ``####`` when present, else the last
    number it wrote."""
    text = text.replace("\u2212", "-")  # a typeset minus sign
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    nums = _NUM.findall(tail)
    if not nums:
        return None
    return _canon(nums[0] if "####" in text else nums[-1])


def gsm8k_correct(prediction: str, answer: str) -> bool:
    """Exact match of the final numbers."""
    return gsm8k_prediction(prediction) == gsm8k_gold(answer)


def pubmedqa_prediction(text: str) -> str | None:
    """The first yes/no/maybe word in ``text`` (lower case), or None."""
    m = _LABEL.search(text)
    return m.group(1).lower() if m else None


def pubmedqa_correct(prediction: str, label: str) -> bool:
    return pubmedqa_prediction(prediction) == label.strip().lower()


@dataclass
class TaskItem:
    prompt: str
    gold: str


@dataclass
class Task:
    kind: str                 # "gsm8k" | "pubmedqa"
    name: str
    items: list[TaskItem]

    def correct(self, prediction: str, gold: str) -> bool:
        """``gold`` is the already extracted answer (a canonical number, or yes/no/maybe)."""
        return self.extracted(prediction) == gold

    def extracted(self, prediction: str) -> str | None:
        return gsm8k_prediction(prediction) if self.kind == "gsm8k" else pubmedqa_prediction(prediction)


def _context(rec: dict) -> str:
    ctx = rec.get("context", rec.get("contexts", ""))
    if isinstance(ctx, dict):
        ctx = ctx.get("contexts", [])
    return " ".join(ctx) if isinstance(ctx, list) else str(ctx)


def load_task(path: str, kind: str = "auto") -> Task:
    """A utility file as prompts + gold answers; ``kind`` auto-detects from the first record's fields."""
    recs = read_jsonl(Path(path))
    if not recs:
        raise SafeMergeError(f"--utility {path}: no records")
    first = recs[0]
    if kind == "auto":
        if "final_decision" in first or str(first.get("answer", "")).strip().lower() in ("yes", "no", "maybe"):
            kind = "pubmedqa"
        elif "####" in str(first.get("answer", "")):
            kind = "gsm8k"
        else:
            raise SafeMergeError(f"--utility {path}: cannot tell the format from the first record's fields "
                                 f"{sorted(first)}; expected GSM8K (question, answer with '#### N') or PubMedQA "
                                 "(question, final_decision yes/no/maybe)")
    items = []
    for i, r in enumerate(recs):
        if "question" not in r:
            raise SafeMergeError(f"--utility {path} record {i + 1}: no 'question' field")
        if kind == "gsm8k":
            items.append(TaskItem(f"{r['question']}\n{GSM8K_INSTRUCTION}", gsm8k_gold(str(r.get("answer", "")))))
        elif kind == "pubmedqa":
            label = str(r.get("final_decision", r.get("answer", ""))).strip().lower()
            if label not in ("yes", "no", "maybe"):
                raise SafeMergeError(f"--utility {path} record {i + 1}: label {label!r} is not yes/no/maybe")
            ctx = _context(r)
            items.append(TaskItem(f"{ctx}\n\nQuestion: {r['question']}\n{PUBMEDQA_INSTRUCTION}".strip(), label))
        else:
            raise SafeMergeError(f"--utility-format {kind!r}: use auto, gsm8k or pubmedqa")
    return Task(kind, Path(path).name, items)
