"""Answer checking that cannot be gamed (issue 16): a reward is what the policy optimises, so a
false positive of the checker is a reward hack the policy will find.

Each case says why it scores what it scores. The rules under test (llmrl/rewards/matching.py and answers.py):

- a box or answer tag holds ONE answer: a list, a hedge ("or", "and", ±, an inequality, "about"),
  several numbers, or text around the number scores 0 against a single reference; harmless
  wrappers ($...$, \\text{}, a trailing period, x =, a unit word) do not count as text;
- a reference that is itself a list compares as one: a bare list or a set in any order, a tuple or
  an interval in order with the same brackets;
- without a box or tag, the last number that stands alone as a token counts (not the 2 of AZYUK2A);
- several boxes: the last one counts (its writer's final word; it holds one value, so a policy gains
  nothing by writing more boxes);
- a reference that cannot be read as an answer ("forty two") is not applicable: None, never 0.
"""

import json
import math
import pickle
import re
from pathlib import Path

import pytest

from llmrl.rewards import (
    REWARD_FUNCTIONS,
    answers_match,
    extract_answer,
    make_accuracy_reward,
    make_cosine_length_reward,
    make_format_reward,
    make_integer_answer_reward,
    make_length_reward,
    make_repetition_penalty_reward,
    make_xml_count_reward,
    reference_answer,
    resolve_reward_funcs,
    score_completions,
)

ROOT = Path(__file__).resolve().parents[1]
accuracy = REWARD_FUNCTIONS["accuracy"]


def score(completion, answer, fn=accuracy, **columns) -> float | None:
    """`fn` on one completion, as a string and as a chat message; the two must agree."""
    as_text = fn(prompts=["Q?"], completions=[completion], answer=[answer], **columns)[0]
    as_chat = fn(prompts=[[{"role": "user", "content": "Q?"}]],
                 completions=[[{"role": "assistant", "content": completion}]], answer=[answer], **columns)[0]
    assert as_text == as_chat, (as_text, as_chat)
    return as_text


def case(completion, answer, expected, id):
    return pytest.param(completion, answer, expected, id=id)


# ---- one answer per box: numbers (no math-verify needed) --------------------

