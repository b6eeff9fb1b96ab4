"""The reasoning rewards on the cases a user meets, with values worked out by hand from each
reward's definition; their errors; and the tiny CPU recipe that logs every one of them."""

import importlib.util
import logging
import math
from pathlib import Path

import pytest

from llmrl.config import RLConfig
from llmrl.recipe import load_recipe
from llmrl.rewards import (
    REWARD_FUNCTIONS,
    make_accuracy_reward,
    make_cosine_length_reward,
    make_format_reward,
    make_integer_answer_reward,
    make_repetition_penalty_reward,
    make_xml_count_reward,
    resolve_reward_funcs,
    score_completions,
)
from llmrl.trainers import train

ROOT = Path(__file__).resolve().parents[1]
GOOD = "<think>\nadd them\n</think>\n<answer>\n4\n</answer>"


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def both_forms(fn, completion, **columns) -> float | None:
    """`fn` on a batch of one, as a string and as a chat message; the two must agree."""
    as_text = fn(prompts=["Q?"], completions=[completion], trainer_state=None, **columns)[0]
    as_chat = fn(prompts=[[{"role": "user", "content": "Q?"}]], completions=[chat(completion)], trainer_state=None,
                 **columns)[0]
    assert as_text == as_chat, (as_text, as_chat)
    return as_text


# ---- accuracy: numbers --------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The answer is 1,000.", "1000", 1.0),
        ("<answer>\n$1,250\n</answer>", "1250", 1.0),  # dollar sign and comma inside the tag
        ("<answer>18 dollars.</answer>", "18", 1.0),  # a unit word and a trailing period
        ("\\boxed{5\\text{ cm}}", "5", 1.0),  # a LaTeX unit
        ("\\boxed{3 m^2}", "3", 1.0),  # a unit with a power is still 3, not the last number 2
        ("\\boxed{90^\\circ}", "90", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("so it is 0.5", "\\frac{1}{2}", 1.0),
        ("\\boxed{3/4}", "0.75", 1.0),
        ("The answer is $\\frac{7}{2}$.", "Since 7/2 = 3.5, \\boxed{\\frac{7}{2}}", 1.0),  # a fraction is one number
        ("\\boxed{10{,}000}", "10000", 1.0),  # LaTeX thousands separators
        ("\\boxed{10\\,000}", "10000", 1.0),
        ("\\boxed{1/2 cup}", "0.5", 1.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("<answer>7</answer> wait, no: <answer>8</answer>", "8", 1.0),  # repeated tags: the last one counts
        ("<answer>7</answer> wait, no: <answer>8</answer>", "7", 0.0),
        ("<answer><answer>8</answer></answer>", "8", 1.0),  # nested tags still hold the 8
        ("<think>\n6 * 12\n</think>\n<answer>\n72\n</answer>", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("<think>\n48/2 = 24\n</think>\n<answer>\n24\n</answer>", "Natalia sold 48/2 = 24 clips.\n#### 72", 0.0),
        ("The answer is \\boxed{24}", "48/2 = 24, so the answer is \\boxed{24}.", 1.0),  # MATH-style solution
        ("<answer>\n25%\n</answer>", "25", 1.0),  # by default a % is the number itself (GSM8K asks "what percent")
        ("<answer>\n25%\n</answer>", "0.25", 0.0),
        ("\\boxed{50\\%}", "50", 1.0),
        ("<answer></answer>", "5", 0.0),  # an empty answer
        ("\\boxed{}", "5", 0.0),
        ("", "5", 0.0),  # an empty completion
        ("The answer is 1e3", "1000", 1.0),  # scientific notation is one number, not its exponent
        ("<answer>1.5e-3</answer>", "0.0015", 1.0),
        ("\\boxed{\\dfrac12}", "0.5", 1.0),  # a brace-less \frac of two digits
        ("\\boxed{\\dfrac12}", "12", 0.0),
        ("\\boxed{\\mathbf{12}}", "12", 1.0),  # a font command or braces around a number
        ("\\boxed{\\text{12}}", "12", 1.0),
        ("\\boxed{{12}}", "12", 1.0),
        # A box tried inside <think> does not outrank the <answer> given after it ...
        ("<think>\nmaybe \\boxed{42}?\n</think>\n<answer>\n43\n</answer>", "42", 0.0),
        ("<think>\nmaybe \\boxed{42}?\n</think>\n<answer>\n43\n</answer>", "43", 1.0),
        # ... a box inside the tag is the tag's answer, and a box written after the tag is the last word.
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", 1.0),
        ("<answer>7</answer> Checking again: \\boxed{8}", "8", 1.0),
    ],
)
def test_accuracy_numbers(completion, answer, expected):
    assert both_forms(REWARD_FUNCTIONS["accuracy"], completion, answer=[answer]) == expected


@pytest.mark.parametrize(
    "completion, answer, as_number, as_fraction, either",
    [
        ("It is 25%.", "0.25", 0.0, 1.0, 1.0),
        ("It is 25%.", "25", 1.0, 0.0, 1.0),
        ("It is 0.25", "25%", 0.0, 1.0, 1.0),
        ("It is 25", "25%", 1.0, 0.0, 1.0),
        ("It is 25%", "25%", 1.0, 1.0, 1.0),
        ("It is 2.5%", "25%", 0.0, 0.0, 0.0),
    ],
)
def test_accuracy_percentages_as_configured(completion, answer, as_number, as_fraction, either):
    got = [both_forms(make_accuracy_reward(percent=p), completion, answer=[answer]) for p in ("number", "fraction", "either")]
    assert got == [as_number, as_fraction, either]


# ---- accuracy: LaTeX by math-verify --------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt{3}", 1.0),
        ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{2}", 0.0),
        ("<answer>\n$1+x$\n</answer>", "x+1", 1.0),
        ("\\boxed{x+2}", "x+1", 0.0),
        ("\\boxed{(1, 2)}", "(1,2)", 1.0),
        ("\\boxed{2^{10}}", "1024", 1.0),  # a numeric reference, an expression for an answer
        ("\\boxed{2^{9}}", "1024", 0.0),
        ("\\boxed{\\sqrt{4}}", "2", 1.0),
        ("\\boxed{\\pi}", "3.14159", 0.0),  # pi is not 3.14159
        ("\\boxed{paris}", "Paris", 0.0),  # words are compared as text, never as products of symbols
        ("\\boxed{Sirap}", "Paris", 0.0),
    ],
)
def test_accuracy_latex_by_mathematical_equivalence(math_verify, completion, answer, expected):
    assert both_forms(REWARD_FUNCTIONS["accuracy"], completion, answer=[answer]) == expected


