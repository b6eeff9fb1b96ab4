"""Reading completions and final answers: chat or string text, ``\\boxed{}``/tag/number extraction, and
one answer's value and unit (:func:`parse_number`); :mod:`.matching` compares an answer with a reference.

String functions shared by the accuracy-type rewards and by evaluation. Numbers are compared here,
quickly; only answers that are not numbers (``\\frac{\\sqrt{3}}{2}``, ``x+1``) go to HF's math-verify,
which is optional (``pip install 'llmrl[math]'``) and some hundred times slower.

A reward is a target the policy optimises, so a false positive here is a reward hack: the rules
below (:func:`answers_match`) credit one answer, never a list of candidates or a hedge.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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


# A letter, digit or _ of a script that separates its words with spaces: a number touching one is
# part of a word (AZYUK2A, x2y, v1.2, 5th). CJK text puts no space between words, so 答案是5 reads 5.
_WORD = r"[^\W\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
NUMBER = re.compile(
    rf"(?<!{_WORD})(?<!\d\.)(?<!\^)"  # standing alone: not inside a word, a version string or an exponent
    r"(?:[-−](?=[\d.\\]))?"  # a sign (a hyphen after a word is not one: "5-3", "2024-01")
    r"(?:\\[dt]?frac(?:\{\d+\}\{\d+\}|\d\d)"  # \frac{7}{2}, \frac12
    r"|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?"  # 1,000 | 12.5 | 1e3 | 1/2
    r"|\.\d+)(?:\\?%)?"  # .5; 25%
    rf"(?![.,/]?{_WORD}|\^)"  # "2." ends a sentence; "2.5x", "1/x", "2A" and the 2 of 2^10 are not numbers
)
ANSWER_MODES = ("auto", "boxed", "answer_tag", "last_number")
PERCENT_MODES = ("number", "fraction", "either")


def _last_boxed_span(text: str) -> tuple[str, int, int] | None:
    """(content, start, end) of the last closed ``\\boxed{...}``, braces balanced; None if there is none."""
    for match in reversed(list(re.finditer(r"\\boxed\{", text))):
        depth = 0
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                return text[match.end():i].strip(), match.start(), i + 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, braces balanced; None if there is none."""
    span = _last_boxed_span(text)
    return span[0] if span else None


def _last_tagged_span(text: str, tag: str) -> tuple[str, int, int] | None:
    """(content, start, end) of the last ``<tag>...</tag>``; a tag nested inside is dropped from the content."""
    tags = rf"</?{re.escape(tag)}>"
    found = list(re.finditer(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL))
    return (re.sub(tags, "", found[-1][1]).strip(), found[-1].start(), found[-1].end()) if found else None


def _last_tagged(text: str, tag: str) -> str | None:
    span = _last_tagged_span(text, tag)
    return span[0] if span else None


def _last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1] if found else None


def _final_marked(text: str, tag: str) -> str | None:
    """``auto``'s answer: whichever of the last ``\\boxed{}`` and the last answer tag is written
    last (a box inside the tag is the tag's answer, unboxed); None if neither is there. A box
    tried out inside ``<think>`` must not outrank the ``<answer>`` given after it."""
    boxed, tagged = _last_boxed_span(text), _last_tagged_span(text, tag)
    if boxed is None or tagged is None:
        return (boxed or tagged or (None,))[0]
    if tagged[1] <= boxed[1] and boxed[2] <= tagged[2]:  # <answer>\boxed{5}</answer>
        return boxed[0]
    return boxed[0] if boxed[2] > tagged[2] else tagged[0]


def extract_answer(text: str, mode: str = "auto", tag: str = "answer") -> str | None:
    """The final answer in `text`, or None when there is none.

    ``extract_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"``. Modes: ``boxed`` (the last
    brace-balanced ``\\boxed{...}``), ``answer_tag`` (the last ``<tag>...</tag>``), ``last_number``
    (the last number standing alone: ``-3``, ``1,000``, ``2.5``, ``1e3``, ``1/2``, ``\\frac{7}{2}``,
    ``25%``; not the 2 of ``AZYUK2A``, ``x2y``, ``v1.2`` or ``x^2``), and ``auto``: of the last box
    and the last tag, the one written last (a box inside the tag counts as the tag's answer), else
    the last number. Several boxes: the last one counts, the writer's final word (math-verify reads
    them as a set instead); it holds one value, so writing more boxes gains a policy nothing.
    """
    extractors = {
        "boxed": _last_boxed,
        "answer_tag": lambda t: _last_tagged(t, tag),
        "last_number": _last_number,
        "auto": lambda t: _final_marked(t, tag),
    }
    if mode not in extractors:
        raise ValueError(f"extract_answer mode {mode!r} is not valid; choose one of {list(ANSWER_MODES)}.")
    answer = extractors[mode](text)
    if answer is None and mode == "auto":
        answer = _last_number(text)
    return answer


