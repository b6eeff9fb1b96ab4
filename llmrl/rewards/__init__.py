"""Reward functions (TRL's signature), their resolution from a recipe, batch scoring, and shaping.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's
convention, so TRL's and open-r1's functions work here and ours work in TRL): ``prompts`` and
``completions`` are lists of N strings or, for chat data, N lists of messages (a completion is
``[{"role": "assistant", "content": ...}]``); ``columns`` are the dataset's other columns as lists
of N, plus ``completion_ids`` and ``trainer_state``, which a function may ignore via ``**kwargs``.
``None`` means "not applicable to this row" (e.g. a row with no reference answer).

- :mod:`.answers`: completion text, final-answer extraction and matching (pure string functions).
- :mod:`.builtins`: ``REWARD_FUNCTIONS`` (accuracy, format, format_soft, length), the
  ``make_*_reward`` factories for configured variants, and ``resolve_reward_funcs`` for recipe
  entries (built-in names, ``package.module:function``, callables).
- :mod:`.scoring`: ``score_completions`` (call, check, weight, sum) and ``overlong_penalty`` (DAPO).
"""

from .answers import (
    ANSWER_MODES,
    answers_match,
    completion_text,
    extract_answer,
    parse_number,
)
from .builtins import (
    REWARD_FUNCTIONS,
    make_accuracy_reward,
    make_format_reward,
    make_length_reward,
    resolve_reward_func,
    resolve_reward_funcs,
)
from .scoring import (
    RewardFunctionError,
    RewardResult,
    overlong_penalty,
    score_completions,
    weighted_total,
)

__all__ = [
    "ANSWER_MODES",
    "REWARD_FUNCTIONS",
    "RewardFunctionError",
    "RewardResult",
    "answers_match",
    "completion_text",
    "extract_answer",
    "make_accuracy_reward",
    "make_format_reward",
    "make_length_reward",
    "overlong_penalty",
    "parse_number",
    "resolve_reward_func",
    "resolve_reward_funcs",
    "score_completions",
    "weighted_total",
]