def test_without_math_verify_numbers_still_match(without_math_verify):
    accuracy = REWARD_FUNCTIONS["accuracy"]
    assert both_forms(accuracy, "\\boxed{\\frac{1}{2}}", answer=["0.5"]) == 1.0
    assert both_forms(accuracy, "<answer>1,000</answer>", answer=["#### 1000"]) == 1.0
    assert both_forms(accuracy, "\\boxed{\\mathbf{7}}", answer=["7"]) == 1.0  # formatting, not an expression


def test_without_math_verify_a_symbolic_reference_names_the_install(without_math_verify):
    with pytest.raises(ImportError, match=r"'1\+x'.*'x\+1'.*pip install 'llmrl\[math\]'"):
        REWARD_FUNCTIONS["accuracy"](["q"], ["\\boxed{1+x}"], answer=["x+1"])


def test_without_math_verify_latex_answers_to_numbers_are_not_credited(without_math_verify, caplog):
    # Read by their last number, sqrt(2), 5^2 and 2 pi would all "equal" 2: a reward the policy could farm.
    accuracy = REWARD_FUNCTIONS["accuracy"]
    completions = ["\\boxed{2^{10}}", "\\boxed{2^{10}}", "\\boxed{\\sqrt{2}}", "\\boxed{5^2}", "\\boxed{2\\pi}", "\\boxed{2}"]
    with caplog.at_level(logging.WARNING, logger="llmrl.rewards"):
        scores = accuracy(["q"] * 6, completions, answer=["1024", "10", "2", "2", "2", "2"])
    assert scores == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert caplog.text.count("pip install 'llmrl[math]'") == 1  # warned once, not per completion


# ---- format rewards --------------------


