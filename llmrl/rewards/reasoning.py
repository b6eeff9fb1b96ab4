"""Rewards for reasoning toward a checkable answer: accuracy, the ``<think>``/``<answer>`` format
family, and length / repetition shaping.

Each reward is a class whose instances are reward functions with TRL's signature ``fn(prompts,
completions, **kwargs) -> list[float | None]``, the settings kept as attributes; ``make_*_reward`` is
its public name (the class itself, so the signature and defaults live in one place). Instances of a
module-level class pickle, so they can go to a process pool or to TRL's async reward worker, where
a closure could not. :mod:`.builtins` registers one default-configured instance of each by name.
Lengths are counted in tokens when the caller passes ``completion_ids`` (the llmrl trainer and
TRL's GRPOTrainer do), else in characters; repetition is counted in words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from .answers import ANSWER_MODES, PERCENT_MODES, completion_text, extract_answer
from .matching import answers_match

RewardFunc = Callable[..., list]

# Keywords TRL (and score_completions) pass besides the dataset's columns.
NOT_COLUMNS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")

# A system prompt asking for the structure format_strict rewards (the shipped data and the GSM8K
# script use it). Instruct models follow the example better than a description.
REASONING_SYSTEM_PROMPT = (
    "Think step by step inside <think> </think>, then give only the final answer inside <answer> </answer>, "
    "each tag on its own line:\n<think>\n...\n</think>\n<answer>\n...\n</answer>"
)


def _check_answer_settings(factory: str, mode: str, percent: str) -> None:
    if mode not in ANSWER_MODES:
        raise ValueError(f"{factory} mode {mode!r} is not valid; choose one of {list(ANSWER_MODES)}.")
    if percent not in PERCENT_MODES:
        raise ValueError(f"{factory} percent {percent!r} is not valid; choose one of {list(PERCENT_MODES)}.")


class BuiltinReward:
    """A built-in reward function: an instance of a module-level class, its settings its attributes.

    ``__name__`` (set per instance; the registry renames its copies) is the name TRL and llmrl log it
    under, ``rewards/<__name__>``; ``repr`` shows the settings.
    """

    __name__: str

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({settings})"


def _correctness(reward: str, factory: str, completions, columns: dict, settings) -> list[bool | None]:
    """Per completion: whether its final answer matches the row's reference (`settings`: answer_column,
    mode, answer_tag, percent); None where the reference is None or cannot be checked."""
    answer_column = settings.answer_column
    if answer_column not in columns:
        passed = sorted(key for key in columns if key not in NOT_COLUMNS)
        raise ValueError(
            f"the {reward} reward needs the dataset column {answer_column!r} (the reference answers), but "
            f"the batch has only the columns {passed}. Add the column to the dataset, or build the reward "
            f"with {factory}(answer_column=...) naming the column that holds the answers."
        )
    return [
        None if reference is None or reference != reference  # None or NaN (a blank cell read by pandas)
        else answers_match(extract_answer(completion_text(c), settings.mode, settings.answer_tag), reference,
                           settings.percent)
        for c, reference in zip(completions, columns[answer_column])
    ]


# ---- Answer verification --------------------


class AccuracyReward(BuiltinReward):
    """1.0 when the completion's final answer equals the row's `answer_column`, else 0.0.

    ``make_accuracy_reward("solution")(["x"], ["\\boxed{5}"], solution=["5"]) == [1.0]``. The answer
    is found by :func:`extract_answer` (`mode`: auto, boxed, answer_tag, last_number) and compared by
    :func:`answers_match` (one answer, never a list or a hedge; numbers numerically, `percent` as
    there, LaTeX by math-verify). A row whose reference is None, or cannot be checked ("forty two"),
    gets None (not applicable); a batch without the column is an error.
    """

    def __init__(self, answer_column: str = "answer", mode: str = "auto", answer_tag: str = "answer",
                 percent: str = "number"):
        _check_answer_settings("make_accuracy_reward", mode, percent)
        self.answer_column, self.mode, self.answer_tag, self.percent = answer_column, mode, answer_tag, percent
        self.__name__ = "accuracy"

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        correct = _correctness("accuracy", "make_accuracy_reward", completions, columns, self)
        return [None if c is None else float(c) for c in correct]


make_accuracy_reward = AccuracyReward


_INTEGER = re.compile(r"[-−+]?(?:\d{1,3}(?:,\d{3})+|\d+)")


class IntegerAnswerReward(BuiltinReward):
    """1.0 when the extracted answer is an integer written plainly (``72``, ``-3``, ``1,000``), else 0.0.

    ``make_integer_answer_reward()(["q"], ["<answer>72</answer>"]) == [1.0]``; ``72.0``, ``$72``,
    ``72 apples`` and a missing answer get 0.0. By default the answer is the last ``<answer>`` tag (the
    reward teaches the answer tag to hold a bare integer, as GSM8K's answers are); `mode` as in accuracy.
    """

    def __init__(self, mode: str = "answer_tag", answer_tag: str = "answer"):
        _check_answer_settings("make_integer_answer_reward", mode, "number")
        self.mode, self.answer_tag = mode, answer_tag
        self.__name__ = "integer_answer"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        answers = (extract_answer(completion_text(c), self.mode, self.answer_tag) for c in completions)
        return [float(a is not None and _INTEGER.fullmatch(a) is not None) for a in answers]


make_integer_answer_reward = IntegerAnswerReward


# ---- Format --------------------


class FormatReward(BuiltinReward):
    """1.0 when the completion has the reasoning/answer tag structure, else 0.0.

    ``make_format_reward()(["q"], ["<think>\\nhm\\n</think>\\n<answer>\\n4\\n</answer>"]) == [1.0]``.
    Strict: the whole completion (trailing whitespace allowed) is ``<think>\\n...\\n</think>\\n<answer>
    \\n...\\n</answer>``, no tag repeated inside (re.fullmatch, DOTALL). Soft: the two tag pairs appear
    in that order anywhere (re.search, DOTALL). A custom regex `pattern` replaces the default.
    """

    def __init__(self, pattern: str | None = None, strict: bool = True, think_tag: str = "think",
                 answer_tag: str = "answer"):
        think, answer = re.escape(think_tag), re.escape(answer_tag)
        if pattern is None and strict:
            # A tempered body: repeating a tag inside the structure must not pass as the structure.
            body = rf"(?:(?!</?(?:{think}|{answer})>).)*"
            pattern = rf"<{think}>\n{body}\n</{think}>\n<{answer}>\n{body}\n</{answer}>\s*"
        elif pattern is None:
            pattern = rf"<{think}>.*?</{think}>.*?<{answer}>.*?</{answer}>"
        try:
            self._regex = re.compile(pattern, flags=re.DOTALL)
        except re.error as err:
            raise ValueError(f"make_format_reward pattern {pattern!r} is not a valid regex: {err}.") from err
        self.pattern, self.strict, self.think_tag, self.answer_tag = pattern, strict, think_tag, answer_tag
        self.__name__ = "format_reward"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        match = self._regex.fullmatch if self.strict else self._regex.search
        return [float(match(completion_text(c)) is not None) for c in completions]


make_format_reward = FormatReward


class XmlCountReward(BuiltinReward):
    """Partial credit for the tag structure: `per_tag` for each of ``<think>\\n``, ``\\n</think>\\n``,
    ``\\n<answer>\\n`` and ``\\n</answer>`` that appears exactly once (0.5 in all), minus
    `trailing_penalty` per character after that closing tag (surrounding whitespace ignored).

    ``make_xml_count_reward()(["q"], ["<think>\\nhm\\n</think>\\n<answer>\\n4\\n</answer> ok"]) == [0.498]``.
    The dense signal of the willccbb GRPO demo: it rewards each tag a model learns before it gets the
    whole structure. Unbounded below: rambling after the answer keeps costing.
    """

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer", per_tag: float = 0.125,
                 trailing_penalty: float = 0.001):
        if per_tag <= 0 or trailing_penalty < 0:
            raise ValueError(f"make_xml_count_reward needs per_tag > 0 and trailing_penalty >= 0, got per_tag={per_tag}, "
                             f"trailing_penalty={trailing_penalty}.")
        self.think_tag, self.answer_tag, self.per_tag, self.trailing_penalty = think_tag, answer_tag, per_tag, trailing_penalty
        self.__name__ = "xml_count"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        closing = f"\n</{self.answer_tag}>"
        pieces = (f"<{self.think_tag}>\n", f"\n</{self.think_tag}>\n", f"\n<{self.answer_tag}>\n", closing)
        scores = []
        for completion in completions:
            text = completion_text(completion)
            score = sum((self.per_tag for piece in pieces if text.count(piece) == 1), 0.0)
            if text.count(closing) == 1:
                score -= self.trailing_penalty * len(text.rpartition(closing)[2].strip())
            scores.append(score)
        return scores


make_xml_count_reward = XmlCountReward


# ---- Shaping --------------------


def _lengths(completions, completion_ids) -> list[int]:
    """Tokens when the caller passed the ids, else characters."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


class CosineLengthReward(BuiltinReward):
    """Correctness scaled by length on a cosine (Yeo et al., "Demystifying Long Chain-of-Thought
    Reasoning in LLMs", arXiv 2502.03373): a correct answer earns `max_value_correct` at length 0,
    falling to `min_value_correct` at `max_len`; a wrong one gets `min_value_wrong` at length 0,
    rising to `max_value_wrong` at `max_len` (thinking longer is penalised less when it is wrong).

    ``make_cosine_length_reward(max_len=100)(["q"], ["\\boxed{4}"], answer=["4"], completion_ids=[[0] * 50]) == [0.75]``.
    With ``t = min(L / max_len, 1)``: ``low + (high - low) * (1 + cos(pi t)) / 2`` where (high, low)
    is (max, min)_correct for a correct answer and (min, max)_wrong for a wrong one. L is in tokens
    when ``completion_ids`` is passed, else in characters; lengths beyond `max_len` count as `max_len`
    (open-r1's version lets the cosine turn back up there). Correctness as in accuracy (same
    settings); a row whose reference is None or cannot be checked gets None, never the wrong
    answer's value (which would punish the right answers too).
    """

    def __init__(self, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                 max_value_correct: float = 1.0, max_len: int = 1000, answer_column: str = "answer",
                 mode: str = "auto", answer_tag: str = "answer", percent: str = "number"):
        _check_answer_settings("make_cosine_length_reward", mode, percent)
        if max_len <= 0:
            raise ValueError(f"make_cosine_length_reward max_len must be a positive length, got {max_len}.")
        if min_value_correct > max_value_correct or min_value_wrong > max_value_wrong:
            raise ValueError(
                "make_cosine_length_reward needs min_value_correct <= max_value_correct and min_value_wrong <= "
                f"max_value_wrong, got correct ({min_value_correct}, {max_value_correct}) and wrong "
                f"({min_value_wrong}, {max_value_wrong})."
            )
        self.min_value_wrong, self.max_value_wrong = min_value_wrong, max_value_wrong
        self.min_value_correct, self.max_value_correct, self.max_len = min_value_correct, max_value_correct, max_len
        self.answer_column, self.mode, self.answer_tag, self.percent = answer_column, mode, answer_tag, percent
        self.__name__ = "cosine_length"

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        correct = _correctness("cosine_length", "make_cosine_length_reward", completions, columns, self)
        rewards = []
        for is_correct, length in zip(correct, _lengths(completions, completion_ids)):
            if is_correct is None:
                rewards.append(None)
                continue
            short, long = ((self.max_value_correct, self.min_value_correct) if is_correct
                           else (self.min_value_wrong, self.max_value_wrong))
            weight = (1 + math.cos(math.pi * min(length / self.max_len, 1.0))) / 2  # 1 at length 0, 0 at max_len
            rewards.append(long + (short - long) * weight)
        return rewards


make_cosine_length_reward = CosineLengthReward


class RepetitionPenaltyReward(BuiltinReward):
    """``max_penalty x (1 - distinct / total)`` over the completion's word n-grams: 0 when no n-gram
    repeats, approaching `max_penalty` as one phrase fills the completion.

    ``make_repetition_penalty_reward(2)(["q"], ["a b a b a b"]) == [-0.6]`` (5 bigrams, 2 distinct).
    Words are the lower-cased, whitespace-separated pieces (as in open-r1's version), so the value
    does not depend on the tokenizer; a completion shorter than `ngram_size` words gets 0.
    """

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0):
        if not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"make_repetition_penalty_reward ngram_size must be a positive integer, got {ngram_size!r}.")
        if max_penalty > 0:
            raise ValueError(f"make_repetition_penalty_reward max_penalty is the reward of pure repetition, so it must "
                             f"be <= 0 (e.g. -1.0), got {max_penalty}.")
        self.ngram_size, self.max_penalty = ngram_size, max_penalty
        self.__name__ = "repetition_penalty"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        n, rewards = self.ngram_size, []
        for completion in completions:
            words = completion_text(completion).lower().split()
            ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            rewards.append(self.max_penalty * (1 - len(set(ngrams)) / len(ngrams)) + 0.0 if ngrams else 0.0)  # no -0.0
        return rewards


make_repetition_penalty_reward = RepetitionPenaltyReward
