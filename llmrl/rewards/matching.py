"""Whether a final answer matches a reference: one value, a set or a tuple, numbers compared here
and other mathematics by HF's math-verify (optional: ``pip install 'llmrl[math]'``, some hundred
times slower). :func:`answers_match` is what the accuracy-type rewards and evaluation call.

A reward is a target the policy optimises, so a false positive here is a reward hack: the rules
below credit one answer, never a list of candidates or a hedge, and a reference that cannot be
read gives None (not applicable) rather than 0.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass

from .answers import (
    _ASSIGNMENT,
    _HEDGE_WORDS,
    PERCENT_MODES,
    _closes_at_end,
    _numbers_equal,
    _quantity,
    _readings,
    _same_unit,
    _unwrap,
    reference_answer,
)

logger = logging.getLogger(__name__)


# ---- The shape of an answer: one value, a set, or a tuple --------------------

# Between the values of a list, at the top level: a comma (not 1,000's), a semicolon, a line break, or
# "or"/"and" (\text{ or } is plain text by then), \lor, \vee, \cup (a union of intervals), \quad.
_SEPARATOR = re.compile(r"(?<!\\)[,;]|\\\\|\n|\\(?:lor|vee|cup|quad|qquad)(?![A-Za-z])|(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])",
                        re.IGNORECASE)
_PLUS_MINUS = re.compile(r"\\pm(?![A-Za-z])|\\mp(?![A-Za-z])|[±∓]")


@dataclass(frozen=True)
class _Shape:
    kind: str  # "one" (text is the value), "set" (items, any order) or "tuple" (items in order, inside brackets)
    text: str = ""
    items: tuple = ()
    brackets: str = ""  # a tuple's: "()", "[]", "[)", "(]"


def _split(text: str, commas_only: bool = False) -> list[str]:
    """`text` cut at the separators outside any bracket; empty pieces dropped."""
    depths, depth = [], 0
    for i, char in enumerate(text):  # \begin{pmatrix} 1 \\ 2 \end{pmatrix} is one value too
        depth -= (char in "})]") + text.startswith("\\end{", i)
        depths.append(depth)
        depth += (char in "{([") + text.startswith("\\begin{", i)
    separator = re.compile(r"(?<!\\),") if commas_only else _SEPARATOR
    cuts = [m for m in separator.finditer(text) if depths[m.start()] == 0
            and not (m[0] == "," and m.start() and re.match(r"\d,\d{3}(?!\d)", text[m.start() - 1:]))]  # 1,000
    pieces = [text[a.end() if a else 0 : b.start() if b else len(text)] for a, b in zip([None, *cuts], [*cuts, None])]
    return [piece.strip() for piece in pieces if piece.strip()]


@functools.lru_cache(maxsize=8192)
def _shape(text: str) -> _Shape:
    """``3, 5`` / ``3 or 5`` / ``\\{3, 5\\}`` / ``\\pm 3``: a set; ``(1, 2)``, ``[1, 2)``: a tuple
    (a point, an interval); ``(5)`` is 5, and anything else one value."""
    text = _unwrap(text)
    pieces = _split(text)
    if len(pieces) > 1:
        return _Shape("set", items=tuple(_shape(piece) for piece in pieces))
    text = pieces[0] if pieces else ""
    if text.startswith("\\{") and text.endswith("\\}") and _closes_at_end(text, 1):
        pieces = _split(text[2:-2])
        return _shape(pieces[0]) if len(pieces) == 1 else _Shape("set", items=tuple(_shape(p) for p in pieces))
    if text[:1] in ("(", "[") and text[-1:] in (")", "]") and _closes_at_end(text):
        pieces = _split(text[1:-1], commas_only=True)
        if len(pieces) > 1:
            return _Shape("tuple", items=tuple(_shape(p) for p in pieces), brackets=text[0] + text[-1])
        if text[0] + text[-1] in ("()", "[]"):  # brackets around one value group it
            return _shape(text[1:-1])
    if len(_PLUS_MINUS.findall(text)) == 1:  # a ± b is the set {a + b, a - b}
        return _Shape("set", items=tuple(_shape(_PLUS_MINUS.sub(sign, text)) for sign in ("+", "-")))
    return _Shape("one", text)


def _leaves(shape: _Shape):
    if shape.kind == "one":
        yield shape.text
    for item in shape.items:
        yield from _leaves(item)


# ---- What a reference is: a number, a word, an expression, or unreadable --------------------

_MATH = re.compile(r"[\d\\=+*/^_{}<>|-]")  # a reference that is mathematics rather than a word
_LATEX = re.compile(r"\\[A-Za-z]|\^|\{")  # an answer that may be an expression rather than prose
# Relations, and bars ("3 | 5", which math-verify reads as 5): allowed only when the reference has one (|x|, y = 2x).
_RELATION = re.compile(r"(?<![<>!])=|<|>|[≤≥≠≈|]|\\(?:le|ge|leq|geq|neq|ne|lt|gt|leqslant|geqslant|approx|sim|simeq|"
                       r"equiv|in|notin|subset|subseteq|to|mid|vert|Vert)(?![A-Za-z])")
_HEDGE_COMMANDS = re.compile(r"\\(?:approx|sim|simeq|lor|vee|ldots|dots|cdots|pm|mp)(?![A-Za-z])|[±∓?]")
_SIDE_BY_SIDE = re.compile(r"\d\.?(?:\s|~|\\[,;:! ]|\\q?quad(?![A-Za-z]))+[-+]?\.?\d")  # "3 5", "3\,5": two numbers
_FUNCTIONS = frozenset("sin cos tan cot sec csc log exp lim max min gcd lcm det mod arg deg dim ker sup inf".split())
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion half halves third thirds quarter quarters fourth fourths fifth fifths tenth tenths".split()
)


def _words(text: str) -> list[str]:
    """The letter-words of `text` outside LaTeX command names, lower-cased."""
    return re.findall(r"[a-z]+", re.sub(r"\\(?:begin|end)\{\w+\*?\}|\\[A-Za-z]+", " ", text).lower())


def _prose(text: str, allowed: frozenset = frozenset()) -> bool:
    """Whether `text` has words in it (beyond single-letter variables and function names): "about",
    "or", "The answer is"."""
    return any(word not in allowed and (word in _HEDGE_WORDS or len(word) > 2 and word not in _FUNCTIONS)
               for word in _words(text))


@functools.lru_cache(maxsize=8192)
def _kind(text: str) -> str | None:
    """A reference value's kind: "number" (5, 1/2, 25%, 5 cm, x = 5), "text" (Paris, B: no digits or
    mathematics), "math" (\\frac{\\sqrt{3}}{2}, x+1), or None when it cannot be checked: empty, a
    number in words ("forty two"), or a sentence with numbers in it ("She had 5 apples")."""
    text = _unwrap(text)
    if not text:
        return None
    if _quantity(text) is not None:
        return "number"
    if not _MATH.search(re.sub(r"(?<=[A-Za-z]{2})-(?=[A-Za-z]{2})", " ", text)):  # Jean-Paul is a word
        words = _words(text)
        in_words = any(w in _NUMBER_WORDS for w in words) and all(w in _NUMBER_WORDS | {"a", "an", "and", "point", "minus"}
                                                                  for w in words)
        return None if in_words or not words else "text"
    return None if _prose(text) else "math"


def _reference_shape(reference) -> _Shape | None:
    """The reference's shape, or None when it cannot be checked (then no answer can be scored
    against it: None, "not applicable", not a 0 that would also fall on the right answers)."""
    answer = reference_answer(reference)
    shape = _shape(answer)
    kinds = [_kind(leaf) for leaf in _leaves(shape)] or [None]
    if shape.kind != "one" and all(kind == "text" for kind in kinds):  # "Paris, France": text, as written
        return _Shape("one", _unwrap(answer))
    if None in kinds or len(kinds) > 1 and "text" in kinds:  # "5 or more": a value and words
        return None
    if any(kind == "math" and not _latex_readable(leaf) for kind, leaf in zip(kinds, _leaves(shape))):
        return None
    return shape


def _one_expression(answer: str, reference: str | None) -> bool:
    """Whether `answer` is one mathematical expression that may be checked symbolically against
    `reference` (None: a number): no words, hedge, relation (unless the reference has one), second
    value side by side, and, against a number, no list inside it (``\\max(3, 5)``)."""
    text = _ASSIGNMENT.sub("", answer, count=1)
    allowed = frozenset(_words(reference or ""))
    if _prose(text, allowed) or _SIDE_BY_SIDE.search(text) or _HEDGE_COMMANDS.search(text):
        return False
    if _RELATION.search(text) and not (reference and _RELATION.search(_ASSIGNMENT.sub("", reference, count=1))):
        return False
    return reference is not None or not re.search(r"(?<!\\)[,;&]|\\[{}\\]", text)


def _match_one(answer: str, reference: str, percent: str) -> bool:
    kind = _kind(reference)
    if kind == "text":
        return _normalise_text(answer) == _normalise_text(_unwrap(reference))
    if kind == "number":
        expected, got = _quantity(reference), _quantity(answer)
        if got is not None:
            return _same_unit(got.unit, expected.unit) and any(
                _numbers_equal(g, e) for g in _readings(got, percent) for e in _readings(expected, percent))
        if not (_LATEX.search(answer) and _one_expression(answer, None)) or _math_verify(needed_for=None) is None:
            return False  # read by its last number, \sqrt{2} would pass for 2: a false reward is worse than a missed one
        number = expected.number if "e" not in expected.number.lower() else repr(expected.value())
        targets = [number] if not expected.percent or percent != "fraction" else []
        targets += [f"({number})/100"] if expected.percent and percent != "number" else []
        return any(symbolic_equal(_ASSIGNMENT.sub("", answer, count=1), target) for target in targets)
    if _normalise_text(answer) == _normalise_text(reference):
        return True
    if not _one_expression(answer, reference):
        return False
    return symbolic_equal(_ASSIGNMENT.sub("", answer, count=1), _ASSIGNMENT.sub("", reference, count=1))


def _matches(answer: _Shape, reference: _Shape, percent: str) -> bool:
    if reference.kind == "one":
        return answer.kind == "one" and _match_one(answer.text, reference.text, percent)
    if (answer.kind, len(answer.items), answer.brackets) != (reference.kind, len(reference.items), reference.brackets):
        return False
    if reference.kind == "tuple":
        return all(_matches(a, r, percent) for a, r in zip(answer.items, reference.items))
    pairs = [[_matches(a, r, percent) for a in answer.items] for r in reference.items]
    return _each_matched_once(pairs)


def _each_matched_once(pairs: list[list[bool]]) -> bool:
    """Whether every reference item (row) can take its own answer item (column): a bipartite matching."""
    owner: dict[int, int] = {}

    def take(row: int, seen: set) -> bool:
        for column, ok in enumerate(pairs[row]):
            if ok and column not in seen:
                seen.add(column)
                if column not in owner or take(owner[column], seen):
                    owner[column] = row
                    return True
        return False

    return all(take(row, set()) for row in range(len(pairs)))


def _normalise_text(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def answers_match(predicted: str | None, reference, percent: str = "number") -> bool | None:
    """Whether an extracted answer equals the reference answer; None when the reference cannot be checked.

    ``answers_match("1,000", "1000.0") is True``. The reference is first reduced by
    :func:`reference_answer` (GSM8K's ``#### 72``, a solution's last ``\\boxed{}``). Then:

    - ONE answer against one reference: a list (``3, 5``, ``\\{3, 5\\}``, ``(3, 5)``), a hedge (``3 or
      5``, ``\\pm 5``, ``5 or more``, ``\\geq 5``, ``\\approx 5``, ``5?``), two numbers (``3 5``,
      ``2+3=5``) or words around the number (``The answer is 5``) do not match. Harmless wrappers
      do not count: ``$5$``, ``\\$5``, ``\\text{5}``, ``(5)``, ``x = 5``, a trailing period, a unit.
    - a numeric reference is compared numerically (:func:`parse_number`): two whole numbers exactly,
      anything else within a relative tolerance of 1e-6. A unit on both sides must be the same one
      (``5 m`` is not ``5 cm``; plurals agree); a unit on one side only is fine. An answer that is
      LaTeX but not a number (``2^{10}``, ``\\sqrt{4}``) goes to math-verify; without it, it does not
      match. `percent` reads a trailing % on either side as the number itself ("number", the default:
      GSM8K asks "what percent" and answers 25), as a fraction ("fraction": 25% = 0.25), or both ("either").
    - a list reference is compared as one: a bare list (``2, 3``, "enter all the solutions") or a set
      (``\\{2, 3\\}``, ``\\pm 2``, ``2 or 3``) in any order, each element matched once; a tuple or an
      interval (``(1, 2)``, ``[1, 2)``) in order with the same brackets. A list of words is text.
    - a word reference ("Paris", "B") must equal the prediction after whitespace normalisation
      (case-sensitive; a trailing period, ``\\text{}`` and brackets around it are ignored).
    - a mathematical reference (``\\frac{\\sqrt{3}}{2}``, ``x+1``) matches an equal text at once, else
      by mathematical equivalence with math-verify; an ImportError names ``pip install 'llmrl[math]'``
      if it is missing.
    - None: the reference is empty, a number in words ("forty two"), a sentence ("She had 5 apples"),
      or LaTeX that math-verify cannot parse; no answer is right or wrong against it (TRL returns None too).
    """
    if percent not in PERCENT_MODES:
        raise ValueError(f"answers_match percent={percent!r} is not valid; choose one of {list(PERCENT_MODES)}.")
    shape = _reference_shape(reference)
    if shape is None or predicted is None:
        return None if shape is None else False
    answer = _shape(str(predicted))
    if shape.kind == "one" and _kind(shape.text) == "text":  # words are compared whole: "Paris, France"
        return _match_one(answer.text if answer.kind == "one" else _unwrap(predicted), shape.text, percent)
    return _matches(answer, shape, percent)


# ---- math-verify, for answers that are not numbers --------------------

_MISSING = object()
_math_verify_module = None
_warned_missing = False


def _load_math_verify():
    """The math_verify module, or None when it is not installed."""
    global _math_verify_module
    if _math_verify_module is None:
        try:
            import math_verify
        except ImportError:
            math_verify = _MISSING
        _math_verify_module = math_verify
    return None if _math_verify_module is _MISSING else _math_verify_module


def _math_verify(needed_for: tuple[str, str] | None):
    """The math_verify module, or None when it is not installed and `needed_for` is None (the caller
    has a numeric fallback); when it is `(predicted, reference)`, raise an ImportError that says so."""
    global _warned_missing
    module = _load_math_verify()
    if module is not None:
        return module
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


def _time_limit() -> int | None:
    # math-verify's time limits use SIGALRM, which only the main thread may set; elsewhere they are off.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _latex_readable(reference: str) -> bool:
    """Whether math-verify reads `reference` as mathematics (True when it is not installed: a check
    that needs it will say so)."""
    return _load_math_verify() is None or _parses(reference)


@functools.lru_cache(maxsize=8192)
def _parses(reference: str) -> bool:
    parsed = _load_math_verify().parse(_as_latex(reference), parsing_timeout=_time_limit())
    return any(not isinstance(item, str) for item in parsed)  # a bare string is math-verify giving up


@functools.lru_cache(maxsize=8192)  # a group's completions often repeat one answer, at ~10 ms a check
def symbolic_equal(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of two LaTeX answers by math-verify (``pip install 'llmrl[math]'``).

    ``symbolic_equal("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}") is True``. math-verify's own
    time limits use SIGALRM, which only the main thread may set; elsewhere they are off.
    """
    math_verify = _math_verify(needed_for=(predicted, reference))
    limit = _time_limit()
    gold = math_verify.parse(_as_latex(reference), parsing_timeout=limit)
    answer = math_verify.parse(_as_latex(predicted), parsing_timeout=limit)
    return bool(gold and answer and math_verify.verify(gold, answer, timeout_seconds=limit))