@pytest.mark.parametrize(
    "completion, strict, soft",
    [
        (GOOD, 1.0, 1.0),
        ("<think>\n\n</think>\n<answer>\n\n</answer>", 1.0, 1.0),  # the structure only: empty sections pass
        ("<think>\n<think>\nx\n</think>\n</think>\n<answer>\n4\n</answer>", 0.0, 1.0),  # nested think
        ("<think>\nx\n</think>\n<answer>\n<answer>\n4\n</answer>\n</answer>", 0.0, 1.0),  # nested answer
        ("<think>\nx\n</think>\n\n<answer>\n4\n</answer>", 0.0, 1.0),  # a blank line between the blocks
        ("  " + GOOD, 0.0, 1.0),  # text before
        ("<THINK>\nx\n</THINK>\n<answer>\n4\n</answer>", 0.0, 0.0),  # tags are case-sensitive
        ("<think>\nx\n</think>", 0.0, 0.0),  # no answer
        ("<answer>\n4\n</answer>", 0.0, 0.0),  # no think
        ("", 0.0, 0.0),
    ],
)
def test_format_strict_and_soft(completion, strict, soft):
    assert both_forms(REWARD_FUNCTIONS["format_strict"], completion) == strict
    assert both_forms(REWARD_FUNCTIONS["format"], completion) == strict  # the older name of format_strict
    assert both_forms(REWARD_FUNCTIONS["format_soft"], completion) == soft


def test_format_tags_are_configurable():
    strict = make_format_reward(think_tag="reasoning", answer_tag="solution")
    soft = make_format_reward(strict=False, think_tag="reasoning", answer_tag="solution")
    custom = "<reasoning>\nx\n</reasoning>\n<solution>\n4\n</solution>"
    assert [both_forms(strict, custom), both_forms(soft, custom)] == [1.0, 1.0]
    assert [both_forms(strict, GOOD), both_forms(soft, GOOD)] == [0.0, 0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 0.5),
        (GOOD + "\n", 0.5),  # whitespace after the answer is free
        (GOOD + "\nThanks!", 0.5 - 7 * 0.001),
        (GOOD + " and 42 more words", 0.5 - 17 * 0.001),
        (GOOD + "x" * 1000, 0.5 - 1.0),  # unbounded below: rambling keeps costing
        ("<think>\nx\n</think>\n4", 0.25),  # both think tags, no answer tags
        ("Let me think.\n<answer>\n4\n</answer>", 0.25),  # both answer tags, no think tags
        ("<answer>\n4\n</answer>", 0.125),  # "\n<answer>\n" needs the newline before it
        ("<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>", 0.25),  # repeated answer tags
        ("<think>x</think><answer>4</answer>", 0.0),  # tags without their newlines
        ("", 0.0),
    ],
)
def test_xml_count(completion, expected):
    assert both_forms(REWARD_FUNCTIONS["xml_count"], completion) == pytest.approx(expected)


def test_xml_count_is_configurable():
    xml_count = make_xml_count_reward("reasoning", "solution", per_tag=0.25, trailing_penalty=0.01)
    assert both_forms(xml_count, "<reasoning>\nx\n</reasoning>\n<solution>\n4\n</solution>!!") == pytest.approx(1.0 - 0.02)
    assert both_forms(xml_count, GOOD) == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>72</answer>", 1.0),
        ("<answer>\n72\n</answer>", 1.0),
        ("<answer>-3</answer>", 1.0),
        ("<answer>1,000</answer>", 1.0),
        ("<answer>1,00</answer>", 0.0),  # not a thousands separator
        ("<answer>72.0</answer>", 0.0),
        ("<answer>72.5</answer>", 0.0),
        ("<answer>$72</answer>", 0.0),
        ("<answer>72 apples</answer>", 0.0),
        ("<answer>\\frac{1}{2}</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>1</answer> or <answer>x</answer>", 0.0),  # the last tag counts
        ("The answer is 72", 0.0),  # no answer tag
        ("\\boxed{72}", 0.0),
        ("", 0.0),
    ],
)
def test_integer_answer(completion, expected):
    assert both_forms(REWARD_FUNCTIONS["integer_answer"], completion) == expected


def test_integer_answer_reads_a_configured_mode():
    boxed = make_integer_answer_reward(mode="boxed")
    assert [both_forms(boxed, "\\boxed{72}"), both_forms(boxed, "<answer>72</answer>")] == [1.0, 0.0]


# ---- shaping --------------------


