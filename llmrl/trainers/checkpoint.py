"""Checkpoints every trainer writes and resumes from.

`output_dir/checkpoint-<step>/` holds accelerate's state (model, optimizer, every process's RNG),
`trainer_state.json` (step, data position and the LR schedules' states) and `model/`, a plain
`save_pretrained` folder (full model or adapter, plus tokenizer) that loads with no llmrl import.
The checkpoint folder itself loads with `from_pretrained` too, as the HF Trainer's checkpoints do
(`make_loadable`): beside accelerate's weights are the model's config and tokenizer (or the
adapter's files).
Every save is written under a temporary name (`.tmp-checkpoint-<step>`, `.tmp-final`) and renamed
when complete, so a crash mid-save never leaves a broken newest checkpoint or a truncated final
model; the next run removes the leftover. A resume takes the newest checkpoint that is complete and
loadable (`checkpoint_problem`) and says which ones it skipped and why. A save that runs out of disk
removes what it wrote and stops with a `CheckpointError` that says so.

Resuming never unpickles: a checkpoint may come from someone else, and unpickling runs whatever
code the file names. The schedules are JSON in trainer_state.json, not objects registered with
accelerate (which reloads those with `weights_only=False`); before anything loads, every torch file
of the chosen checkpoint (any trainer's) is opened with `weights_only=True`, so a file that needs
more than tensors and plain values is refused by name (accelerate would swallow an RNG file's
failure, transformers would raise torch's traceback).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP = ".tmp-"  # what a save writes into until it is complete


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
    found = sorted(p.name for p in folder.iterdir() if p.name.startswith((PREFIX, TMP)))
    return found + [name for name in RUN_FILES if (folder / name).exists()]


def remove_leftovers(output_dir) -> None:
    """Main process: delete the temporary folders of saves that did not finish (a kill, a full disk)."""
    folder = Path(output_dir)
    for leftover in sorted(folder.glob(f"{TMP}*")) if folder.is_dir() else []:
        print(f"llmrl: removing {leftover}, the unfinished save of an earlier run", flush=True)
        shutil.rmtree(leftover, ignore_errors=True)


def claim_output_dir(args, state) -> None:
    """Before a fresh run writes anything: an `output_dir` holding another run's checkpoints or model
    is refused (a new run would overwrite some of them and leave the rest, and a later resume would
    pick the old run's newest checkpoint), unless the run resumes it or `overwrite_output_dir` says
    to replace it: then the old checkpoints and samples go first. A resumed run removes the
    leftovers of unfinished saves. `state`: the process state (the main process deletes, every
    process waits)."""
    if _resuming(args.resume_from_checkpoint):
        if state.is_main_process:
            remove_leftovers(args.output_dir)
        state.wait_for_everyone()
        return
    found = previous_run(args.output_dir)
    # Every process has looked before the main one deletes, and every process meets the same
    # barriers: one that looked after the deletion (a clean folder) would skip a barrier the main
    # process waits at for ever.
    state.wait_for_everyone()
    if found and not args.overwrite_output_dir:
        raise CheckpointError(
            f"output_dir {args.output_dir} holds a previous run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
            "resume it with resume_from_checkpoint: true, replace it with overwrite_output_dir: true, or choose "
            "another output_dir.")
    if found and state.is_main_process:
        for name in found:
            path = Path(args.output_dir) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    state.wait_for_everyone()


def save_recipe(recipe, state) -> None:
    """The resolved config as output_dir/config.yaml, once the run has started (the trainer is
    built): a run that fails on its data or model leaves the previous run's config alone."""
    if state.is_main_process:
        recipe.save()


def resolve_resume(resume_from_checkpoint: str | None, output_dir) -> Path | None:
    """The checkpoint to resume from: None for unset/'false', for 'true' the newest complete and
    loadable one in `output_dir` (each newer one skipped is named with the reason), else the given
    folder, which must be a complete checkpoint. Either way its files must hold no pickled objects
    (`refuse_pickled_objects`)."""
    if not _resuming(resume_from_checkpoint):
        return None
    if str(resume_from_checkpoint).lower() in ("true", "yes", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: true, but {output_dir} holds no {PREFIX}<step> folder yet. "
                                  "Remove the setting to start fresh.")
        skipped = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                for name, why in skipped:
                    logger.warning("llmrl: skipping %s: %s; resuming from %s instead.", name, why, path.name)
                refuse_pickled_objects(path)
                return path
            skipped.append((path.name, problem))
        raise CheckpointError(f"No checkpoint in {output_dir} can be resumed: "
                              + "; ".join(f"{name}: {why}" for name, why in skipped)
                              + ". Start afresh with overwrite_output_dir: true.")
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint={str(path)!r} is not a folder; give a {PREFIX}<step> folder or "
                              "'true' for the newest.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"Cannot resume from {path}: {problem}. Give another {PREFIX}<step> folder, or 'true' "
                              "for the newest complete one.")
    refuse_pickled_objects(path)
    return path


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed (None if it can): trainer_state.json must
    parse and hold the step, the folder must hold weights, and no weights, optimizer or RNG file
    may be truncated. Reads only headers and zip directories, not the tensors."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "it holds no trainer_state.json (its save did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        return f"trainer_state.json is not valid JSON ({error})"
    if not isinstance(state, dict) or not isinstance(state.get("step", state.get("global_step")), int):
        return "trainer_state.json holds no step"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not any(p.suffix == ".safetensors" or p.name in TORCH_WEIGHTS for p in files):
        return "it holds no model weights"
    for file in files:
        problem = None if file.name.startswith("custom_checkpoint_") else _file_problem(file)  # refused by name later
        if problem is not None:
            return f"{file.relative_to(path)} {problem}"
    return None


TORCH_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")


def _file_problem(file: Path) -> str | None:
    """Why `file` is cut short (None if it looks whole): safetensors must hold every byte its header
    names, torch files (zip archives) must end with their directory, which is written last."""
    size = file.stat().st_size
    if file.suffix == ".safetensors":
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (header_size,) = struct.unpack("<Q", head)
            if 8 + header_size > size:
                return f"is truncated ({size} bytes, its header alone needs {8 + header_size})"
            try:
                header = json.loads(handle.read(header_size))
            except ValueError:
                return "has a corrupt header"
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return f"is truncated ({size} bytes of {8 + header_size + end})" if 8 + header_size + end > size else None
    if file.suffix in TORCH_FILES:
        if size == 0 or not zipfile.is_zipfile(file):
            return f"is truncated or not a torch file ({size} bytes)"
    return None
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
    tmp = Path(output_dir) / f"{TMP}{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # the leftover of a crash
    accelerator.wait_for_everyone()
    with reporting_full_disk(tmp, final.name, output_dir):
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            write_exports(tmp, exports, tokenizer)
            make_loadable(tmp, exports.get("model"), tokenizer)
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_checkpoint(tmp, final, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def make_loadable(folder: Path, policy, tokenizer) -> None:
    """`from_pretrained(checkpoint folder)` loads the policy, as with TRL's and the HF Trainer's
    checkpoints. A full model's weights are already there (accelerate's model.safetensors holds the
    names save_pretrained writes), so only its config and tokenizer are added; an adapter's files
    are written beside them (transformers and peft read those, not the full state). A sharded run
    (FSDP, DeepSpeed) keeps its weights in its own format: its policy is in `model/` only."""
    if policy is None:
        return
    export, state_dict = policy
    if not isinstance(export, PreTrainedModel):  # an adapter (or a combination of them)
        write_exports(folder, {".": policy}, tokenizer)
    elif (folder / "model.safetensors").is_file():
        export.config.save_pretrained(folder)
        if export.generation_config is not None:
            export.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def publish_checkpoint(tmp: Path, final: Path, save_total_limit: int | None = None) -> None:
    """Main process: the complete checkpoint at `tmp` renamed to `final` (replacing one of the same
    step), then the oldest removed beyond `save_total_limit`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if save_total_limit:
        for old in list_checkpoints(final.parent)[:-save_total_limit]:
            shutil.rmtree(old)


def save_final(accelerator, output_dir, write, main_only: bool = True) -> None:
    """The final model written atomically file by file: `write(folder)` fills a temporary folder in
    `output_dir` (on the main process, or on every process if not `main_only`: a sharded model
    gathers as it saves), whose files are then renamed into place, so no file of the final model is
    ever half-written. Every process must call this."""
    tmp = Path(output_dir) / f"{TMP}final"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process or not main_only:
        with reporting_full_disk(tmp, "the final model", output_dir):
            write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for entry in sorted(tmp.iterdir()):
            target = Path(output_dir) / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()
    accelerator.wait_for_everyone()


@contextmanager
def reporting_full_disk(tmp: Path, what: str, output_dir):
    """A save into `tmp` that fails removes `tmp`; one that failed for lack of space (which torch
    reports as "unexpected pos") becomes a CheckpointError that says so."""
    try:
        yield
    except Exception as error:
        full = _out_of_space(error, Path(output_dir))
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        newest = list_checkpoints(output_dir)
        raise CheckpointError(
            f"The disk of {output_dir} is full: writing {what} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}). The unfinished save was removed"
            f"{f'; {newest[-1].name} is the newest checkpoint' if newest else ''}. Free some space, lower "
            "save_total_limit or use another output_dir, then resume with resume_from_checkpoint: true.") from None


FULL_DISK_SLACK = 64 * 2 ** 20  # a write can fail with this much still free: the rest of its buffer did not fit


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Did `error` come from a full disk? ENOSPC when the OS says it; torch's zip writer and
    safetensors only say "unexpected pos" or IoError, so then: is the disk (nearly) full?"""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "StorageFull" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_SLACK
    except OSError:
        return False


def refuse_pickled_objects(path) -> None:
    """Every torch file of the checkpoint `path` (optimizer, scheduler, RNG, arguments) must load as
    tensors and plain values, or the resume stops naming the file. Checked before anything loads,
    for every trainer: accelerate would swallow an RNG file's failure, transformers would raise
    torch's traceback. Memory-mapped, so a large optimizer file costs no read."""
    path = Path(path)
    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*"))
    if pickled:  # accelerate would unpickle these with weights_only=False: any code they name would run
        raise CheckpointError(
            f"Refusing to resume from {path}: {pickled[0]} is a pickled object, which llmrl never loads (unpickling runs "
            "whatever code the file names). llmrl writes none (its LR schedules are in trainer_state.json); an older "
            "llmrl kept the schedule there: delete the file to resume, and the schedule is rebuilt from the step.")
    for file in sorted(path.rglob("*")):
        if file.suffix in TORCH_FILES and file.name not in NEVER_LOADED:
            _safe_load(file)


TORCH_FILES = (".bin", ".pt", ".pth", ".pkl")
NEVER_LOADED = ("training_args.bin",)  # transformers' pickled arguments, written for people, never read back


def _safe_load(path: Path):
    """`path` loaded as tensors and plain values only (accelerate's `load`: weights_only=True, numpy
    arrays allowed), or a CheckpointError that names the file."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu", mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure: the file is not what llmrl wrote
        raise CheckpointError(
            f"Refusing to resume from {path}: it does not load as tensors and plain values ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}). llmrl never unpickles objects from a checkpoint, since unpickling "
            "runs whatever code the file names; resume only checkpoints you trust, or start the run afresh.") from None


def load_checkpoint(accelerator, path, schedulers=()) -> dict:
    """Restore model, optimizer, RNG and the `schedulers` from `path`; returns its trainer_state.json."""
    path = Path(path)
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
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
