"""Reward functions (TRL's signature), their resolution from a recipe, batch scoring, and shaping.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's
convention, so TRL's and open-r1's functions work here and ours work in TRL): ``prompts`` and
``completions`` are lists of N strings or, for chat data, N lists of messages (a completion is
``[{"role": "assistant", "content": ...}]``); ``columns`` are the dataset's other columns as lists
of N, plus ``completion_ids`` and ``trainer_state``, which a function may ignore via ``**kwargs``.
``None`` means "not applicable to this row" (e.g. a row with no reference answer).

- :mod:`.answers`: completion text, final-answer extraction, one answer's value and unit.
- :mod:`.matching`: answer against reference (one value, a set or a tuple; numbers here, LaTeX by
  the optional math-verify: ``pip install 'llmrl[math]'``); an unreadable reference gives None.
- :mod:`.reasoning`: the ``make_*_reward`` factories of the reasoning rewards: accuracy, the
  ``<think>``/``<answer>`` format family (format_strict, format_soft, xml_count, integer_answer)
  and shaping (cosine_length, repetition_penalty).
- :mod:`.builtins`: ``REWARD_FUNCTIONS`` (each reward above with its defaults, plus ``format``, the
  first name of format_strict, and ``length``), and ``resolve_reward_funcs`` for recipe entries
  (built-in names, ``package.module:function``, callables).
- :mod:`.scoring`: ``score_completions`` (call, check, weight, sum) and ``overlong_penalty`` (DAPO).
"""

from .answers import (
    ANSWER_MODES,
    PERCENT_MODES,
    completion_text,
    extract_answer,
    parse_number,
    reference_answer,
)
from .builtins import (
    REWARD_FUNCTIONS,
    RewardSpecError,
    make_length_reward,
    resolve_reward_func,
    resolve_reward_funcs,
)
from .matching import answers_match, symbolic_equal
from .reasoning import (
    REASONING_SYSTEM_PROMPT,
    make_accuracy_reward,
    make_cosine_length_reward,
    make_format_reward,
    make_integer_answer_reward,
    make_repetition_penalty_reward,
    make_xml_count_reward,
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
    "PERCENT_MODES",
    "REASONING_SYSTEM_PROMPT",
    "REWARD_FUNCTIONS",
    "RewardFunctionError",
    "RewardResult",
    "RewardSpecError",
    "answers_match",
    "completion_text",
    "extract_answer",
    "make_accuracy_reward",
    "make_cosine_length_reward",
    "make_format_reward",
    "make_integer_answer_reward",
    "make_length_reward",
    "make_repetition_penalty_reward",
    "make_xml_count_reward",
    "overlong_penalty",
    "parse_number",
    "reference_answer",
    "resolve_reward_func",
    "resolve_reward_funcs",
    "score_completions",
    "symbolic_equal",
    "weighted_total",
]
