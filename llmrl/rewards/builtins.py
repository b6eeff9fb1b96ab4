"""The built-in reward functions, their factories, and the resolution of recipe entries to functions.

Every function here has TRL's signature ``fn(prompts, completions, **kwargs) -> list[float | None]``
and reads completions through :func:`completion_text`, so strings and chat messages both work.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from llmrl.config import closest_name

from .answers import ANSWER_MODES, answers_match, completion_text, extract_answer

RewardFunc = Callable[..., list]

# Keywords TRL (and score_completions) pass besides the dataset's columns.
NOT_COLUMNS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def _named(fn: RewardFunc, name: str) -> RewardFunc:
    # TRL logs a function under its __name__, so a factory's product carries its registry name.
    fn.__name__ = fn.__qualname__ = name
    return fn


def make_accuracy_reward(answer_column: str = "answer", mode: str = "auto", answer_tag: str = "answer") -> RewardFunc:
    """1.0 when the completion's final answer equals the row's `answer_column`, else 0.0.

    ``make_accuracy_reward("solution")(["x"], ["\\boxed{5}"], solution=["5"]) == [1.0]``. The answer
    is found by :func:`extract_answer` (`mode`) and compared by :func:`answers_match`. A row whose
    reference is None gets None (not applicable); a batch without the column is an error.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"make_accuracy_reward mode {mode!r} is not valid; choose one of {list(ANSWER_MODES)}.")

    def accuracy(prompts, completions, **columns) -> list[float | None]:
        if answer_column not in columns:
            passed = sorted(key for key in columns if key not in NOT_COLUMNS)
            raise ValueError(
                f"the accuracy reward needs the dataset column {answer_column!r} (the reference answers), but "
                f"the batch has only the columns {passed}. Add the column to the dataset, or build the reward "
                "with make_accuracy_reward(answer_column=...) naming the column that holds the answers."
            )
        return [
            None if reference is None
            else float(answers_match(extract_answer(completion_text(c), mode, answer_tag), reference))
            for c, reference in zip(completions, columns[answer_column])
        ]

    return accuracy


def make_format_reward(
    pattern: str | None = None, strict: bool = True, think_tag: str = "think", answer_tag: str = "answer"
) -> RewardFunc:
    """1.0 when the completion has the reasoning/answer tag structure, else 0.0.

    ``make_format_reward()(["q"], ["<think>\\nhm\\n</think>\\n<answer>\\n4\\n</answer>"]) == [1.0]``.
    Strict: the whole completion (trailing whitespace allowed) is ``<think>\\n...\\n</think>\\n<answer>
    \\n...\\n</answer>``, no tag repeated inside (re.fullmatch, DOTALL). Soft: the two tag pairs appear
    in that order anywhere (re.search, DOTALL). A custom regex `pattern` replaces the default.
    """
    think, answer = re.escape(think_tag), re.escape(answer_tag)
    if pattern is None and strict:
        # A tempered body: repeating a tag inside the structure must not pass as the structure.
        body = rf"(?:(?!</?(?:{think}|{answer})>).)*"
        pattern = rf"<{think}>\n{body}\n</{think}>\n<{answer}>\n{body}\n</{answer}>\s*"
    elif pattern is None:
        pattern = rf"<{think}>.*?</{think}>.*?<{answer}>.*?</{answer}>"
    try:
        regex = re.compile(pattern, flags=re.DOTALL)
    except re.error as err:
        raise ValueError(f"make_format_reward pattern {pattern!r} is not a valid regex: {err}.") from err
    match = regex.fullmatch if strict else regex.search

    def format_reward(prompts, completions, **kwargs) -> list[float]:
        return [float(match(completion_text(c)) is not None) for c in completions]

    return format_reward


def make_length_reward(target: int | None = None) -> RewardFunc:
    """A reward for length in characters: shortness, or closeness to a `target` length.

    ``make_length_reward(100)(["q"], ["x" * 150]) == [-0.5]``. With a target: ``-|len - target| /
    target`` (0 at the target, -1 at empty or twice the target). Without: ``-len / 1000`` (minus one
    per thousand characters), TRL's length-penalty example. Characters, not tokens, so the reward
    means the same under any tokenizer.
    """
    if target is not None and target <= 0:
        raise ValueError(f"make_length_reward target must be a positive number of characters, got {target}.")

    def length(prompts, completions, **kwargs) -> list[float]:
        lengths = [len(completion_text(c)) for c in completions]
        if target is None:
            return [-n / 1000 for n in lengths]
        return [-abs(n - target) / target for n in lengths]

    return length


REWARD_FUNCTIONS: dict[str, RewardFunc] = {
    "accuracy": _named(make_accuracy_reward(), "accuracy"),
    "format": _named(make_format_reward(), "format"),
    "format_soft": _named(make_format_reward(strict=False), "format_soft"),
    "length": _named(make_length_reward(), "length"),
}


# ---- Resolving recipe entries --------------------


def _import_function(spec: str) -> RewardFunc:
    """``"package.module:function"`` -> the function, with errors that say which half failed."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(
            f"reward function {spec!r}: could not import module {module_name!r} ({type(err).__name__}: {err}). "
            "Check the spelling, and that its folder is on PYTHONPATH (or the package is installed)."
        ) from err
    if not hasattr(module, attribute):
        defined = sorted(
            name for name, value in vars(module).items()
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module_name
        )
        raise ValueError(
            f"reward function {spec!r}: module {module_name!r} has no function {attribute!r}; "
            f"it defines {defined or 'no public functions'}."
        )
    return getattr(module, attribute)


def resolve_reward_func(spec) -> tuple[str, RewardFunc]:
    """One recipe entry -> ``(name, fn)``: ``resolve_reward_func("format") == ("format", REWARD_FUNCTIONS["format"])``.

    A built-in name, ``"package.module:function"`` (named by the function), or a callable (named by
    its ``__name__``).
    """
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if not isinstance(spec, str):
        raise TypeError(f"reward function {spec!r} must be a built-in name, 'package.module:function' or a callable.")
    if ":" in spec:
        fn = _import_function(spec)
        if not callable(fn):
            raise TypeError(f"reward function {spec!r} is a {type(fn).__name__}, not a function.")
        return spec.rpartition(":")[2], fn
    if spec not in REWARD_FUNCTIONS:
        hint = closest_name(spec, REWARD_FUNCTIONS)
        hint = f" Did you mean {hint!r}?" if hint else ""
        if "." in spec:  # a dotted path without the colon: the user meant to import it
            module_name, _, attribute = spec.rpartition(".")
            hint = f" To import a function, write {module_name + ':' + attribute!r}."
        raise ValueError(
            f"unknown reward function {spec!r}.{hint} Built-ins: {sorted(REWARD_FUNCTIONS)}; "
            "a function of your own is named 'package.module:function'."
        )
    return spec, REWARD_FUNCTIONS[spec]


def resolve_reward_funcs(specs: Sequence) -> list[tuple[str, RewardFunc]]:
    """Recipe entries -> ``[(name, fn)]``, in order.

    ``resolve_reward_funcs(["accuracy", "my_pkg.rewards:brevity", fn])`` -> names ``accuracy``,
    ``brevity``, ``fn.__name__``. A name used twice gets a suffix (``accuracy_2``), since the names
    key the logged metrics.
    """
    resolved, seen = [], {}
    for spec in ([specs] if isinstance(specs, str) or callable(specs) else specs):
        name, fn = resolve_reward_func(spec)
        seen[name] = seen.get(name, 0) + 1
        resolved.append((name if seen[name] == 1 else f"{name}_{seen[name]}", fn))
    return resolved