@pytest.mark.parametrize(
    "completion, tokens, expected",
    [
        # max_len 300; correct runs from 1.0 (empty) to 0.5, wrong from -1.0 to -0.5, on
        # (1 + cos(pi * L / 300)) / 2 = 1, 0.75, 0.25, 0 at L = 0, 100, 200, 300.
        ("\\boxed{4}", 0, 1.0),
        ("\\boxed{4}", 100, 0.5 + 0.5 * 0.75),
        ("\\boxed{4}", 200, 0.5 + 0.5 * 0.25),
        ("\\boxed{4}", 300, 0.5),
        ("\\boxed{4}", 450, 0.5),  # beyond max_len counts as max_len (the cosine would turn back up)
        ("\\boxed{5}", 0, -1.0),
        ("\\boxed{5}", 100, -0.5 - 0.5 * 0.75),
        ("\\boxed{5}", 200, -0.5 - 0.5 * 0.25),
        ("\\boxed{5}", 300, -0.5),
        ("\\boxed{5}", 450, -0.5),
        ("", 0, -1.0),  # an empty completion is a wrong answer
    ],
)
def test_cosine_length_counts_tokens(completion, tokens, expected):
    cosine = make_cosine_length_reward(max_len=300)
    got = both_forms(cosine, completion, answer=["4"], completion_ids=[[7] * tokens])
    assert got == pytest.approx(expected)


def test_cosine_length_counts_characters_without_token_ids():
    cosine = make_cosine_length_reward(max_len=18)  # "\boxed{4}" is 9 characters: half of max_len
    assert both_forms(cosine, "\\boxed{4}", answer=["4"]) == pytest.approx(0.75)
    assert both_forms(cosine, "\\boxed{5}", answer=["4"]) == pytest.approx(-0.75)
    assert cosine(["q", "q"], ["\\boxed{4}", "\\boxed{4}"], answer=["4", None]) == [pytest.approx(0.75), None]


def test_cosine_length_bounds_are_configurable():
    cosine = make_cosine_length_reward(min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=1.0,
                                       max_value_correct=3.0, max_len=10)
    assert both_forms(cosine, "\\boxed{4}", answer=["4"], completion_ids=[[1] * 5]) == pytest.approx(2.0)
    assert both_forms(cosine, "\\boxed{4}", answer=["5"], completion_ids=[[1] * 5]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "ngram_size, max_penalty, completion, expected",
    [
        (3, -1.0, "", 0.0),
        (3, -1.0, "one two", 0.0),  # fewer words than one n-gram
        (3, -1.0, "the cat sat on the mat", 0.0),  # 4 trigrams, all distinct
        (3, -1.0, "a b c a b c", -(1 - 3 / 4)),  # abc bca cab abc
        (3, -1.0, "go go go go go", -(1 - 1 / 3)),
        (2, -1.0, "Go go GO go", -(1 - 1 / 3)),  # case is ignored: three "go go"
        (2, -1.0, "a b a b a b", -(1 - 2 / 5)),
        (2, -0.5, "a b a b a b", -0.5 * (1 - 2 / 5)),
        (1, -1.0, "a a a a", -(1 - 1 / 4)),
    ],
)
def test_repetition_penalty(ngram_size, max_penalty, completion, expected):
    penalty = make_repetition_penalty_reward(ngram_size, max_penalty)
    assert both_forms(penalty, completion) == pytest.approx(expected)


def test_registered_repetition_penalty_uses_trigrams_and_minus_one():
    assert both_forms(REWARD_FUNCTIONS["repetition_penalty"], "a b c a b c") == pytest.approx(-0.25)


# ---- together, by name, with weights --------------------


def test_all_reasoning_rewards_score_together_with_weights():
    names = ["accuracy", "format_strict", "format_soft", "xml_count", "integer_answer", "cosine_length",
             "repetition_penalty"]
    weights = [1.0, 0.5, 0.25, 0.25, 0.25, 0.5, 0.25]
    completions = [GOOD, "5 5 5 5"]
    result = score_completions(names, weights, ["2+2?", "2+2?"], completions, {"answer": ["4", "4"]},
                               completion_ids=[[1] * 500, [1] * 500])  # half of cosine's max_len 1000
    assert result.rewards[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 1.0, 0.75, 0.0])
    assert result.rewards[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0, -0.75, -0.5])
    # 1 + 0.5 + 0.25 + 0.25*0.5 + 0.25 + 0.5*0.75 = 2.5;  0.5*(-0.75) + 0.25*(-0.5) = -0.5
    assert result.total.tolist() == pytest.approx([2.5, -0.5])


