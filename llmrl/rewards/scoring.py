"""Scoring a batch with several reward functions, and DAPO's overlong shaping.

:func:`score_completions` is the one place a reward function's output is checked (count, numbers,
None), weighted and summed, so the online trainer and evaluation read rewards the same way. A
function gets what TRL's GRPOTrainer passes: the batch, `trainer_state` (global_step, max_steps,
epoch, ...), and `log_extra(column, values)` / `log_metric(name, value)` to log its own columns and
scalars; `async def` functions run concurrently, on one event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .builtins import RewardFunc, resolve_reward_func

logger = logging.getLogger(__name__)


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something that is not one number (or None) per completion."""


@dataclass
class RewardResult:
    """What :func:`score_completions` returns.

    ``names`` [F]; ``rewards [N, F]`` float32, NaN where a function returned None; ``total [N]`` the
    weighted sum over the functions that applied, NaN on rows where none did; ``means`` the mean of
    each function over the rows it applied to (NaN if none), for logging.
    """

    names: list[str]
    rewards: torch.Tensor
    total: torch.Tensor
    means: dict[str, float]
    extra: dict[str, list] = field(default_factory=dict)  # columns the functions logged with log_extra, N values each
    metrics: dict[str, float] = field(default_factory=dict)  # the mean of each scalar logged with log_metric

    @property
    def scorable(self) -> torch.Tensor:
        """``[N]`` bool: rows at least one function scored."""
        return ~torch.isnan(self.total)


def weighted_total(rewards: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """``[N, F]`` rewards (NaN = not applicable) -> ``[N]`` weighted sum, NaN where the whole row is NaN.

    ``weighted_total(torch.tensor([[1.0, nan]]), [2.0, 5.0]) == tensor([2.0])``. Weights None = all
    1.0. A NaN entry counts as 0 (TRL's nansum); a row with no entry stays NaN so that it cannot
    pass for a reward of 0 in a group baseline.
    """
    if weights is None:
        weights = [1.0] * rewards.shape[1]
    if len(weights) != rewards.shape[1]:
        raise ValueError(f"got {len(weights)} reward weights for {rewards.shape[1]} rewards: give one weight each.")
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    total = (rewards * weights).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _row(batch: dict, i: int) -> dict:
    """Row `i` of the batch, as a batch of one (non-list keywords such as trainer_state pass as they are)."""
    return {key: value[i : i + 1] if isinstance(value, list) else value for key, value in batch.items()}


def _describe(batch: dict, i: int) -> str:
    """``prompt=..., completion=..., <column>=...`` of sample `i`, each cut to about 200 characters."""
    singular = {"prompts": "prompt", "completions": "completion"}
    return ", ".join(f"{singular.get(key, key)}={_short(value[i])}" for key, value in batch.items()
                     if isinstance(value, list) and key != "completion_ids")


class RewardLog:
    """`log_extra` and `log_metric`, TRL's callbacks for a reward function: one column of N values
    (shown beside each completion in completions.jsonl) or one scalar (logged as a metric, the mean
    of the batch's calls)."""

    def __init__(self, n: int):
        self.n = n
        self.extra: dict[str, list] = {}
        self.metrics: dict[str, list[float]] = {}

    def log_extra(self, column: str, values) -> None:
        values = list(values)
        if len(values) != self.n:
            raise RewardFunctionError(f"log_extra({column!r}, ...) got {len(values)} values for {self.n} completions; "
                                      "log one value per completion.")
        self.extra[column] = values

    def log_metric(self, name: str, value) -> None:
        self.metrics.setdefault(name, []).append(float(value))

    def kwargs(self) -> dict:
        return {"log_extra": self.log_extra, "log_metric": self.log_metric}


def is_async(fn) -> bool:
    """An `async def` function (or an object whose `__call__` is one)."""
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(type(fn).__call__))


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def run_async(coroutine):
    """Run `coroutine` to its end on llmrl's event loop (a daemon thread, started once), so async
    rewards work the same from a script, a notebook (whose own loop is running) or a trainer."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="llmrl-rewards", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOP).result()


async def _gather(coroutines):
    return await asyncio.gather(*coroutines, return_exceptions=True)


def _invoke(fn: RewardFunc, batch: dict):
    output = fn(**batch)
    return run_async(output) if inspect.isawaitable(output) else output


def _outputs(pairs: list, batch: dict) -> list:
    """Each function's raw output on `batch`: plain functions one after the other, then every
    async one at once (their awaits overlap, as TRL's asyncio.gather does); a failure is re-raised
    by `_call`, which names the function and the sample."""
    waiting = [j for j, (_, fn) in enumerate(pairs) if is_async(fn)]
    outputs = [None if j in waiting else _call(name, fn, batch) for j, (name, fn) in enumerate(pairs)]
    if waiting:
        results = run_async(_gather([pairs[j][1](**batch) for j in waiting]))
        for j, result in zip(waiting, results):
            outputs[j] = _call(*pairs[j], batch) if isinstance(result, Exception) else result
    return outputs


def _call(name: str, fn: RewardFunc, batch: dict) -> list:
    """``fn(**batch)``; if it raises, re-raise naming `name` and the first sample that fails alone."""
    try:
        return _invoke(fn, batch)
    except RewardFunctionError:
        raise
    except Exception as err:
        n = len(batch["completions"])
        culprit = next((i for i in range(n) if _fails(fn, _row(batch, i))), None)
        where = f"sample {culprit}" if culprit is not None else "the batch (no sample fails alone); sample 0"
        sample = _describe(batch, culprit or 0)
        message = f"reward function {name!r} raised {type(err).__name__}: {err}\non {where}: {sample}"
        if isinstance(err, TypeError):
            message += "\nA reward function's signature is fn(prompts, completions, **kwargs) -> list[float | None]."
        raise RewardFunctionError(message) from err


def _fails(fn: RewardFunc, batch: dict) -> bool:
    try:
        _invoke(fn, batch)
    except Exception:
        return True
    return False


def _as_list(name: str, output, n: int) -> list:
    """A list, tuple, tensor or array as a list; anything else is an error naming what came back.

    A dict or a set has a length and iterates, so a check by length alone would score a dict by
    its keys (0, 1, 2, ... for one keyed by index) or a set in no order: neither is one reward per
    completion, in order."""
    values = output.tolist() if hasattr(output, "tolist") and not isinstance(output, (list, tuple)) else output
    if isinstance(values, (list, tuple)):
        return list(values)
    plain = isinstance(output, (int, float, str, bytes)) or output is None
    what = _short(output) if plain else f"a {type(output).__name__} {_short(output)}"
    raise RewardFunctionError(f"reward function {name!r} returned {what}; it must return a list of {n} numbers "
                              "(or None), one per completion, in the order of completions.")


def _checked(name: str, output, batch: dict) -> list[float]:
    """The function's output as N floats (None -> NaN), or an error naming what is wrong and where."""
    n = len(batch["completions"])
    output = _as_list(name, output, n)
    if len(output) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(output)} values for {n} completions; "
                                  "it must return exactly one per completion (None where it does not apply).")
    values = []
    for i, value in enumerate(output):
        try:
            value = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward function {name!r} returned {_short(value)} for sample {i}; "
                                      "a reward must be a number or None.") from None
        if math.isinf(value) or (math.isnan(value) and output[i] is not None):
            raise RewardFunctionError(f"reward function {name!r} returned {value} for sample {i}: "
                                      f"{_describe(batch, i)}. Return None for 'not applicable'.")
        values.append(value)
    return values