ADVERSARIAL = [
    # Lists: a policy that boxes every candidate must not collect the reward of the right one.
    case("\\boxed{3, 5}", "5", 0.0, "list-comma"),
    case("\\boxed{3,5}", "5", 0.0, "list-comma-no-space"),  # not a thousands separator: 2 values (or 3.5)
    case("\\boxed{3; 5}", "5", 0.0, "list-semicolon"),
    case("\\boxed{\\{3, 5\\}}", "5", 0.0, "set"),
    case("\\boxed{(3, 5)}", "5", 0.0, "tuple"),
    case("\\boxed{[3, 5]}", "5", 0.0, "bracket-list"),
    case("<answer>3, 4, 5</answer>", "4", 0.0, "tag-list"),
    case("\\boxed{1, 2, \\ldots, 10}", "10", 0.0, "list-with-dots"),
    case("\\boxed{3 5}", "5", 0.0, "two-numbers-side-by-side"),  # not 35, and not its last number
    case("\\boxed{3\\,5}", "5", 0.0, "two-numbers-thin-space"),  # \, is a thousands gap only before 3 digits
    case("\\boxed{(3)(5)}", "35", 0.0, "parentheses-do-not-glue-digits"),  # it is 3 times 5
    case("\\boxed{2(3)}", "23", 0.0, "parentheses-do-not-glue-digits-2"),
    # Hedges: several values joined by words or symbols are still several values.
    case("\\boxed{3 or 5}", "5", 0.0, "or"),
    case("\\boxed{3 \\text{ or } 5}", "5", 0.0, "text-or"),
    case("\\boxed{3 \\lor 5}", "5", 0.0, "lor"),
    case("\\boxed{3 and 5}", "5", 0.0, "and"),
    case("<answer>either 3 or 5</answer>", "5", 0.0, "either-or"),
    case("\\boxed{3 \\text{ or } \\frac{5}{1}}", "5", 0.0, "or-with-fraction"),
    case("\\boxed{\\pm 5}", "5", 0.0, "plus-minus"),  # ±5 is {5, -5}
    case("\\boxed{5 \\pm 1}", "5", 0.0, "plus-minus-tolerance"),
    case("\\boxed{3-5}", "5", 0.0, "range-with-hyphen"),  # a range (or -2), not 5
    case("\\boxed{3 to 5}", "5", 0.0, "range-with-to"),
    case("\\boxed{x = 3, y = 5}", "5", 0.0, "two-assignments"),
    case("\\boxed{2+3=5}", "5", 0.0, "working-in-the-box"),  # several numbers; the box is for the answer
    # Qualifiers: one number, but not asserted as the answer.
    case("\\boxed{5 or more}", "5", 0.0, "or-more"),
    case("\\boxed{at least 5}", "5", 0.0, "at-least"),
    case("\\boxed{\\geq 5}", "5", 0.0, "geq"),
    case("\\boxed{x \\geq 5}", "5", 0.0, "x-geq"),
    case("\\boxed{x < 6}", "5", 0.0, "x-less-than"),
    case("\\boxed{\\approx 5}", "5", 0.0, "approx"),
    case("\\boxed{about 5}", "5", 0.0, "about"),
    case("\\boxed{not 5}", "5", 0.0, "not"),
    case("\\boxed{5?}", "5", 0.0, "question-mark"),
    case("\\boxed{5 million}", "5", 0.0, "scale-word"),  # 5,000,000, not 5
    case("\\boxed{5k}", "5", 0.0, "scale-letter"),
    case("\\boxed{5 pi}", "5", 0.0, "factor-word"),  # 5 pi is not 5
    case("\\boxed{5 x}", "5", 0.0, "variable-after-a-space"),
    case("\\boxed{2xy}", "2", 0.0, "variables-glued"),  # a word touching a number is a unit only if it is one (5cm)
    # Text around the number: the tag and the box hold the answer, not a sentence about it.
    case("\\boxed{The answer is 5}", "5", 0.0, "box-sentence"),
    case("<answer>The answer is 5</answer>", "5", 0.0, "tag-sentence"),
    case("\\boxed{\\text{The answer is } 5}", "5", 0.0, "box-text-sentence"),
    case("<answer>5 apples and 3 oranges</answer>", "5", 0.0, "two-quantities"),
    case("\\boxed{5 \\text{ apples or } 6}", "5", 0.0, "unit-then-hedge"),
    case("\\boxed{\\text{five}}", "5", 0.0, "number-word"),  # words are not read as numbers
    case("<answer><answer>7</answer> 8</answer>", "8", 0.0, "nested-tag-leftover-text"),
    # Units: a different unit than the reference's is a different quantity.
    case("\\boxed{5 m}", "5 cm", 0.0, "other-unit"),
    case("\\boxed{18 cents}", "18 dollars", 0.0, "other-unit-word"),
    case("<answer>5 kg</answer>", "5\\text{ g}", 0.0, "other-latex-unit"),
    # Digits inside words: the fallback number must stand alone.
    case("AZYUK2A", "2", 0.0, "digit-in-word"),
    case("x2y", "2", 0.0, "digit-between-letters"),
    case("The code is A2", "2", 0.0, "digit-ending-a-word"),
    case("H2O is water", "2", 0.0, "formula"),
    case("see x_2", "2", 0.0, "subscript"),
    case("version v1.2 is out", "1.2", 0.0, "version-string"),
    case("version v1.2 is out", "2", 0.0, "version-string-last-part"),
    case("it came 5th", "5", 0.0, "ordinal"),
    case("it is 2.5x faster", "2", 0.0, "decimal-glued-to-a-letter"),
    case("so 1/x", "1", 0.0, "fraction-of-a-variable"),
    case("we get x^2", "2", 0.0, "exponent"),
    case("we get 2^10", "2", 0.0, "base-of-a-power"),
    # Several boxes: the last one counts, and it is one value.
    case("\\boxed{3} no, \\boxed{5}", "3", 0.0, "earlier-box-does-not-count"),
    case("<answer>3</answer> no: <answer>5</answer>", "3", 0.0, "earlier-tag-does-not-count"),
    # Negative numbers and signs.
    case("\\boxed{3}", "-3", 0.0, "sign-matters"),
    case("It drops 5-3", "-3", 0.0, "hyphen-is-not-a-minus"),
    case("\\boxed{\\pm 3}", "-3", 0.0, "plus-minus-is-two-values"),
    # Thousands separators: only real ones.
    case("\\boxed{3,00}", "300", 0.0, "bad-thousands-group"),
    case("\\boxed{3, 000}", "3000", 0.0, "spaced-comma-is-a-list"),
    case("\\boxed{1,0000}", "10000", 0.0, "bad-thousands-group-2"),
    # Percentages: a hedge of percentages is still a hedge.
    case("\\boxed{25\\% or 30\\%}", "25", 0.0, "percent-hedge"),
    case("\\boxed{25\\%, 30\\%}", "25", 0.0, "percent-list"),
    # Empty or missing answers.
    case("\\boxed{}", "5", 0.0, "empty-box"),
    case("<answer> </answer>", "5", 0.0, "empty-tag"),
]

