"""Reward functions, their resolution, batch scoring and DAPO's overlong shaping: hand-written cases."""

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrl.rewards import (
    REWARD_FUNCTIONS,
    RewardFunctionError,
    RewardSpecError,
    extract_answer,
    make_accuracy_reward,
    make_format_reward,
    make_length_reward,
    overlong_penalty,
    resolve_reward_funcs,
    score_completions,
    weighted_total,
)

accuracy = REWARD_FUNCTIONS["accuracy"]


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def score_one(fn, completion, **columns) -> float | None:
    """`fn` on a batch of one, with the keywords TRL's GRPOTrainer adds."""
    trl_keywords = dict(completion_ids=[[1, 2]], trainer_state=None, log_extra=print, log_metric=print)
    return fn(prompts=["Q?"], completions=[completion], **trl_keywords, **columns)[0]


# ---- extract_answer --------------------


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("so \\boxed{\\frac{1}{2}} and <answer>7</answer>", "auto", "7"),  # the one written last
        ("<answer>7</answer>, no: \\boxed{\\frac{1}{2}}", "auto", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{x^{2}+1}", "boxed", "x^{2}+1"),  # the last one, braces balanced
        ("\\boxed{4} and \\boxed{unclosed", "boxed", "4"),
        ("reasoning <answer> 42 </answer> 7", "auto", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "answer_tag", "2"),
        ("x = -3, then 2024-01-05, so 1,000 apples.", "last_number", "1,000"),
        ("5-3 = 2.", "last_number", "2"),  # a hyphen is not a minus sign
        ("about −3", "last_number", "−3"),
        ("a half is 1/2", "auto", "1/2"),
        ("\\boxed{5}", "answer_tag", None),
        ("no numbers here", "auto", None),
        ("", "auto", None),
    ],
)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_extract_answer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'last_numbr'.*last_number"):
        extract_answer("5", "last_numbr")


# ---- accuracy --------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The total is 1,000.", "1000", 1.0),
        ("The total is 1000", "1,000", 1.0),
        ("1000.0", "1000", 1.0),
        ("She has 5 apples", "5", 1.0),
        ("The answer is 5.", "5", 1.0),
        ("It costs $5", "5", 1.0),
        ("\\boxed{5}", "5", 1.0),
        ("5", "2 + 3 = 5, so \\boxed{5}", 1.0),  # a MATH-style solution: its last \\boxed{} is the answer
        ("I think 3, but \\boxed{4}", "3", 0.0),  # the boxed answer wins over the last number
        ("<answer>5 apples</answer>", "5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{-\\dfrac{3}{4}}", "-0.75", 1.0),
        ("a half: 1/2", "0.5", 1.0),
        ("It drops to -3", "-3", 1.0),
        ("It drops to −3", "-3", 1.0),  # Unicode minus
        ("It drops to 3", "-3", 0.0),
        ("It drops 5-3", "-3", 0.0),  # "5-3" ends in 3, not -3
        ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),  # within the relative tolerance
        ("1.001", "1", 0.0),
        ("999,999", "1000000", 0.0),  # whole numbers compare exactly: no tolerance for off-by-one
        ("0.3333333", "1/3", 1.0),
        ("no number at all", "7", 0.0),
        ("", "7", 0.0),
        ("<answer>Paris</answer>", "Paris", 1.0),
        ("<answer>  New   York. </answer>", "New York", 1.0),
        ("<answer>paris</answer>", "Paris", 0.0),  # strings compare case-sensitively
        ("so #### 72", "Natalia sold 48/2 = 24 clips... #### 72", 1.0),  # GSM8K-style reference
    ],
)
def test_accuracy(completion, answer, expected):
    assert score_one(accuracy, completion, answer=[answer]) == expected
    assert score_one(accuracy, chat(completion), answer=[answer]) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**9, 10**9), st.sampled_from(["{:,}", "${:,}.", "\\boxed{{{:,}}}", "so {:,} apples", "{:,}.00"]))
def test_accuracy_reads_formatted_integers(n, template):
    text = template.format(n)
    assert score_one(accuracy, text, answer=[str(n)]) == 1.0, text
    assert score_one(accuracy, text, answer=[str(n + 1)]) == 0.0, text


