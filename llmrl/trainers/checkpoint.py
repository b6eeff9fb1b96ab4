"""Checkpoints every trainer writes and resumes from.

`output_dir/checkpoint-<step>/` holds accelerate's state (model, optimizer, every process's RNG),
`trainer_state.json` (step, data position and the LR schedules' states) and `model/`, a plain
`save_pretrained` folder (full model or adapter, plus tokenizer) that loads with no llmrl import.
It is written under a temporary name and renamed when complete, so a crash mid-save never leaves a
broken newest checkpoint: a half-written one keeps its temporary name and is ignored.

Resuming never unpickles: a checkpoint may come from someone else, and unpickling runs whatever
code the file names. The schedules are JSON in trainer_state.json, not objects registered with
accelerate (which reloads those with `weights_only=False`); accelerate loads the optimizer and RNG
files with `weights_only=True`, and the RNG files, whose failure it would swallow, are checked here
first, so a file that needs more than tensors and plain values is refused by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """An output_dir or checkpoint llmrl will not use as it is (the message says why and what to do)."""


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


# What a finished or interrupted run leaves in its output_dir, besides checkpoint folders.
RUN_FILES = ("model.safetensors", "adapter_model.safetensors", "completions.jsonl")


def _resuming(resume_from_checkpoint) -> bool:
    return resume_from_checkpoint is not None and str(resume_from_checkpoint).lower() not in ("false", "no", "")


def previous_run(output_dir) -> list[str]:
    """What another run left in `output_dir`: its checkpoints (complete or not), model and samples."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.iterdir() if p.name.startswith((PREFIX, f".tmp-{PREFIX}")))
    return found + [name for name in RUN_FILES if (folder / name).exists()]


def claim_output_dir(args, state) -> None:
    """Before a fresh run writes anything: an `output_dir` holding another run's checkpoints or model
    is refused (a new run would overwrite some of them and leave the rest, and a later resume would
    pick the old run's newest checkpoint), unless the run resumes it or `overwrite_output_dir` says
    to replace it: then the old checkpoints and samples go first. `state`: the process state (the
    main process deletes, every process waits)."""
    found = [] if _resuming(args.resume_from_checkpoint) else previous_run(args.output_dir)
    if found and not args.overwrite_output_dir:
        raise CheckpointError(
            f"output_dir {args.output_dir} holds a previous run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
            "resume it with resume_from_checkpoint: true, replace it with overwrite_output_dir: true, or choose "
            "another output_dir.")
    if found and state.is_main_process:
        for name in found:
            path = Path(args.output_dir) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        state.wait_for_everyone()


def save_recipe(recipe, state) -> None:
    """The resolved config as output_dir/config.yaml, once the run has started (the trainer is
    built): a run that fails on its data or model leaves the previous run's config alone."""
    if state.is_main_process:
        recipe.save()


def resolve_resume(resume_from_checkpoint: str | None, output_dir) -> Path | None:
    """The checkpoint to resume from: None for unset/'false', the newest in `output_dir` for 'true',
    else the given folder (which must be a checkpoint)."""
    if not _resuming(resume_from_checkpoint):
        return None
    if str(resume_from_checkpoint).lower() in ("true", "yes", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: true, but {output_dir} holds no {PREFIX}<step> folder yet. "
                             "Remove the setting to start fresh.")
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint folder (no trainer_state.json); "
                         f"give a {PREFIX}<step> folder or 'true' for the newest.")
    return path


def write_exports(folder, exports: dict, tokenizer) -> None:
    """Main process: each of `exports` ({subfolder: (export, state_dict)}; "." = `folder` itself)
    written with `save_pretrained`, from its gathered `state_dict` when the model is sharded (None:
    the export reads its own weights), with the tokenizer beside it, so each loads on its own."""
    for name, (export, state_dict) in exports.items():
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        export.save_pretrained(target, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(target)


def save_checkpoint(accelerator, output_dir, step: int, state: dict, exports: dict, tokenizer,
                    save_total_limit: int | None = None, schedulers=()) -> Path:
    """Write `checkpoint-<step>` atomically (every process must call this); returns its path.

    `exports` ({subfolder: (export, state_dict)}, see `write_exports`; the policy as "model") are
    the plain folders; `state` and the `schedulers`' states go to trainer_state.json. With
    `save_total_limit`, only the newest that many checkpoints are kept.
    """
    state = {**state, "lr_schedulers": [scheduler.state_dict() for scheduler in schedulers]}
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # the leftover of a crash
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_exports(tmp, exports, tokenizer)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _safe_load(path: Path):
    """`path` loaded as tensors and plain values only (accelerate's `load`: weights_only=True, numpy
    arrays allowed), or a ValueError that names the file."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any failure: the file is not what llmrl wrote
        raise CheckpointError(
            f"Refusing to resume from {path}: it does not load as tensors and plain values ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}). llmrl never unpickles objects from a checkpoint, since unpickling "
            "runs whatever code the file names; resume only checkpoints you trust, or start the run afresh.") from None


def load_checkpoint(accelerator, path, schedulers=()) -> dict:
    """Restore model, optimizer, RNG and the `schedulers` from `path`; returns its trainer_state.json."""
    path = Path(path)
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*"))
    if pickled:  # accelerate would unpickle these with weights_only=False: any code they name would run
        raise CheckpointError(
            f"Refusing to resume from {path}: {pickled[0]} is a pickled object, which llmrl never loads (unpickling runs "
            "whatever code the file names). llmrl writes none (its LR schedules are in trainer_state.json); an older "
            "llmrl kept the schedule there: delete the file to resume, and the schedule is rebuilt from the step.")
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if rng.is_file():
        _safe_load(rng)  # accelerate would swallow this failure and resume with other random numbers
    else:
        logger.warning("%s holds no %s: this process resumes with fresh random numbers, so the run will not "
                       "repeat an uninterrupted one exactly.", path, rng.name)
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("lr_schedulers")
    if saved is None:  # an older checkpoint: each schedule is a function of the step, one step() per step
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for scheduler in schedulers:
                for _ in range(state["step"]):
                    scheduler.step()
        return state
    if len(saved) != len(schedulers):
        raise CheckpointError(f"{path} holds {len(saved)} learning-rate schedule(s), this run has {len(schedulers)}: "
                         "it was written by another kind of run (e.g. PPO with a critic against one without).")
    for scheduler, scheduler_state in zip(schedulers, saved):
        scheduler.load_state_dict(scheduler_state)
    return state
