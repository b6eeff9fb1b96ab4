"""The registry of built-in reward functions, and the resolution of recipe entries to functions.

Every built-in has TRL's signature ``fn(prompts, completions, **kwargs) -> list[float | None]``
and reads completions through :func:`completion_text`, so strings and chat messages both work. Each is
an instance of a module-level class, so it pickles (a process pool, TRL's async reward worker). The
reasoning rewards live in :mod:`.reasoning`; the plain length reward lives here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from llmrl.config import closest_name

from .answers import completion_text
from .reasoning import (
    BuiltinReward,
    RewardFunc,
    make_accuracy_reward,
    make_cosine_length_reward,
    make_format_reward,
    make_integer_answer_reward,
    make_repetition_penalty_reward,
    make_xml_count_reward,
)


def _builtin(name: str, factory: Callable[..., RewardFunc], **settings) -> RewardFunc:
    """`factory(**settings)` named `name` (TRL logs a function under its __name__) and documented by
    its factory, so ``REWARD_FUNCTIONS[name].__doc__`` says what it computes and how to configure it."""
    fn = factory(**settings)
    fn.__name__ = name
    given = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    fn.__doc__ = f"The built-in reward {name!r}: {factory.__name__}({given}).\n\n{factory.__doc__}"
    return fn


class LengthReward(BuiltinReward):
    """A reward for length in characters: shortness, or closeness to a `target` length.

    ``make_length_reward(100)(["q"], ["x" * 150]) == [-0.5]``. With a target: ``-|len - target| /
    target`` (0 at the target, -1 at empty or twice the target). Without: ``-len / 1000`` (minus one
    per thousand characters), TRL's length-penalty example. Characters, not tokens, so the reward
    means the same under any tokenizer.
    """

    def __init__(self, target: int | None = None):
        if target is not None and target <= 0:
            raise ValueError(f"make_length_reward target must be a positive number of characters, got {target}.")
        self.target = target
        self.__name__ = "length"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        lengths = [len(completion_text(c)) for c in completions]
        if self.target is None:
            return [-n / 1000 for n in lengths]
        return [-abs(n - self.target) / self.target for n in lengths]


make_length_reward = LengthReward


# Each built-in with its factory's defaults; a configured variant comes from the factory, e.g. in a
# module of your own named in the recipe as 'my_rewards:accuracy_percent'.
REWARD_FUNCTIONS: dict[str, RewardFunc] = {
    name: _builtin(name, factory, **settings)
    for name, factory, settings in [
        ("accuracy", make_accuracy_reward, {}),
        ("format", make_format_reward, {}),  # the first name of format_strict, kept for existing recipes
        ("format_strict", make_format_reward, {}),
        ("format_soft", make_format_reward, {"strict": False}),
        ("xml_count", make_xml_count_reward, {}),
        ("integer_answer", make_integer_answer_reward, {}),
        ("cosine_length", make_cosine_length_reward, {}),
        ("repetition_penalty", make_repetition_penalty_reward, {}),
        ("length", make_length_reward, {}),
    ]
}


# ---- Resolving recipe entries --------------------


class RewardSpecError(ValueError):
    """A recipe's reward function cannot be found: an unknown name, a module that does not import,
    or a missing attribute."""


def _import_function(spec: str) -> RewardFunc:
    """``"package.module:function"`` -> the function, with errors that say which half failed."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardSpecError(
            f"reward function {spec!r}: could not import module {module_name!r} ({type(err).__name__}: {err}). "
            "Check the spelling, and that its folder is on PYTHONPATH (or the package is installed)."
        ) from err
    if not hasattr(module, attribute):
        defined = sorted(
            name for name, value in vars(module).items()
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module_name
        )
        raise RewardSpecError(
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
        raise RewardSpecError(f"reward function {spec!r} must be a built-in name, 'package.module:function' or a callable.")
    if ":" in spec:
        fn = _import_function(spec)
        if not callable(fn):
            raise RewardSpecError(f"reward function {spec!r} is a {type(fn).__name__}, not a function.")
        return spec.rpartition(":")[2], fn
    if spec not in REWARD_FUNCTIONS:
        hint = closest_name(spec, REWARD_FUNCTIONS)
        hint = f" Did you mean {hint!r}?" if hint else ""
        if "." in spec:  # a dotted path without the colon: the user meant to import it
            module_name, _, attribute = spec.rpartition(".")
            hint = f" To import a function, write {module_name + ':' + attribute!r}."
        raise RewardSpecError(
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
