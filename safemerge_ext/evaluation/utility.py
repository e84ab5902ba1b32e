"""Task utility: GSM8K-format (final number, exact match) and PubMedQA-format (yes/no/maybe) scorers.

Both read local JSONL. GSM8K: ``question`` and ``answer`` ending in ``#### N``. PubMedQA: ``question``,
optional ``context`` (a string, a list, or PubMedQA's ``{"contexts": [...]}``) and ``final_decision``
(or ``answer``) in yes/no/maybe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safemerge_ext.errors import SafeMergeError
from safemerge_ext.evaluation.data import jsonl_records
from safemerge_ext.evaluation.judges import answer_part

_UNSIGNED = r"(?:\d[\d,]*)?\.?\d+"
# 1,234  -7  0.5  .5; a "-" after a word character or "." is a hyphen or a subtraction, not a sign ("10-12")
_NUM = re.compile(r"(?:(?<![\w.])-)?" + _UNSIGNED)
# "#### N": the number may follow a label ending in ":" or "is" ("Answer:", "The final answer is"; a unit in
# parentheses may come before the ":": "Answer (in dollars):") and Markdown or currency marks ("**", "$", a
# sign before or after the "$": "-$5", "$-5"). A Markdown heading is no answer line: "#### Step 2" (words
# before the number, no label), "#### 1. Understand the problem" and "#### 2) Add them" (a number, "." or
# ")", then a word). The number is taken whole: the lookahead also refuses a shorter part of it ("1" of
# "12. Understand").
_WORD = r"[^\W\d_]+"
_LABEL_END = rf"(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*(?:\([^()\n]*\)[ \t]*)?:|(?:{_WORD}[ \t]+)*is(?=[\s*_$+-]))"
_FINAL = re.compile(rf"####[*_ \t]*(?:{_LABEL_END})?[*_$+ \t]*(-?)[$ \t]*({_UNSIGNED})"
                    r"(?!\d|[.,]\d|[.)][ \t]+[^\W\d_])")
_LABEL = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)

GSM8K_INSTRUCTION = "Solve the problem. End with the final answer on its own line as '#### <number>'."
PUBMEDQA_INSTRUCTION = "Answer the question with yes, no or maybe."


def _canon(num: str) -> str:
    s = num.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = re.sub(r"^(-?)\.", r"\g<1>0.", s)  # .5 -> 0.5
    s = re.sub(r"^(-?)0+(?=\d)", r"\1", s)  # 012 -> 12, 007.5 -> 7.5
    return "0" if s in ("-0", "", "-") else s


def gsm8k_gold(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K answer."""
    if "####" not in answer:
        raise SafeMergeError(f"the answer has no '#### N' line ({answer[:60]!r}); end it with '#### <number>'")
    m = _NUM.search(answer.rsplit("####", 1)[1])
    if m is None:
        raise SafeMergeError(f"the answer has no number after its last '####' ({answer[:60]!r}); "
                             "end it with '#### <number>'")
    return _canon(m.group())


# after the number of a "####" line: an equation's result ("#### 30 - 12 = 18", "#### 9 x 2 = 18": an operator
# right after the number, an "x" before a number too, only arithmetic up to the last "="; "#### 24 = 4 * 6"
# answers 24), or a fraction's denominator ("#### 1/2")
_EQUATION = re.compile(rf"[ \t]*(?:[+\-*/×÷]|x(?=[ \t]*[\d$(]))(?:[ \t\d.,+\-*/×÷()$=]|x(?=[ \t]*[\d$(]))*=[*_$ \t]*"
                       rf"(-?)[$ \t]*({_UNSIGNED})(?!\d|[.,]\d)")
_OVER = re.compile(r"[ \t]*/[ \t]*(\d+)(?!\d|[.,]\d)")


