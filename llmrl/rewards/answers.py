"""Reading completions and final answers: chat or string text, ``\\boxed{}``/tag/number extraction, matching.

Pure string functions, shared by the accuracy reward and by evaluation.
"""

from __future__ import annotations

import math
import re


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the last assistant message's content.

    ``completion_text([{"role": "assistant", "content": "42"}]) == "42"``. Content given as parts
    (``[{"type": "text", "text": ...}]``, the multimodal form) is joined; an empty chat is "".
    """
    if completion is None or isinstance(completion, str):
        return completion or ""
    if isinstance(completion, dict):
        completion = [completion]
    replies = [m for m in completion if m.get("role") == "assistant"] or list(completion)
    content = replies[-1].get("content") if replies else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


NUMBER = re.compile(
    r"(?:(?<![\w.])[-−])?"  # a sign, unless it is a hyphen ("5-3", "2024-01")
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"  # 1,000 | 12.5 | 1/2
    r"|(?<![\w.])[-−]?\.\d+"  # .5
)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:/(?:\d+\.?\d*|\.\d+))?")
ANSWER_MODES = ("auto", "boxed", "answer_tag", "last_number")


def _last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, braces balanced; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\boxed\{", text)]
    for begin in reversed(starts):
        depth = 0
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                return text[begin:i].strip()
    return None


def _last_tagged(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str, mode: str = "auto", tag: str = "answer") -> str | None:
    """The final answer in `text`, or None when there is none.

    ``extract_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"``. Modes: ``boxed`` (the last
    brace-balanced ``\\boxed{...}``), ``answer_tag`` (the last ``<tag>...</tag>``), ``last_number``
    (the last number: ``-3``, ``1,000``, ``2.5``, ``1/2``), and ``auto``: boxed if present, else the
    tag if present, else the last number.
    """
    extractors = {
        "boxed": _last_boxed,
        "answer_tag": lambda t: _last_tagged(t, tag),
        "last_number": _last_number,
    }
    if mode not in extractors and mode != "auto":
        raise ValueError(f"extract_answer mode {mode!r} is not valid; choose one of {list(ANSWER_MODES)}.")
    for name in extractors if mode == "auto" else [mode]:
        answer = extractors[name](text)
        if answer is not None:
            return answer
    return None


def parse_number(text: str) -> float | None:
    """`text` as a number when it is one (after light LaTeX/format cleanup), else None.

    ``parse_number("$1,000.") == 1000.0``; also ``−3`` (Unicode minus), ``1/2`` and
    ``\\frac{1}{2}`` (0.5). "5 apples" is not a number: callers fall back to its last number.
    """
    text = _FRAC.sub(r"(\1)/(\2)", str(text)).replace("−", "-")
    # "5 6" must not read as 56: only the spaces around a fraction bar go.
    text = re.sub(r"\\?\$|\\[!,]|[()]", "", text)
    text = re.sub(r"\s*/\s*", "/", text).strip()
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text).rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    numerator, _, denominator = text.partition("/")
    if denominator and float(denominator) == 0:
        return None
    return float(numerator) / float(denominator) if denominator else float(numerator)


def _normalise_text(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def answers_match(predicted: str | None, reference) -> bool:
    """Whether an extracted answer equals the reference answer.

    ``answers_match("1,000", "1000.0") is True``. A numeric reference is compared numerically with
    the prediction, or with its last number when the prediction is not a plain number ("5 apples"):
    two whole numbers exactly, anything else within a relative tolerance of 1e-6. Any other reference
    by whitespace-normalised string equality (case-sensitive; a trailing period is ignored). A
    GSM8K-style reference "...#### 72" counts as 72.
    """
    if predicted is None:
        return False
    reference = str(reference).rpartition("####")[2]
    expected = parse_number(reference)
    if expected is None:
        return _normalise_text(predicted) == _normalise_text(reference)
    got = parse_number(predicted)
    if got is None:
        last = _last_number(predicted)
        got = parse_number(last) if last is not None else None
    if got is None:
        return False
    if got.is_integer() and expected.is_integer():
        return got == expected  # a relative tolerance would pass 999,999 for 1,000,000
    return math.isclose(got, expected, rel_tol=1e-6)