def test_every_builtin_is_documented_with_an_example():
    for name, fn in REWARD_FUNCTIONS.items():
        assert fn.__name__ == name
        assert fn.__doc__ and "``" in fn.__doc__ and "==" in fn.__doc__, name


# ---- bad input --------------------


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: make_accuracy_reward(mode="tag"), r"mode 'tag' is not valid.*answer_tag"),
        (lambda: make_accuracy_reward(percent="percent"), r"percent 'percent' is not valid.*fraction"),
        (lambda: make_integer_answer_reward(mode="last"), r"mode 'last' is not valid"),
        (lambda: make_cosine_length_reward(max_len=0), r"max_len must be a positive length, got 0"),
        (lambda: make_cosine_length_reward(min_value_correct=1.0, max_value_correct=0.5),
         r"min_value_correct <= max_value_correct.*\(1.0, 0.5\)"),
        (lambda: make_repetition_penalty_reward(ngram_size=0), r"ngram_size must be a positive integer, got 0"),
        (lambda: make_repetition_penalty_reward(max_penalty=1.0), r"max_penalty .* must be <= 0 \(e.g. -1.0\), got 1.0"),
        (lambda: make_xml_count_reward(per_tag=0), r"per_tag > 0"),
    ],
)
def test_bad_settings_are_named(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_an_unknown_setting_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="maxlen"):
        make_cosine_length_reward(maxlen=500)


def test_unknown_reward_names_suggest_the_builtin():
    with pytest.raises(ValueError, match=r"'xml_cout'.*Did you mean 'xml_count'"):
        RLConfig(reward_funcs=["accuracy", "xml_cout"])
    with pytest.raises(ValueError, match=r"'cosine_lenght'.*Did you mean 'cosine_length'"):
        resolve_reward_funcs(["cosine_lenght"])


def test_cosine_length_without_the_answer_column_says_how_to_name_it():
    with pytest.raises(ValueError, match=r"cosine_length reward needs the dataset column 'answer'.*\['solution'\]"
                                         r".*make_cosine_length_reward\(answer_column=...\)"):
        REWARD_FUNCTIONS["cosine_length"](["q"], ["4"], solution=["4"], completion_ids=[[1]])


# ---- shipped data and recipes --------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_tiny_data_is_what_its_script_makes(tmp_path):
    load_script("make_reasoning_tiny").main(["--out", str(tmp_path / "train.jsonl")])
    assert (tmp_path / "train.jsonl").read_text() == (ROOT / "data" / "reasoning_tiny" / "train.jsonl").read_text()


def test_a_gsm8k_row_is_scored_by_its_final_number():
    # A real GSM8K row (openai/gsm8k, main, train[0]) through the recipe's conversion.
    row = load_script("make_gsm8k").to_row({
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72"})
    assert row["prompt"][0]["role"] == "system" and "<answer>" in row["prompt"][0]["content"]
    accuracy = REWARD_FUNCTIONS["accuracy"]
    right = chat("<think>\n48 / 2 = 24, 48 + 24 = 72\n</think>\n<answer>\n72\n</answer>")
    wrong = chat("<think>\n48 / 2 = 24\n</think>\n<answer>\n24\n</answer>")
    assert accuracy([row["prompt"]] * 2, [right, wrong], answer=[row["answer"]] * 2) == [1.0, 0.0]


def test_tiny_recipe_computes_and_logs_every_reward(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the repository
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "rewards_cpu.yaml",
                         ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"),
                          "--disable_tqdm", "true", "--max_steps", "2"])
    names = recipe.args.reward_funcs
    assert set(names) == set(REWARD_FUNCTIONS) - {"format"}  # every built-in (format is format_strict)
    assert len(recipe.args.reward_weights) == len(names) and recipe.args.overlong_penalty_factor > 0
    history = train(recipe)
    steps = [record for record in history if "reward" in record]
    assert [record["step"] for record in steps] == [1, 2]
    for record in steps:
        for name in names:
            assert math.isfinite(record[f"rewards/{name}"]), (name, record)
        assert -1.0 <= record["rewards/overlong_penalty"] <= 0.0  # DAPO's shaping, logged beside the functions
        assert math.isfinite(record["reward"])