def _fraction(num: str, den: str) -> str:
    """num/den in decimals where they end (1/2 -> 0.5), else as written (1/3)."""
    from fractions import Fraction

    value = Fraction(num.replace(",", "")) / int(den)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{_canon(num)}/{den}"
    digits = 0
    while (value * 10 ** digits).denominator != 1:
        digits += 1
    return _canon(f"{float(value):.{digits}f}") if digits else _canon(str(value))


_BOXED_FRACTION = re.compile(rf"(-?)\\[dt]?frac\{{(-?)({_UNSIGNED})\}}\{{(\d+)\}}|(-?)({_UNSIGNED})/(\d+)")


def _boxed(text: str) -> str | None:
    """The number in the last LaTeX ``\\boxed{...}`` (as many models end a solution): a fraction
    (``\\frac{1}{2}``, ``1/2``) as its value, else the last number in the box (``\\$18``,
    ``18 \\text{ dollars}``, ``x = 5``, ``1{,}000``); None where there is no box or no number in it."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    if depth:
        return None  # (an unclosed box: cut off by the token budget)
    box = re.sub(r"\\[ ,;:!]", "", text[start + len("\\boxed{"):i - 1]).replace("{,}", ",").replace(" ", "")
    frac = _BOXED_FRACTION.fullmatch(box)
    if frac is not None:
        outer, sign, num, den = frac.groups()[:4] if frac.group(3) else ("", *frac.groups()[4:])
        if int(den):
            return _fraction(("-" if (outer == "-") != (sign == "-") else "") + num, den)
    nums = _NUM.findall(box)
    return _canon(nums[-1]) if nums else None


# "The answer is $64.", "Final answer: 20 cups", "So the answer is **20**.", "**Final Answer**: 18": the number right
# after "answer" and "is" or ":" (and marks), where the response has no answer line and no box; a recap after it
# ("Breakdown: 8 glasses at $3 ($24)", "This is because she sells 9 eggs at $2 each") no longer decides. A list item
# ("Answer:\n1. First...") is no answer, nor a label that opens a derivation ("Answer: 3 + 4 = 7 eggs, 16 - 7 = 9").
_STATED_NUMBER = re.compile(rf"\banswer\b[*_]*(?:[ \t]+is\b[ \t]*:?|[ \t]*:)[*_ \t]*(?:\n(?![ \t]*\d+[.)][ \t]))?"
                            rf"[*_$\\ \t]*(-?)[$ \t]*({_UNSIGNED})(?!\d|[.,]\d)", re.IGNORECASE)
# a later sentence that takes the stated answer back ("The answer is 12. Wait, 13."): the last number decides again
_TAKEN_BACK = re.compile(r"(?:[.!?]\s+|\n\s*)(?:wait|actually|correction|oops|hmm)\b", re.IGNORECASE)


# a model that does not stop writes the next turn itself after its answer line ("\n\nQuestion: A baker...",
# "### Instruction 2 (More difficult):", "User:"): the response ends there, so that turn's "#### 9" does not count
_NEXT_TURN = re.compile(r"\n[ \t]*(?:#{1,6}[ \t]*)?[*_]*(?:question|problem|instruction|exercise|q|user|human)\b"
                        r"[^\n:]{0,40}:", re.IGNORECASE)


def gsm8k_prediction(text: str) -> str | None:
    """The model's final number: that of its last ``#### N`` answer line (``#### Answer: **42**``,
    ``#### Answer (in dollars): 18``, ``#### The final answer is 18`` and ``#### -$5`` too; an equation's
    result, ``#### 30 - 12 = 18``; a fraction's value, ``#### 1/2``; a Markdown heading like ``#### Step 2``
    or ``#### 1. Understand the problem`` is none), else the number of its last ``\\boxed{...}``, else
    the number its last "answer is" / "answer:" states, else the last number it wrote."""
    return gsm8k_extraction(text)[0]


# the rules that read a prediction, as the report names them (the order they are tried in)
GSM8K_RULES = ("answer line", "box", "stated answer", "last number", "no number")
PUBMEDQA_RULES = ("stated answer", "opening label", "label on its own", "first label", "no label")


def gsm8k_extraction(text: str) -> tuple[str | None, str]:
    """:func:`gsm8k_prediction` and the rule that read it (one of ``GSM8K_RULES``): a model whose
    accuracy rests on the last-number fallback shows in the report."""
    text = answer_part(text) or ""  # (a reasoning model's thinking is no answer)
    text = text.replace("\u2212", "-")  # a typeset minus sign
    first = _FINAL.search(text)
    turn = _NEXT_TURN.search(text, first.end()) if first else None
    if turn is not None:
        text = text[:turn.start()]
    finals = list(_FINAL.finditer(text))
    if finals:
        last = finals[-1]
        eq = _EQUATION.match(text, last.end())
        if eq is not None:
            return _canon("".join(eq.groups())), "answer line"
        over = _OVER.match(text, last.end())
        if over is not None and int(over.group(1)):
            return _fraction("".join(last.groups()), over.group(1)), "answer line"
        return _canon("".join(last.groups())), "answer line"
    boxed = _boxed(text)
    if boxed is not None:
        return boxed, "box"
    stated = list(_STATED_NUMBER.finditer(text))
    if stated and not _TAKEN_BACK.search(text, stated[-1].end()):
        last = stated[-1]
        eq = _EQUATION.match(text, last.end())
        rest = re.split(r"[.!?](?:\s|$)|\n", text[(eq or last).end():], maxsplit=1)[0]
        if "=" not in rest:  # (the rest of its sentence: no derivation)
            return _canon("".join((eq or last).groups())), "stated answer"
    nums = _NUM.findall(text)
    return (_canon(nums[-1]), "last number") if nums else (None, "no number")


def gsm8k_correct(prediction: str, answer: str) -> bool:
    """Exact match of the final numbers."""
    return gsm8k_prediction(prediction) == gsm8k_gold(answer)


# a label on its own: followed by punctuation or the end ("Yes.", "No, because"; not "No doubt", "no
# specific question", "yes or no"), and not the end of a list of the labels ("I cannot give a definitive yes or no.",
# "yes, no or maybe:", "Yes/no/maybe: yes": only the last "yes" is on its own)
_ALONE = r"(?<!/)(?<!yes or )(?<!no or )(?<!yes, no or )(?<!yes, no, or )(yes|no|maybe)\b(?=[\s*_\"']*(?:[.,;:!)\n]|$))"
# "Answer: yes", "the answer is **no**.", "Final answer - maybe", "**Answer**: no"
_STATED = re.compile(rf"\banswer[*_]*(?:[ \t]+is)?[ \t]*[:\-]?[\s*_\"']*{_ALONE}", re.IGNORECASE)
# a label that opens the response on its own
_OPENING = re.compile(rf"^[\s*_\"']*{_ALONE}", re.IGNORECASE)
# a label on its own anywhere ("No doubt about it: yes.": the "yes")
_ANY_ALONE = re.compile(rf"\b{_ALONE}", re.IGNORECASE)


def pubmedqa_prediction(text: str) -> str | None:
    """The label the response states: the last "answer (is)(:) yes/no/maybe", else the label it opens
    with on its own ("Yes." / "No, ..."), else its first label on its own ("..., so maybe."), else its
    first yes/no/maybe word (lower case); or None."""
    return pubmedqa_extraction(text)[0]


def pubmedqa_extraction(text: str) -> tuple[str | None, str]:
    """:func:`pubmedqa_prediction` and the rule that read it (one of ``PUBMEDQA_RULES``)."""
    text = answer_part(text) or ""  # (a reasoning model's thinking is no answer)
    stated = _STATED.findall(text)
    if stated:
        return stated[-1].lower(), "stated answer"
    for rule, m in (("opening label", _OPENING.match(text)), ("label on its own", _ANY_ALONE.search(text)),
                    ("first label", _LABEL.search(text))):
        if m:
            return m.group(1).lower(), rule
    return None, "no label"


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

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules :meth:`extraction` names, in the order it tries them."""
        return GSM8K_RULES if self.kind == "gsm8k" else PUBMEDQA_RULES

    def extraction(self, prediction: str) -> tuple[str | None, str]:
        """The prediction read from a response (compared with an item's already extracted ``gold``),
        and the rule that read it."""
        return gsm8k_extraction(prediction) if self.kind == "gsm8k" else pubmedqa_extraction(prediction)