def reference_answer(reference) -> str:
    """The answer inside a dataset's reference: after GSM8K's ``####``, else the last ``\\boxed{}``
    (MATH-style solutions), else the whole text, stripped.

    ``reference_answer("48/2 = 24 clips... #### 72") == "72"``.
    """
    text = str(reference)
    if "####" in text:
        return text.rpartition("####")[2].strip()
    boxed = _last_boxed(text)
    return boxed if boxed is not None else text.strip()


# ---- One answer: wrappers, a number and its unit --------------------

_TEXT = re.compile(r"\\(?:text|textrm|textbf|textit|textsf|textnormal|mbox)\s*\{([^{}]*)\}")  # \text{ cm} -> " cm "
_DELIMITERS = re.compile(r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])|\\displaystyle")
_ENCLOSED = re.compile(r"\$\$([^$]*)\$\$|(?<!\\)\$([^$]*)(?<!\\)\$|\\\(((?:(?!\\[()]).)*)\\\)|\\\[((?:(?!\\[][]).)*)\\\]",
                       re.DOTALL)  # $x$, \(x\), \[x\]
# A \frac right after a digit is a mixed number ("1\frac{1}{2}"), left to the symbolic check.
_FRAC = re.compile(r"(?<!\d)\\[dt]?frac(?:\{([^{}]*)\}\{([^{}]*)\}|(\d)(\d))")  # \frac{1}{2}, \frac12
_SIGNED = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")
# A number in braces or a font command: {5}, \mathbf{5} (after \frac{a}{b} is read).
_WRAPPED_NUMBER = re.compile(r"(?:\\(?:mathbf|boldsymbol|bm|mathrm)\s*)?\{([-+\d.,\s/%]+)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # x = 5
_QUANTITY = re.compile(
    r"(?P<number>[-+]?\s*(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:/(?:\d+(?:\.\d+)?|\.\d+))?)"
    r"(?:\s*(?P<percent>\\?%))?(?P<gap>\s*)(?P<unit>.*?)\s*"
)
_POWER = r"(?:\s*\^\s*\{?-?\d+\}?)?"
_UNIT = re.compile(rf"[A-Za-z]+{_POWER}(?:(?:\s+|\s*[/·]\s*|-)[A-Za-z]+{_POWER}){{0,3}}")  # cm, m^2, km/h, square feet
# Words after a number that make it something other than that quantity: a hedge, a comparison,
# a scale ("5 million"), a factor ("5 pi") or a variable ("5 x"). Any other letter-word is a unit.
_HEDGE_WORDS = frozenset(
    "or and nor not no but if than then more less fewer least most over under above below about around "
    "approximately approx roughly nearly almost maybe perhaps possibly probably likely unlikely either neither "
    "both plus minus to through till until between except is are was were be wrong incorrect correct right "
    "false true none any all some other another else otherwise guess answer final".split()
)
_NOT_UNITS = _HEDGE_WORDS | frozenset(
    "hundred thousand million billion trillion dozen k bn mn pi e i x y z n sqrt root squared cubed factorial "
    "log ln sin cos tan inf infinity".split()
)
# Units a number may touch (5cm, 3m^2); any other word needs a space: 2xy is not 2 of "xy".
_GLUED_UNITS = frozenset("mm cm m km mg g kg ml l s ms min h hr hrs ft in yd mi lb lbs oz mph kph v w kw kwh a j hz".split())
_UNIT_SYNONYMS = {"degree": "°", "degrees": "°", "deg": "°", "percent": "%", "pct": "%", "per cent": "%"}


@dataclass(frozen=True)
class _Quantity:
    number: str  # "1000", "-3/4", "1.5e-3": commas and spaces gone
    percent: bool
    unit: str  # "" or a lower-cased unit ("cm", "°", "square feet")

    def value(self) -> float | None:
        numerator, _, denominator = self.number.partition("/")
        if denominator and float(denominator) == 0:
            return None
        return float(numerator) / float(denominator) if denominator else float(numerator)


@functools.lru_cache(maxsize=8192)
def _unwrap(text: str) -> str:
    """`text` without what only presents an answer: $...$, \\(...\\), \\text{} (its words kept),
    \\left/\\right, a trailing period; a Unicode minus is a minus."""
    text = str(text).replace("−", "-").replace("{,}", ",").replace("\\!", "")  # \! is a negative space: 32,\!348
    text = _DELIMITERS.sub("", _TEXT.sub(r" \1 ", text)).strip()
    while (enclosed := _ENCLOSED.fullmatch(text)) is not None:
        text = next(group for group in enclosed.groups() if group is not None).strip()
    return re.sub(r"(?<![\\.])\.$", "", text).strip()


def _plain_fraction(match: re.Match) -> str:
    numerator, denominator = (match[1], match[2]) if match[1] is not None else (match[3], match[4])
    numerator, denominator = numerator.replace(" ", ""), denominator.replace(" ", "")
    plain = _SIGNED.fullmatch(numerator) and _SIGNED.fullmatch(denominator)
    return f"{numerator}/{denominator}" if plain else match[0]


def _closes_at_end(text: str, start: int = 0) -> bool:
    """Whether the bracket opened at `start` is closed by the last character (``(1, 2)``, not ``(3)(5)``)."""
    depth = 0
    for i, char in enumerate(text[start:], start):
        depth += (char in "{([") - (char in "})]")
        if depth == 0:
            return i == len(text) - 1
    return False


def _unit(text: str) -> str | None:
    """The unit `text` names after a number: "" for none, the lower-cased unit, or None when `text`
    is not a unit (a hedge, a comparison, a second value, a question mark)."""
    text = text.strip()
    if not text:
        return ""
    if re.fullmatch(r"°\s*[CFK]?", text):
        return text.replace(" ", "").lower()
    if not _UNIT.fullmatch(text):
        return None
    words = re.findall(r"[a-z]+", text.lower())
    if any(word in _NOT_UNITS for word in words):
        return None
    unit = re.sub(r"\s*([\^/·-])\s*", r"\1", " ".join(text.lower().replace("{", "").replace("}", "").split()))
    return _UNIT_SYNONYMS.get(unit, unit)


@functools.lru_cache(maxsize=8192)
def _quantity(text: str) -> _Quantity | None:
    """`text` as one number with an optional % and unit, after LaTeX and format cleanup; else None."""
    text = re.sub(r"\\mathrm\s*\{([A-Za-z\s]*)\}", r" \1 ", _unwrap(text))  # 5\,\mathrm{cm}
    text = _DEGREES.sub(" ° ", text)
    text = _WRAPPED_NUMBER.sub(r"\1", _FRAC.sub(_plain_fraction, text))
    text = re.sub(r"(?<=\d)\\[,;:! ](?=\d{3}(?!\d))", "", text)  # 10\,000; but "3\,5" stays two numbers
    text = re.sub(r"\\[,;:! ]|~", " ", text)
    text = re.sub(r"\\?\$|[€£¥₹]", "", text).strip()
    while text.startswith("(") and _closes_at_end(text):
        text = text[1:-1].strip()
    text = re.sub(r"\s*/\s*", "/", _ASSIGNMENT.sub("", text, count=1))
    match = _QUANTITY.fullmatch(text)
    unit = _unit(match["unit"]) if match else None
    glued = match and unit and not match["gap"] and not match["percent"] and unit[:1].isalpha()
    if unit is None or glued and re.match(r"[a-z]+", unit)[0] not in _GLUED_UNITS:
        return None
    percent = bool(match["percent"]) or unit == "%"
    quantity = _Quantity(re.sub(r"[,\s]", "", match["number"]), percent, "" if unit == "%" else unit)
    return quantity if quantity.value() is not None else None


def parse_number(text: str, percent: str = "number") -> float | None:
    """`text` as ONE number (after LaTeX, unit and format cleanup), else None.

    ``parse_number("$1,000.") == 1000.0``; also ``−3`` (Unicode minus), ``1/2`` and
    ``\\frac{1}{2}`` (0.5), ``x = 5``, a unit after the number (``5 apples``, ``5\\text{ cm}``,
    ``3 m^2``, ``90^\\circ``, ``km/h``: up to four letter-words, none of them a hedge, a comparison,
    a scale or a factor). A trailing ``%`` is dropped (``percent="number"``: 50% reads 50) or divides
    by 100 (``"fraction"``: 0.5). Not a number: "She has 5", "5 or more", "3, 5", "3 5", "about 5".
    """
    if percent not in ("number", "fraction"):
        raise ValueError(f"parse_number percent={percent!r} must be 'number' or 'fraction'.")
    quantity = _quantity(str(text))
    if quantity is None:
        return None
    value = quantity.value()
    return value / 100 if quantity.percent and percent == "fraction" else value


def _readings(quantity: _Quantity, percent: str) -> list[float]:
    """The numbers a quantity may mean: one, or two for a percentage read both ways ("either")."""
    value = quantity.value()
    if not quantity.percent:
        return [value]
    return {"number": [value], "fraction": [value / 100], "either": [value, value / 100]}[percent]


def _numbers_equal(got: float, expected: float) -> bool:
    if got.is_integer() and expected.is_integer():
        return got == expected  # a relative tolerance would pass 999,999 for 1,000,000
    return math.isclose(got, expected, rel_tol=1e-6)


def _same_unit(got: str, expected: str) -> bool:
    """A unit left out is no error; a different one is a different quantity (5 m is not 5 cm)."""
    return not got or not expected or got in (expected, expected + "s", expected + "es") or expected in (got + "s", got + "es")
