"""What every llmrl trainer logs, and where: JSON lines on stdout, `report_to` trackers, a progress bar.

    logger = RunLogger(accelerator, args, total_steps, config=recipe_dict)
    logger.log({"loss": 0.7, "reward": 0.4}, step=3)          # train metrics
    logger.log({"accuracy": 0.5}, step=3, prefix="eval/")     # eval metrics, logged at once
    logger.close()

Trackers are accelerate's (`Accelerator(log_with=...)`, see `make_accelerator`), so tensorboard,
wandb and trackio work the same under one or many processes; only the main process writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

# report_to name -> the package it needs (the pip extra that brings it).
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "llmrl[tracking]"), "wandb": ("wandb", "llmrl[wandb]"),
                     "trackio": ("trackio", "trackio")}


def tracker_names(report_to) -> list[str]:
    """The accelerate trackers for `report_to` ("none" -> none, "all" -> every installed one);
    a named tracker whose package is missing is an error that says what to install."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "none" in names:
        return []
    if "all" in names:
        return [name for name, (module, _) in _TRACKER_PACKAGES.items() if importlib.util.find_spec(module)]
    for name in names:
        module, extra = _TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to: {name} needs the {module!r} package: pip install '{extra}' "
                             f"(or set report_to: none).")
    return names


def logging_dir(args) -> str:
    return args.logging_dir or str(Path(args.output_dir) / "runs")


def _loggable(config: dict) -> dict:
    """The config values trackers accept as hyperparameters (scalars; lists as strings)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in config.items() if value is not None}


def _rounded(value):
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 6)
    return value


class RunLogger:
    """One run's logging. `log()` keeps every record in `history`; the main process prints a JSON
    line every `args.logging_steps` steps (and for every eval record), sends the record to the
    trackers, and moves the progress bar."""

    def __init__(self, accelerator, args, total_steps: int, config: dict | None = None, start_step: int = 0):
        self.accelerator, self.args = accelerator, args
        self.total_steps = total_steps
        self.history: list[dict] = []
        main = accelerator.is_main_process
        if accelerator.trackers == [] and accelerator.log_with:
            accelerator.init_trackers(Path(args.output_dir).name or "llmrl", config=_loggable(config or {}))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=args.algorithm, dynamic_ncols=True,
                        disable=not main or args.disable_tqdm)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """`with logger:` around the loop: a run that fails ends its progress-bar line, so the
        error is printed on a line of its own (the bar ends its line without a newline)."""
        if kind is not None:
            self.bar.close()
        return False

    def log(self, metrics: dict, step: int, prefix: str = "") -> dict:
        """Record `metrics` (prefixed) at `step`; returns the record."""
        record = {f"{prefix}{key}": value for key, value in metrics.items()}
        record["step"] = step
        self.history.append(record)
        if not self.accelerator.is_main_process:
            return record
        if not prefix:
            self.bar.update(step - self.bar.n)
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "reward", "accuracy") if isinstance(record.get(k), float)}
            self.bar.set_postfix(shown, refresh=False)
        if prefix or step % max(1, self.args.logging_steps) == 0 or step >= self.total_steps:
            tqdm.write(json.dumps({key: _rounded(value) for key, value in record.items()}))
        if self.accelerator.log_with:
            self.accelerator.log({tracker_tag(k): v for k, v in record.items() if k != "step"}, step=step)
        return record

    def close(self):
        """Finish the trackers (flush their files). Not `accelerator.end_training()`: it also
        destroys the process group, which the final save still needs to wait for every process."""
        self.bar.close()
        for tracker in self.accelerator.trackers:
            tracker.finish()


def tracker_tag(key: str) -> str:
    """A record's key as TRL's trainers name it in trackers, so dashboards and comparisons line up:
    training metrics under `train/`, a reward function's mean and std as `rewards/<name>/mean` and
    `rewards/<name>/std`; `eval/` keys stay as they are. (Printed lines and `log_history` keep
    llmrl's flat names.)"""
    if key.startswith("eval/"):
        return key
    if key.startswith("rewards/"):
        name = key[len("rewards/"):]
        key = f"rewards/{name[:-4]}/std" if name.endswith("_std") else f"rewards/{name}/mean"
    return f"train/{key}"


def append_jsonl(path, rows: list[dict]) -> None:
    """Append `rows` to a JSON-lines file (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def drop_rows_after(path, step: int) -> None:
    """Keep the rows of a JSON-lines file logged at `step` or before (and drop a line a kill cut
    short): a resumed run replays the steps after its checkpoint and logs them again. Rewritten
    under a temporary name, then renamed."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