def _shown(value: object) -> str:
    return json.dumps(value)[:40]


def _text(rec: dict, key: str) -> str:
    """Field ``key`` of a task record, which must be text."""
    if key not in rec:
        raise SafeMergeError(f"no {key!r} field")
    if not isinstance(rec[key], str):
        raise SafeMergeError(f"{key!r} is {_shown(rec[key])}, not text; give it as a string")
    return rec[key]


def _context(rec: dict) -> str:
    """PubMedQA's optional context: a string, a list of strings, or ``{"contexts": [...]}`` (its own layout)."""
    key = "context" if "context" in rec else "contexts"
    ctx = rec.get(key, "")
    if isinstance(ctx, dict):
        key, ctx = f"{key}.contexts", ctx.get("contexts", [])
    if isinstance(ctx, str):
        return ctx
    if isinstance(ctx, list) and all(isinstance(c, str) for c in ctx):
        return " ".join(ctx)
    bad = next((c for c in ctx if not isinstance(c, str)), None) if isinstance(ctx, list) else ctx
    raise SafeMergeError(f"{key!r} holds {_shown(bad)}, not text; give a string, a list of strings "
                         'or {"contexts": [...]}')


def load_task(path: str, kind: str = "auto") -> Task:
    """A utility file as prompts + gold answers; ``kind`` auto-detects from the first record's fields."""
    if Path(path).is_dir():
        raise SafeMergeError(f"--utility {path} is a folder; give the task's JSONL file")
    if not Path(path).is_file():
        raise SafeMergeError(f"--utility {path} does not exist")
    recs = jsonl_records(Path(path))
    if not recs:
        raise SafeMergeError(f"--utility {path}: no records")
    first = recs[0][1]
    if kind == "auto":
        if "final_decision" in first or str(first.get("answer", "")).strip().lower() in ("yes", "no", "maybe"):
            kind = "pubmedqa"
        elif "####" in str(first.get("answer", "")):
            kind = "gsm8k"
        else:
            raise SafeMergeError(f"--utility {path}: cannot tell the format from the first record's fields "
                                 f"{sorted(first)}; expected GSM8K (question, answer with '#### N') or PubMedQA "
                                 "(question, final_decision yes/no/maybe)")
    if kind not in ("gsm8k", "pubmedqa"):
        raise SafeMergeError(f"--utility-format {kind!r}: use auto, gsm8k or pubmedqa")
    items = []
    for line, r in recs:
        try:
            items.append(_item(r, kind))
        except SafeMergeError as exc:
            raise SafeMergeError(f"--utility {path} line {line}: {exc}") from None
    return Task(kind, Path(path).name, items)


def _item(rec: dict, kind: str) -> TaskItem:
    """One record as prompt + gold answer; every field it uses is checked (errors lack the file and line)."""
    question = _text(rec, "question")
    if not question.strip():
        raise SafeMergeError("the 'question' is empty; give the question's text")
    if kind == "gsm8k":
        return TaskItem(f"{question}\n{GSM8K_INSTRUCTION}", gsm8k_gold(_text(rec, "answer")))
    key = "answer" if "answer" in rec and "final_decision" not in rec else "final_decision"
    label = _text(rec, key).strip().lower()
    if label not in ("yes", "no", "maybe"):
        raise SafeMergeError(f"label {label!r} is not yes/no/maybe; give one of them")
    return TaskItem(f"{_context(rec)}\n\nQuestion: {question}\n{PUBMEDQA_INSTRUCTION}".strip(), label)