def test_accuracy_none_answer_is_not_applicable():
    rewards = accuracy(["a", "b"], ["5", "5"], answer=["5", None])
    assert rewards == [1.0, None]


def test_accuracy_missing_column_names_it_and_the_columns_passed():
    with pytest.raises(ValueError, match=r"'answer'.*\['solution'\].*answer_column"):
        score_one(accuracy, "5", solution=["5"])


def test_accuracy_reads_a_configured_column_and_mode():
    by_tag = make_accuracy_reward(answer_column="solution", mode="answer_tag")
    assert score_one(by_tag, "<answer>5</answer> \\boxed{6}", solution=["5"]) == 1.0
    assert score_one(by_tag, "\\boxed{5}", solution=["5"]) == 0.0
    with pytest.raises(ValueError, match="mode 'tag'"):
        make_accuracy_reward(mode="tag")


def test_accuracy_takes_the_last_assistant_message():
    conversation = [*chat("3"), {"role": "user", "content": "sure?"}, *chat("\\boxed{4}")]
    assert score_one(accuracy, conversation, answer=["4"]) == 1.0
    assert score_one(accuracy, [], answer=["4"]) == 0.0
    assert score_one(accuracy, [{"content": "\\boxed{4}"}], answer=["4"]) == 1.0  # TRL's docs omit the role


# ---- format --------------------

GOOD = "<think>\nadd them\n</think>\n<answer>\n4\n</answer>"


@pytest.mark.parametrize(
    "completion, strict, soft",
    [
        (GOOD, 1.0, 1.0),
        (GOOD + "\n", 1.0, 1.0),  # trailing whitespace is allowed
        ("Sure! " + GOOD, 0.0, 1.0),  # extra text before
        (GOOD + " and more", 0.0, 1.0),  # extra text after
        ("<think>add them</think><answer>4</answer>", 0.0, 1.0),  # no newlines
        ("<answer>\n4\n</answer>\n<think>\nadd\n</think>", 0.0, 0.0),  # wrong order
        ("<think>\nadd them\n</think>\n4", 0.0, 0.0),  # no answer tag
        ("<think>\nadd them\n<answer>\n4\n</answer>", 0.0, 0.0),  # unclosed think
        ("<think>\na\n</think>\n<answer>\n1\n</answer>\n<answer>\n2\n</answer>", 0.0, 1.0),  # a repeated tag
        ("", 0.0, 0.0),
    ],
)
def test_format(completion, strict, soft):
    for text in (completion, chat(completion)):
        assert score_one(REWARD_FUNCTIONS["format"], text) == strict
        assert score_one(REWARD_FUNCTIONS["format_soft"], text) == soft


def test_format_tags_and_pattern_are_configurable():
    reasoning = make_format_reward(think_tag="reasoning", answer_tag="final")
    assert score_one(reasoning, "<reasoning>\nx\n</reasoning>\n<final>\n1\n</final>") == 1.0
    assert score_one(reasoning, GOOD) == 0.0
    ends_in_number = make_format_reward(pattern=r"\d+", strict=False)
    assert [score_one(ends_in_number, t) for t in ("it is 4", "four")] == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        make_format_reward(pattern="(unclosed")


# ---- length --------------------


@pytest.mark.parametrize(
    "target, completion, expected",
    [(None, "x" * 250, -0.25), (None, "", 0.0), (100, "x" * 100, 0.0), (100, "x" * 150, -0.5),
     (100, "x" * 60, -0.4), (100, "", -1.0)],
)
def test_length(target, completion, expected):
    length = make_length_reward(target)
    assert score_one(length, completion) == pytest.approx(expected)
    assert score_one(length, chat(completion)) == pytest.approx(expected)


def test_builtins_carry_their_registry_names():
    # TRL logs each function under its __name__.
    assert {name: fn.__name__ for name, fn in REWARD_FUNCTIONS.items()} == {name: name for name in REWARD_FUNCTIONS}