STILL_CORRECT = [
    # The right answer in the forms models write must keep its reward, or the reward is useless.
    case("\\boxed{5}", "5", 1.0, "box"),
    case("<answer>\n5\n</answer>", "5", 1.0, "tag"),
    case("\\boxed{$5$}", "5", 1.0, "dollar-math"),
    case("\\boxed{\\$5}", "5", 1.0, "currency"),
    case("<answer>$5.00</answer>", "5", 1.0, "currency-cents"),
    case("\\boxed{5.}", "5", 1.0, "trailing-period"),
    case("\\boxed{\\text{5}}", "5", 1.0, "text-wrapper"),
    case("\\boxed{\\mathbf{5}}", "5", 1.0, "bold"),
    case("\\boxed{(5)}", "5", 1.0, "parentheses"),
    case("\\boxed{x = 5}", "5", 1.0, "assignment"),
    case("\\boxed{x=5 \\text{ cm}}", "5", 1.0, "assignment-and-unit"),
    case("\\boxed{5 cm}", "5", 1.0, "unit-word"),
    case("\\boxed{5\\text{ cm}}", "5 cm", 1.0, "same-unit"),
    case("\\boxed{5\\,\\mathrm{cm}}", "5 cm", 1.0, "same-unit-mathrm"),
    case("\\boxed{5}", "5 cm", 1.0, "unit-left-out"),
    case("<answer>18 dollars.</answer>", "$18", 1.0, "dollars"),
    case("<answer>3 dollars</answer>", "3 dollar", 1.0, "plural-unit"),
    case("\\boxed{5 km/h}", "5", 1.0, "compound-unit"),
    case("\\boxed{5cm}", "5", 1.0, "glued-unit"),
    case("\\boxed{5\\text{ cm}^2}", "5 cm^2", 1.0, "same-unit-with-power"),
    case("\\boxed{\\$18 \\text{ each}}", "18", 1.0, "currency-and-unit-word"),
    case("\\boxed{12 square feet}", "12", 1.0, "two-word-unit"),
    case("\\boxed{60 miles per hour}", "60", 1.0, "unit-with-per"),
    case("\\boxed{3 m^2}", "3", 1.0, "unit-with-power"),
    case("\\boxed{90^\\circ}", "90", 1.0, "degrees"),
    case("\\boxed{90^\\circ}", "90 degrees", 1.0, "degree-sign-is-degrees"),
    case("\\boxed{-3}", "-3", 1.0, "negative"),
    case("\\boxed{−3}", "-3", 1.0, "unicode-minus"),
    case("\\boxed{x = -3}", "-3", 1.0, "negative-assignment"),
    case("\\boxed{3,000}", "3000", 1.0, "thousands"),
    case("\\boxed{3{,}000}", "3000", 1.0, "latex-thousands"),
    case("\\boxed{3\\,000}", "3000", 1.0, "thin-space-thousands"),
    case("\\boxed{1,000,000}", "1000000", 1.0, "millions"),
    case("\\boxed{32348}", "\\$32,\\!348", 1.0, "negative-space-thousands"),  # MATH writes 32,\!348
    case("\\boxed{-1,000}", "-1000", 1.0, "negative-thousands"),
    case("\\boxed{\\frac{1}{2}}", "0.5", 1.0, "fraction"),
    case("\\boxed{\\dfrac12}", "0.5", 1.0, "brace-less-fraction"),
    case("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0, "negative-fraction"),
    case("\\boxed{\\left(\\frac{1}{2}\\right)}", "0.5", 1.0, "fraction-in-parentheses"),
    case("\\boxed{1/2}", "\\frac{1}{2}", 1.0, "slash-fraction-latex-reference"),
    case("\\boxed{0.5}", "\\frac12", 1.0, "decimal-latex-reference"),
    case("\\boxed{25\\%}", "25", 1.0, "percent"),
    case("<answer>25 percent</answer>", "25", 1.0, "percent-word"),
    case("\\boxed{25\\%}", "25%", 1.0, "percent-reference"),
    case("\\boxed{1.5e-3}", "0.0015", 1.0, "scientific"),
    case("\\boxed{3} no, \\boxed{5}", "5", 1.0, "last-box-counts"),
    case("<answer>3</answer> no: <answer>5</answer>", "5", 1.0, "last-tag-counts"),
    case("<answer><answer>8</answer></answer>", "8", 1.0, "nested-tags"),
    # The fallback: the last number standing alone, in the forms prose writes it.
    case("The answer is 2.", "2", 1.0, "end-of-sentence"),
    case("so x = -3", "-3", 1.0, "negative-fallback"),
    case("so x=-3.", "-3", 1.0, "negative-after-equals"),
    case("It costs $5", "5", 1.0, "dollar-fallback"),
    case("We need 3,000 bricks", "3000", 1.0, "thousands-fallback"),
    case("half is 1/2", "0.5", 1.0, "slash-fraction-fallback"),
    case("half is 0.5", "1/2", 1.0, "decimal-fallback"),
    case("half is .5", "0.5", 1.0, "bare-decimal-fallback"),
    case("It is **7**", "7", 1.0, "markdown-bold"),
    case("the total (7)", "7", 1.0, "parenthesised"),
    case("答案是5", "5", 1.0, "cjk-text-has-no-spaces"),
    case("It drops to −3", "-3", 1.0, "unicode-minus-fallback"),
    case("It rose 25%", "25", 1.0, "percent-fallback"),
    case("3 or 5? I say 5", "5", 1.0, "prose-hedge-last-number"),  # unmarked prose: its last number is the answer
    case("Total: 1e3", "1000", 1.0, "scientific-fallback"),
]


@pytest.mark.parametrize("completion, answer, expected", ADVERSARIAL + STILL_CORRECT)
def test_one_answer_per_box(completion, answer, expected):
    assert score(completion, answer) == expected


# ---- references that are lists --------------------

LIST_REFERENCES = [
    # A bare list is the set of solutions ("enter all the solutions, separated by commas"): any order.
    case("\\boxed{3, 2}", "2, 3", 1.0, "bare-list-any-order"),
    case("\\boxed{\\{3, 2\\}}", "2, 3", 1.0, "set-for-bare-list"),
    case("\\boxed{x = 3 \\text{ or } x = 2}", "2, 3", 1.0, "or-list-for-bare-list"),
    case("\\boxed{2}", "2, 3", 0.0, "one-of-the-list"),  # half the answer is not the answer
    case("\\boxed{2, 3, 4}", "2, 3", 0.0, "extra-element"),  # an extra value is a hedge
    case("\\boxed{2, 2}", "2, 3", 0.0, "repeated-element"),  # each reference element matched once
    case("\\boxed{3, 0.5}", "\\frac12, 3", 1.0, "elements-compared-as-numbers"),
    case("\\boxed{2, -2}", "\\pm 2", 1.0, "plus-minus-reference"),
    case("\\boxed{\\pm 2}", "-2, 2", 1.0, "plus-minus-answer"),
    case("\\boxed{2}", "\\pm 2", 0.0, "half-of-plus-minus"),
    # A set in braces: any order, but a tuple is not a set.
    case("\\boxed{2, 1}", "\\{1, 2\\}", 1.0, "bare-list-for-set"),
    case("\\boxed{(1, 2)}", "\\{1, 2\\}", 0.0, "tuple-for-set"),
    # A tuple or an interval: in order, with the same brackets.
    case("\\boxed{(1, 2)}", "(1, 2)", 1.0, "tuple"),
    case("\\boxed{(1,2)}", "(1, 2)", 1.0, "tuple-spacing"),
    case("\\boxed{(2, 1)}", "(1, 2)", 0.0, "tuple-order"),
    case("\\boxed{[1, 2]}", "(1, 2)", 0.0, "closed-for-open-interval"),
    case("\\boxed{[1, 2)}", "[1, 2)", 1.0, "half-open-interval"),
    case("\\boxed{1, 2}", "(1, 2)", 0.0, "bare-list-for-tuple"),
    case("\\boxed{(3, 4), (1, 2)}", "(1, 2), (3, 4)", 1.0, "set-of-pairs"),
    case("\\boxed{(1, 2), (4, 3)}", "(1, 2), (3, 4)", 0.0, "set-of-pairs-one-flipped"),
    # A thousands separator does not make a list.
    case("\\boxed{1000}", "1,000", 1.0, "thousands-reference"),
    # A list of words stays text: compared as written.
    case("<answer>Paris, France</answer>", "Paris, France", 1.0, "text-list"),
]


@pytest.mark.parametrize("completion, answer, expected", LIST_REFERENCES)
def test_list_references(completion, answer, expected):
    assert score(completion, answer) == expected


# ---- LaTeX references and expressions (math-verify) --------------------

LATEX = [
    case("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0, "same-expression"),
    case("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{1}{2}\\sqrt{3}", 1.0, "equivalent-expression"),
    case("\\boxed{x = \\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0, "assignment-of-expression"),
    case("\\boxed{\\frac{\\sqrt{3}}{2} \\text{ or } \\frac{1}{2}}", "\\frac{\\sqrt{3}}{2}", 0.0, "expression-hedge"),
    case("\\boxed{\\frac{\\sqrt{3}}{2}, -\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 0.0, "expression-list"),
    case("\\boxed{\\pm\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 0.0, "expression-plus-minus"),
    case("\\boxed{\\approx \\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 0.0, "expression-approx"),
    case("\\boxed{\\text{about } \\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 0.0, "expression-about"),
    case("\\boxed{\\text{The answer is } x+1}", "x+1", 0.0, "expression-sentence"),
    case("\\boxed{x+1, x+2}", "x+1", 0.0, "expression-list-2"),
    case("\\boxed{x \\geq 1}", "x+1", 0.0, "inequality-for-expression"),
    case("\\boxed{1+x}", "x+1", 1.0, "commuted"),
    case("\\boxed{2^{10}}", "1024", 1.0, "expression-for-number"),
    case("\\boxed{\\sqrt{4}}", "2", 1.0, "root-for-number"),
    case("\\boxed{x = 3 = 5}", "5", 0.0, "equation-chain"),  # math-verify alone would credit it
    case("\\boxed{\\approx 5}", "5", 0.0, "approx-for-number"),  # math-verify alone would credit it
    case("\\boxed{\\max(3, 5)}", "5", 0.0, "several-values-in-an-expression"),
    case("\\boxed{\\{3, 5\\} \\cap \\{5\\}}", "5", 0.0, "set-expression"),
    case("\\boxed{3 \\mid 5}", "5", 0.0, "bar-between-values"),  # math-verify alone would credit it
    case("\\boxed{|-x|}", "|x|", 1.0, "bars-of-the-reference"),
    case("\\boxed{1\\frac{1}{2}}", "1.5", 1.0, "mixed-number"),
    case("\\boxed{y = 2x+1}", "y=2x+1", 1.0, "equation-reference"),
    case("\\boxed{(-\\infty, 2]}", "(-\\infty, 2]", 1.0, "interval-with-infinity"),
    case("\\boxed{(-\\infty, 2)}", "(-\\infty, 2]", 0.0, "interval-open-end"),
    case("\\boxed{3 \\pm \\sqrt{2}}", "3+\\sqrt{2}, 3-\\sqrt{2}", 1.0, "plus-minus-expression-for-list"),
    case("\\boxed{(2, \\infty) \\cup (-\\infty, -2)}", "(-\\infty, -2) \\cup (2, \\infty)", 1.0, "union-any-order"),
    case("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0,
         "vector-is-one-value"),
    case("\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0,
         "vector-order"),
    case("\\boxed{\\begin{cases} 5 \\\\ 6 \\end{cases}}", "5", 0.0, "cases-are-several-values"),
    case("\\boxed{2yx}", "2xy", 1.0, "product-of-variables"),
    case("\\boxed{3\\times10^3}", "3,000", 1.0, "scientific-latex"),
]


@pytest.mark.parametrize("completion, answer, expected", LATEX)
def test_latex_answers(math_verify, completion, answer, expected):
    assert score(completion, answer) == expected


def test_hedges_score_zero_without_math_verify(without_math_verify):
    # Refused by their shape, before any symbolic check: no install is needed to say no.
    assert score("\\boxed{x+1 \\text{ or } x+2}", "x+1") == 0.0
    assert score("\\boxed{x+1, x+2}", "x+1") == 0.0
    assert score("\\boxed{\\approx x+1}", "x+1") == 0.0
    assert score("\\boxed{(1, 2)}", "(1, 2)") == 1.0  # numbers in a tuple need no symbolic check


# ---- references that cannot be read: None, not 0 --------------------

UNREADABLE = [
    pytest.param("forty two", id="number-in-words"),
    pytest.param("one hundred and five", id="number-in-words-2"),
    pytest.param("a half", id="fraction-in-words"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("#### ", id="gsm8k-marker-without-answer"),
    pytest.param("She had 5 apples", id="sentence"),
    pytest.param("about 5", id="qualified-number"),
    pytest.param("5 or more", id="open-range"),
]


@pytest.mark.parametrize("reference", UNREADABLE)
@pytest.mark.parametrize("completion", ["42", "\\boxed{42}", "<answer>5</answer>", "", "\\boxed{forty two}"])
def test_an_unreadable_reference_is_not_applicable(reference, completion):
    # 0 would punish every answer, right ones included: the row carries no signal, so it must not count.
    assert score(completion, reference) is None
    assert score(completion, reference, fn=REWARD_FUNCTIONS["cosine_length"], completion_ids=[[1, 2]]) is None
    assert answers_match(extract_answer(completion), reference) is None


def test_an_unparsable_latex_reference_is_not_applicable(math_verify):
    assert score("\\boxed{\\frac{1}{2}}", "\\frac{1}{") is None
    assert score("\\boxed{x}", "\\sqrt{") is None


def test_word_references_are_still_checked_as_text():
    # A word answer ("Paris", "B") is readable: it is compared as written, and never None.
    assert score("<answer>Paris</answer>", "Paris") == 1.0
    assert score("\\boxed{\\text{Paris}}", "Paris") == 1.0  # \text{} is a wrapper
    assert score("<answer>Paris or London</answer>", "Paris") == 0.0
    assert score("<answer>B</answer>", "B") == 1.0
    assert score("<answer>C</answer>", "B") == 0.0
    assert score("\\boxed{C}", "\\text{(C)}") == 1.0  # MATH's multiple choice: brackets around one value
    assert score("\\boxed{\\text{(C)}}", "\\text{(C)}") == 1.0


def test_none_reaches_the_scored_batch_as_not_applicable():
    completions = ["\\boxed{42}", "\\boxed{42}", "\\boxed{41}"]
    result = score_completions(["accuracy", "cosine_length"], None, ["q"] * 3, completions,
                               {"answer": ["forty two", "42", "42"]}, completion_ids=[[1]] * 3)
    assert math.isnan(result.rewards[0, 0]) and math.isnan(result.rewards[0, 1])
    assert result.rewards[1, 0] == 1.0 and result.rewards[2, 0] == 0.0
    assert result.means["accuracy"] == 0.5  # over the two readable rows, not 1/3
    assert result.scorable.tolist() == [False, True, True]


def test_a_non_string_reference_is_read_as_its_text():
    assert score("\\boxed{42}", 42) == 1.0
    assert score("\\boxed{42}", 42.0) == 1.0


# ---- the demo's task must score as it always did --------------------


def arithmetic_rows():
    rows = []
    for name in ("train", "test"):
        path = ROOT / "data" / "arithmetic" / f"{name}.jsonl"
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def test_the_demo_answer_format_scores_as_before():
    # The demo's model answers "43+17=" with the bare sum (then EOS, which decoding drops), and the
    # GRPO stage learns only from this reward: right sums 1, wrong ones 0, whatever the row.
    rows = arithmetic_rows()
    assert len(rows) == 2200
    forms = [
        "{}", "{} ", "{}\n", " {}",
        "{q}{}",  # the question echoed: "43+17=60"
        "{}+1",  # then more arithmetic: its last number, 1, is the answer read
        "{}{}", "{}0",  # another number ("6060"), right only when it still equals the sum ("00")
    ]
    completions, references, expected = [], [], []
    for row in rows:
        question, answer = row["prompt"][0]["content"], row["answer"]
        for form in forms:
            for given in (answer, str(int(answer) + 1)):
                text = form.format(given, given, q=question)
                completions.append([{"role": "assistant", "content": text}])
                references.append(answer)
                expected.append(float(int(re.findall(r"\d+", text)[-1]) == int(answer)))
    got = accuracy([row["prompt"] for row in rows for _ in range(2 * len(forms))], completions, answer=references)
    mismatched = [(c[0]["content"], r, g) for c, r, g, e in zip(completions, references, got, expected) if g != e]
    assert not mismatched, mismatched[:10]


def test_the_reasoning_tiny_answers_still_score():
    rows = [json.loads(line) for line in (ROOT / "data" / "reasoning_tiny" / "train.jsonl").read_text().splitlines()]
    good = [f"<think>\nwork\n</think>\n<answer>\n{reference_answer(row['answer'])}\n</answer>" for row in rows]
    assert accuracy([row["prompt"] for row in rows], good, answer=[row["answer"] for row in rows]) == [1.0] * len(rows)


# ---- every built-in reward can be pickled --------------------

CONFIGURED = {
    "accuracy_solution_boxed_fraction": make_accuracy_reward(answer_column="solution", mode="boxed", percent="fraction"),
    "format_custom_pattern": make_format_reward(pattern=r"\d+", strict=False),
    "format_custom_tags": make_format_reward(think_tag="reasoning", answer_tag="final"),
    "xml_count_custom": make_xml_count_reward("reasoning", "final", per_tag=0.25, trailing_penalty=0.01),
    "integer_answer_boxed": make_integer_answer_reward(mode="boxed"),
    "cosine_length_custom": make_cosine_length_reward(min_value_wrong=-2.0, max_value_wrong=0.0, max_len=10,
                                                      answer_column="solution", percent="either"),
    "repetition_penalty_bigrams": make_repetition_penalty_reward(ngram_size=2, max_penalty=-0.5),
    "length_target": make_length_reward(target=20),
}
BATCH = dict(
    prompts=["q"] * 6,
    completions=["<think>\nx\n</think>\n<answer>\n4\n</answer>", "\\boxed{4}", "<reasoning>\na a\n</reasoning>\n"
                 "<final>\n25%\n</final>", "4 4 4 4 4", [{"role": "assistant", "content": "\\boxed{0.25}"}], ""],
    answer=["4", "4", "25", "4", "25%", "forty two"],
    solution=["4", "5", "0.25", "4", "25%", None],
    completion_ids=[[1] * n for n in (3, 8, 12, 1, 20, 0)],
)


@pytest.mark.parametrize("name, fn", [*REWARD_FUNCTIONS.items(), *CONFIGURED.items()], ids=lambda v: v if isinstance(v, str) else None)
def test_every_builtin_reward_survives_pickling(name, fn):
    # A process pool or TRL's async reward worker pickles the function: a closure cannot go there.
    loaded = pickle.loads(pickle.dumps(fn))
    assert loaded.__name__ == fn.__name__ and loaded.__doc__ == fn.__doc__
    assert loaded(**BATCH) == fn(**BATCH)
    assert pickle.loads(pickle.dumps(loaded))(**BATCH) == fn(**BATCH)


def test_configured_rewards_keep_their_metric_names():
    # A metric is keyed rewards/<__name__>, as TRL names a reward function by its __name__.
    names = [name for name, _ in resolve_reward_funcs(list(CONFIGURED.values()))]
    assert names == ["accuracy", "format_reward", "format_reward_2", "xml_count", "integer_answer", "cosine_length",
                     "repetition_penalty", "length"]
    assert repr(CONFIGURED["length_target"]) == "LengthReward(target=20)"
