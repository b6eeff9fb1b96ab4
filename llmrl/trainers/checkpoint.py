"""Checkpoints every trainer writes and resumes from.

`output_dir/checkpoint-<step>/` holds accelerate's state (model, optimizer, registered scheduler,
every process's RNG), `trainer_state.json` (step and data position) and `model/`, a plain
`save_pretrained` folder (full model or adapter, plus tokenizer) that loads with no llmrl import.
It is written under a temporary name and renamed when complete, so a crash mid-save never leaves a
broken newest checkpoint: a half-written one keeps its temporary name and is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PREFIX = "checkpoint-"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume_from_checkpoint: str | None, output_dir) -> Path | None:
    """The checkpoint to resume from: None for unset/'false', the newest in `output_dir` for 'true',
    else the given folder (which must be a checkpoint)."""
    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", "no", ""):
        return None
    if str(resume_from_checkpoint).lower() in ("true", "yes", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from_checkpoint: true, but {output_dir} holds no {PREFIX}<step> folder yet. "
                             "Remove the setting to start fresh.")
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint folder (no trainer_state.json); "
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
                    save_total_limit: int | None = None) -> Path:
    """Write `checkpoint-<step>` atomically (every process must call this); returns its path.

    `exports` ({subfolder: (export, state_dict)}, see `write_exports`; the policy as "model") are
    the plain folders; `state` goes to trainer_state.json. With `save_total_limit`, only the newest
    that many checkpoints are kept.
    """
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


def load_checkpoint(accelerator, path) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns its trainer_state.json."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / "trainer_state.json").read_text())