# ---- resolve_reward_funcs --------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **kwargs):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n\n"
        "def _private(prompts, completions, **kwargs):\n"
        "    return []\n\n"
        "THRESHOLD = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_resolve_builtins_user_functions_and_callables(user_module):
    def shout(prompts, completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    resolved = resolve_reward_funcs(["accuracy", f"{user_module}:brevity", shout, "accuracy"])
    assert [name for name, _ in resolved] == ["accuracy", "brevity", "shout", "accuracy_2"]
    assert resolved[0][1] is REWARD_FUNCTIONS["accuracy"] and resolved[2][1] is shout
    assert resolved[1][1](["q"], ["abc"]) == [0.25]


@pytest.mark.parametrize(
    "spec, error, pattern",
    [
        ("acuracy", RewardSpecError, r"'acuracy'.*Did you mean 'accuracy'.*'format'.*package\.module:function"),
        ("my_rewards.brevity", RewardSpecError, r"write 'my_rewards:brevity'"),
        ("no_such_module_xyz:f", RewardSpecError, r"module 'no_such_module_xyz'.*PYTHONPATH"),
        ("my_rewards:brevty", RewardSpecError, r"no function 'brevty'; it defines \['brevity'\]"),
        ("my_rewards:THRESHOLD", RewardSpecError, r"'my_rewards:THRESHOLD' is a int, not a function"),
        (3, RewardSpecError, r"3 must be a built-in name"),
    ],
)
def test_resolve_errors_name_the_entry_and_the_fix(user_module, spec, error, pattern):
    with pytest.raises(error, match=pattern):
        resolve_reward_funcs([spec])


# ---- score_completions --------------------

PROMPTS = ["1+1?", "2+2?", "3+3?"]


def test_weights_none_and_means_by_hand():
    completions = [GOOD.replace("4", "2"), "<answer>4</answer>", "6"]
    result = score_completions(["accuracy", "format"], [2.0, 0.5], PROMPTS, completions, {"answer": ["2", "4", None]})
    assert result.names == ["accuracy", "format"]
    expected = torch.tensor([[1.0, 1.0], [1.0, 0.0], [math.nan, 0.0]])
    assert torch.allclose(result.rewards, expected, equal_nan=True)
    # None counts as 0 in the total: 2*1 + 0.5*1, 2*1 + 0.5*0, 0.5*0.
    assert result.total.tolist() == [2.5, 2.0, 0.0]
    # Means skip the Nones: accuracy over 2 rows, format over 3.
    assert result.means == {"accuracy": 1.0, "format": pytest.approx(1 / 3)}
    assert result.scorable.tolist() == [True, True, True]


def test_default_weights_are_one_and_columns_and_keywords_reach_functions():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [float(len(c)) for c in completions]

    result = score_completions([("spy", spy), ("length", make_length_reward(2))], None, ["p"], ["abc"],
                               {"answer": ["1"]}, completion_ids=[[5, 6]], trainer_state="state")
    assert result.total.tolist() == [pytest.approx(3.0 - 0.5)]
    assert {key: value for key, value in seen.items() if not key.startswith("log_")} == {
        "answer": ["1"], "completion_ids": [[5, 6]], "trainer_state": "state"}
    assert callable(seen["log_extra"]) and callable(seen["log_metric"]), "TRL's logging callbacks"


def test_weights_must_match_the_functions():
    with pytest.raises(ValueError, match="3 reward weights for 2 rewards"):
        score_completions(["format", "length"], [1.0, 1.0, 1.0], PROMPTS, ["a", "b", "c"])


def test_a_function_that_raises_is_named_with_its_sample():
    def parse_int(prompts, completions, **kwargs):
        return [float(int(c)) for c in completions]

    with pytest.raises(RewardFunctionError, match=r"'parse_int' raised ValueError.*\non sample 1: .*'oops'") as info:
        score_completions([parse_int], None, PROMPTS, ["1", "oops", "x" * 500])
    assert "x" * 300 not in str(info.value)  # long samples are cut
    assert isinstance(info.value.__cause__, ValueError)


def test_a_function_that_fails_only_on_the_batch_shows_sample_0():
    def needs_two(prompts, completions, **kwargs):
        if len(completions) < 2:
            return [0.0] * len(completions)
        raise RuntimeError("batch too big")

    with pytest.raises(RewardFunctionError, match="no sample fails alone.*sample 0: prompt='1\\+1\\?'"):
        score_completions([needs_two], None, PROMPTS, ["a", "b", "c"])


def test_a_wrong_signature_is_explained():
    def old_style(completions, answers):
        return [0.0 for _ in completions]

    with pytest.raises(RewardFunctionError, match=r"(?s)'old_style'.*signature is fn\(prompts, completions, \*\*kwargs\)"):
        score_completions([old_style], None, PROMPTS, ["a", "b", "c"])


@pytest.mark.parametrize(
    "output, pattern",
    [
        ([1.0, 2.0], r"'bad' returned 2 values for 3 completions"),
        (1.0, r"'bad' returned 1.0; it must return a list of 3"),
        ([1.0, float("nan"), 0.0], r"'bad' returned nan for sample 1: prompt='2\+2\?', completion='b'"),
        ([1.0, 0.0, float("-inf")], r"'bad' returned -inf for sample 2"),
        ([1.0, "high", 0.0], r"'bad' returned 'high' for sample 1; a reward must be a number or None"),
    ],
)
def test_bad_outputs_name_the_function(output, pattern):
    def bad(prompts, completions, **kwargs):
        return output

    with pytest.raises(RewardFunctionError, match=pattern):
        score_completions([bad], None, PROMPTS, ["a", "b", "c"])


def test_tensor_and_numpy_style_outputs_are_numbers():
    result = score_completions([lambda prompts, completions, **kw: torch.tensor([0.5, 1.5])], None, ["p", "q"], ["a", "b"])
    assert result.names == ["<lambda>"] and result.total.tolist() == [0.5, 1.5]


def test_rows_every_function_skipped_are_unscorable_and_warned(caplog):
    columns = {"answer": ["2", None, None]}
    with caplog.at_level(logging.WARNING, logger="llmrl.rewards"):
        result = score_completions(["accuracy"], None, PROMPTS, ["2", "4", "6"], columns)
    # NaN, not 0: a 0 would drag the group's mean baseline and hand this row an advantage.
    assert result.total[0] == 1.0 and torch.isnan(result.total[1:]).all()
    assert result.scorable.tolist() == [True, False, False]
    assert "2 of 3 completions" in caplog.text and "sample 1" in caplog.text and "'2+2?'" in caplog.text
    all_none = score_completions(["accuracy"], None, PROMPTS[:1], ["2"], {"answer": [None]})
    assert math.isnan(all_none.means["accuracy"])


def test_weighted_total_by_hand():
    nan = math.nan
    rewards = torch.tensor([[1.0, nan], [nan, nan], [0.5, 2.0]])
    total = weighted_total(rewards, [2.0, 5.0])
    assert total[0] == 2.0 and math.isnan(total[1]) and total[2] == 11.0


def test_columns_must_have_one_value_per_completion():
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        score_completions(["accuracy"], None, PROMPTS, ["a", "b", "c"], {"answer": ["1", "2"]})


# ---- overlong_penalty --------------------


def test_overlong_penalty_at_inside_and_beyond_the_buffer():
    # L_max = 100, buffer 20: the ramp starts after 80 and reaches -factor at 100.
    lengths = torch.tensor([0, 79, 80, 81, 90, 95, 99, 100, 101, 150])
    expected = torch.tensor([0, 0, 0, -0.05, -0.5, -0.75, -0.95, -1.0, -1.0, -1.0]) * 0.5
    penalty = overlong_penalty(lengths, max_completion_length=100, buffer_len=20, penalty_factor=0.5)
    assert penalty.dtype == torch.float32 and torch.allclose(penalty, expected)
    assert overlong_penalty([80, 90, 100], 100, 20).tolist() == [0.0, -0.5, -1.0]
    assert overlong_penalty([100], 100, 20, penalty_factor=0.0).tolist() == [0.0]


def test_overlong_penalty_rejects_an_empty_buffer():
    with pytest.raises(ValueError, match="buffer_len=0"):
        overlong_penalty([5], max_completion_length=100, buffer_len=0, penalty_factor=1.0)