def score_completions(
    reward_funcs: Sequence,
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
    *,
    completion_ids: list[list[int]] | None = None,
    trainer_state=None,
) -> RewardResult:
    """Score N completions with F reward functions (``(name, fn)`` pairs or anything resolvable).

    ``score_completions(["format"], None, prompts, completions).total`` -> ``[N]``. Each function is
    called once on the whole batch, TRL-style: ``fn(prompts=, completions=, completion_ids=,
    trainer_state=, log_extra=, log_metric=, **columns)`` (`RewardLog`); `async def` functions are
    awaited together. Rules:

    - a function that raises is re-raised as a :class:`RewardFunctionError` naming it and showing
      the first sample on which it raises when called alone (or sample 0 if none does);
    - anything but a list (tuple, tensor, array) of N values, a non-number, NaN or inf is a
      RewardFunctionError naming the function, what it returned and the sample (a dict would be
      read by its keys; NaN would silently poison every advantage in its group);
    - None means "not applicable": NaN in ``rewards``, 0 in the weighted total, skipped by the means;
    - a row where EVERY function returned None is unscorable, as in TRL: its total is NaN (not 0,
      which would bias its group's baseline) and a warning shows it. The trainer must keep it out of
      the advantages (``result.scorable``; TRL excludes it from the group mean and zeroes its advantage).
    """
    pairs = [spec if isinstance(spec, tuple) else resolve_reward_func(spec) for spec in reward_funcs]
    if not pairs:
        raise ValueError("score_completions needs at least one reward function; set reward_funcs in the recipe.")
    columns = {key: list(value) for key, value in (columns or {}).items()}
    for key, value in columns.items():
        if len(value) != len(completions):
            raise ValueError(f"column {key!r} has {len(value)} values for {len(completions)} completions.")
    batch = {"prompts": prompts, "completions": completions, **columns}
    if completion_ids is not None:
        batch["completion_ids"] = completion_ids
    log = RewardLog(len(completions))
    raw = _outputs(pairs, {**batch, "trainer_state": trainer_state, **log.kwargs()})
    outputs = [_checked(name, output, batch) for (name, _), output in zip(pairs, raw)]
    rewards = torch.tensor(outputs, dtype=torch.float32).reshape(len(pairs), len(completions)).T
    total = weighted_total(rewards, weights)
    unscorable = torch.isnan(total).nonzero().flatten().tolist()
    if unscorable:
        logger.warning("every reward function returned None for %d of %d completions, which carry no learning "
                       "signal; the first is sample %d: %s", len(unscorable), len(completions), unscorable[0],
                       _describe(batch, unscorable[0]))
    means = {name: float(rewards[:, j].nanmean()) for j, (name, _) in enumerate(pairs)}
    metrics = {name: sum(values) / len(values) for name, values in log.metrics.items()}
    return RewardResult([name for name, _ in pairs], rewards, total, means, log.extra, metrics)


# ---- Shaping --------------------


def overlong_penalty(
    lengths, max_completion_length: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), ``[N]`` lengths -> ``[N]`` float32.

    ``overlong_penalty([80, 90, 100], 100, 20) == tensor([0.0, -0.5, -1.0])``. With
    ``start = max_completion_length - buffer_len``: 0 for ``L <= start``; ``(start - L) / buffer_len
    * penalty_factor`` inside the buffer, falling linearly to ``-penalty_factor`` at L_max; and
    ``-penalty_factor`` beyond. A completion cut off by the limit has ``L == L_max``, so truncation
    gets the full penalty. Added to the sequence reward, before advantages.
    """
    if not 0 < buffer_len <= max_completion_length:
        raise ValueError(
            f"overlong buffer_len={buffer_len} must be between 1 and max_completion_length={max_completion_length}."
        )
    lengths = torch.as_tensor(lengths)
    start = max_completion_length - buffer_len
    ramp = (start - lengths.float()) / buffer_len
    return ramp.clamp(min=-1.0, max=0.0) * penalty_factor
