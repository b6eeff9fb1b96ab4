"""Reading completions and final answers: chat or string text, ``\\boxed{}``/tag/number extraction, matching.

String functions shared by the accuracy-type rewards and by evaluation. Numbers are compared here,
quickly; only answers that are not numbers (``\\frac{\\sqrt{3}}{2}``, ``x+1``, intervals) go to HF's
math-verify, which is optional (``pip install 'llmrl[math]'``) and some hundred times slower.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading

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


NUMBER = re.compile(
    r"(?:(?<![\w.])[-−])?"  # a sign, unless it is a hyphen ("5-3", "2024-01")
    r"(?:\\[dt]?frac(?:\{\d+\}\{\d+\}|\d\d)"  # \frac{7}{2}, \frac12
    r"|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?)(?:\\?%)?"  # 1,000 | 12.5 | 1e3 | 1/2; 25%
    r"|(?<![\w.])[-−]?\.\d+"  # .5
)
ANSWER_MODES = ("auto", "boxed", "answer_tag", "last_number")
PERCENT_MODES = ("number", "fraction", "either")

# A \frac right after a digit is a mixed number ("1\frac{1}{2}"), left to the symbolic check.
_FRAC = re.compile(r"(?<!\d)\\[dt]?frac(?:\{([^{}]*)\}\{([^{}]*)\}|(\d)(\d))")  # \frac{1}{2}, \frac12
_UNIT_TEXT = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{[^{}]*[A-Za-z][^{}]*\}")  # 5\text{ cm}
# A number in braces or a font command: {5}, \mathbf{5}, \text{5} (after \frac{a}{b} is read).
_WRAPPED_NUMBER = re.compile(r"(?:\\(?:mathbf|boldsymbol|bm|mathrm|textbf|textrm|text|displaystyle)\s*)?\{([-−+\d.,\s/%]+)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # x = 5
_TRAILING_WORDS = re.compile(r"(?<=[\d.%])\s*[A-Za-z][A-Za-z\s.]*(?:\^\{?\d\}?)?\s*$")  # 5 apples, 3 m^2
_PERCENT = re.compile(r"\s*\\?%$")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:/(?:\d+\.?\d*|\.\d+))?")
_LATEX = re.compile(r"\\[A-Za-z]|\^|\{")  # a prediction that may be an expression rather than prose
_MATH = re.compile(r"[\\^_{}=+*/()\[\]<>\d-]")  # a reference that is mathematics rather than a word


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
    found = list(re.finditer(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL))
    return (found[-1][1].strip(), found[-1].start(), found[-1].end()) if found else None


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
    (the last number: ``-3``, ``1,000``, ``2.5``, ``1e3``, ``1/2``, ``\\frac{7}{2}``, ``25%``), and
    ``auto``: of the last box and the last tag, the one written last (a box inside the tag counts
    as the tag's answer), else the last number.
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


def parse_number(text: str, percent: str = "number") -> float | None:
    """`text` as a number when it is one (after LaTeX, unit and format cleanup), else None.

    ``parse_number("$1,000.") == 1000.0``; also ``−3`` (Unicode minus), ``1/2`` and
    ``\\frac{1}{2}`` (0.5), ``x = 5``, units after the number (``5 apples``, ``5\\text{ cm}``,
    ``3 m^2``, ``90^\\circ``). A trailing ``%`` is dropped (``percent="number"``: 50% reads 50) or
    divides by 100 (``"fraction"``: 0.5). "She has 5" is not a number: callers fall back to its last number.
    """
    if percent not in ("number", "fraction"):
        raise ValueError(f"parse_number percent={percent!r} must be 'number' or 'fraction'.")
    text = str(text).replace("−", "-").replace("{,}", ",")
    text = _DEGREES.sub("", _UNIT_TEXT.sub(" ", text))
    text = _FRAC.sub(lambda m: f"({m[3] if m[1] is None else m[1]})/({m[4] if m[2] is None else m[2]})", text)
    text = _WRAPPED_NUMBER.sub(r"\1", text)
    # "5 6" must not read as 56: only the spaces around a fraction bar go.
    text = re.sub(r"\\?\$|\\[!,;: ]|\\left|\\right|[()]", "", text)
    text = re.sub(r"\s*/\s*", "/", text).strip()
    text = _TRAILING_WORDS.sub("", _ASSIGNMENT.sub("", text))
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text).rstrip(".")
    text, is_percent = _PERCENT.sub("", text), bool(_PERCENT.search(text))
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    numerator, _, denominator = text.partition("/")
    if denominator and float(denominator) == 0:
        return None
    value = float(numerator) / float(denominator) if denominator else float(numerator)
    return value / 100 if is_percent and percent == "fraction" else value


def _readings(text: str, percent: str) -> list[float]:
    """The numbers `text` may mean: none, one, or two for a percentage read both ways ("either")."""
    modes = ("number", "fraction") if percent == "either" else (percent,)
    return list(dict.fromkeys(v for v in (parse_number(text, m) for m in modes) if v is not None))


def _numbers_equal(got: float, expected: float) -> bool:
    if got.is_integer() and expected.is_integer():
        return got == expected  # a relative tolerance would pass 999,999 for 1,000,000
    return math.isclose(got, expected, rel_tol=1e-6)


def _normalise_text(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def answers_match(predicted: str | None, reference, percent: str = "number") -> bool:
    """Whether an extracted answer equals the reference answer.

    ``answers_match("1,000", "1000.0") is True``. The reference is first reduced by
    :func:`reference_answer` (GSM8K's ``#### 72``, a solution's last ``\\boxed{}``). Then:

    - a numeric reference is compared numerically with the prediction (:func:`parse_number`): two
      whole numbers exactly, anything else within a relative tolerance of 1e-6. A prediction that is
      prose ("She has 5 apples") is read by its last number; one that is LaTeX but not a number
      (``2^{10}``, ``\\sqrt{4}``) goes to math-verify; without it, it does not match (its last
      number would credit ``\\sqrt{2}`` for 2: a false reward is worse for RL than a missed one).
      `percent` reads a trailing % on either side as the number itself ("number", the default:
      GSM8K asks "what percent" and answers 25), as a fraction ("fraction": 25% = 0.25), or both ("either").
    - any other reference equal to the prediction after whitespace normalisation (case-sensitive; a
      trailing period is ignored) matches at once; a word ("Paris", "B") must match exactly so.
    - a mathematical reference (``\\frac{\\sqrt{3}}{2}``, ``x+1``, ``(1, 2)``) is compared by
      mathematical equivalence with math-verify; an ImportError names ``pip install 'llmrl[math]'``
      if it is missing.
    """
    if percent not in PERCENT_MODES:
        raise ValueError(f"answers_match percent={percent!r} is not valid; choose one of {list(PERCENT_MODES)}.")
    if predicted is None:
        return False
    reference = reference_answer(reference)
    expected = _readings(reference, percent)
    if expected:
        got = _readings(predicted, percent)
        if not got and _LATEX.search(predicted):
            return _math_verify(needed_for=None) is not None and symbolic_equal(predicted, reference)
        if not got:
            last = _last_number(predicted)
            got = _readings(last, percent) if last is not None else []
        return any(_numbers_equal(g, e) for g in got for e in expected)
    if _normalise_text(predicted) == _normalise_text(reference):
        return True
    if not _MATH.search(reference):
        return False
    return symbolic_equal(predicted, reference)


# ---- math-verify, for answers that are not numbers --------------------

_MISSING = object()
_math_verify_module = None
_warned_missing = False


def _math_verify(needed_for: tuple[str, str] | None):
    """The math_verify module, or None when it is not installed and `needed_for` is None (the caller
    has a numeric fallback); when it is `(predicted, reference)`, raise an ImportError that says so."""
    global _math_verify_module, _warned_missing
    if _math_verify_module is None:
        try:
            import math_verify
        except ImportError:
            math_verify = _MISSING
        _math_verify_module = math_verify
    if _math_verify_module is not _MISSING:
        return _math_verify_module
    if needed_for is not None:
        predicted, reference = needed_for
        raise ImportError(
            f"comparing the answer {predicted!r} with the reference {reference!r} needs a symbolic (LaTeX) check, "
            "which uses HF's math-verify package. Install it with: pip install 'llmrl[math]'"
        )
    if not _warned_missing:
        logger.warning("math-verify is not installed, so LaTeX answers to numeric references that are not plain numbers "
                       "(2^{10}, \\sqrt{4}) count as wrong; pip install 'llmrl[math]' to compare them symbolically.")
        _warned_missing = True
    return None


def _as_latex(text: str) -> str:
    # math-verify finds answers in $...$ or \boxed{}; a bare extracted answer is boxed so that it is
    # read whole ("x+1", not its first number).
    return text if "$" in text or "\\boxed" in text else f"\\boxed{{{text}}}"


@functools.lru_cache(maxsize=8192)  # a group's completions often repeat one answer, at ~10 ms a check
def symbolic_equal(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of two LaTeX answers by math-verify (``pip install 'llmrl[math]'``).

    ``symbolic_equal("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}") is True``. math-verify's own
    time limits use SIGALRM, which only the main thread may set; elsewhere they are off.
    """
    math_verify = _math_verify(needed_for=(predicted, reference))
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = math_verify.parse(_as_latex(reference), parsing_timeout=limit)
    answer = math_verify.parse(_as_latex(predicted), parsing_timeout=limit)
    return bool(gold and answer and math_verify.verify(gold, answer, timeout_seconds=limit))
