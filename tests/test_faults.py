"""Runs survive being killed inside a save, corrupt checkpoints, planted pickles and a full disk.

Each trainer kind (online RL, PPO with its critic, DPO, SFT, reward model) is SIGKILLed at points
inside a checkpoint save and inside the final save (tests/fault_worker.py arms the kill in a real
`llmrl train`); afterwards no file in output_dir is half-written, `resume_from_checkpoint: true`
continues from the newest complete checkpoint and the run ends with the weights of a run that was
never interrupted. A checkpoint corrupted afterwards is skipped with its reason; a planted pickle in
any file of a checkpoint runs no code and is refused by name; a disk that fills up mid-save is
reported as such. (Signals: test_signals.py; non-finite numbers: test_nonfinite.py; reusing an
output_dir: test_output_dir.py.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmrl.recipe import load_recipe
from llmrl.trainers import train
from llmrl.trainers.checkpoint import CheckpointError, _file_problem, checkpoint_problem

WORKER = Path(__file__).with_name("fault_worker.py")

ROWS = {
    "grpo": lambda i: {"prompt": f"{i}+{i}="},
    "ppo": lambda i: {"prompt": f"{i}+{i}="},
    "dpo": lambda i: {"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)},
    "sft": lambda i: {"prompt": f"{i}+{i}=", "completion": str(2 * i)},
    "reward_model": lambda i: {"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)},
}
ONLINE = {"reward_funcs": ["length"], "max_completion_length": 6, "log_completions_steps": 1}
SETTINGS = {"grpo": {**ONLINE, "num_generations": 4}, "ppo": ONLINE, "dpo": {}, "sft": {}, "reward_model": {}}


def write_recipe(folder: Path, kind: str) -> Path:
    """4 steps, a checkpoint every 2, a constant learning rate: a run resumed from checkpoint-2 must
    end exactly where the uninterrupted run ends."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(ROWS[kind](i)) + "\n" for i in range(32)))
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({
        "algorithm": kind, "model_name_or_path": os.environ["FAULTS_MODEL"], "dataset_name": str(data),
        **SETTINGS[kind], "per_device_train_batch_size": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "max_steps": 4, "save_steps": 2, "logging_steps": 1, "disable_tqdm": True, "seed": 0,
        "output_dir": str(folder / "out")}))
    return path


def final_weights(out: Path) -> dict:
    """Every final weights file of a run (the model, and PPO's value_model/), by relative path."""
    return {str(p.relative_to(out)): load_file(str(p)) for p in sorted(out.glob("*.safetensors"))
            + sorted(out.glob("value_model/*.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The final weights of each kind's run, never interrupted (run once per kind, on demand)."""
    os.environ["FAULTS_MODEL"] = tiny_model_dir
    done = {}

    def weights(kind):
        if kind not in done:
            folder = tmp_path_factory.mktemp(f"whole_{kind}")
            train(load_recipe(write_recipe(folder, kind)))
            done[kind] = final_weights(folder / "out")
        return done[kind]

    return weights


def half_written(out: Path) -> list[str]:
    """Files in output_dir (outside the temporary folders of unfinished saves) that a kill cut short."""
    return [str(p.relative_to(out)) for p in sorted(out.rglob("*")) if p.is_file()
            and not any(part.startswith(".tmp-") for part in p.relative_to(out).parts) and _file_problem(p)]


@pytest.mark.parametrize("kind, point, target", [
    ("grpo", "torch_save", "checkpoint-4"),
    ("grpo", "half_weights", "final"),
    ("ppo", "half_weights", "checkpoint-4"),
    ("dpo", "half_weights", "checkpoint-4"),
    ("sft", "half_weights", "checkpoint-4"),
    ("sft", "rename", "checkpoint-4"),
    ("sft", "half_weights", "final"),
    ("reward_model", "half_weights", "checkpoint-4"),
])
def test_a_kill_inside_a_save_leaves_nothing_broken_and_the_resume_ends_where_an_uninterrupted_run_ends(
        uninterrupted, tmp_path, capsys, kind, point, target):
    path = write_recipe(tmp_path, kind)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(WORKER), point, target, "train", str(path), "--output_dir", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, f"the kill never fired in {target} ({point}): {killed.stderr[-2000:]}"
    assert half_written(out) == [], "a half-written file outside a temporary folder"
    complete = sorted(p.name for p in out.glob("checkpoint-*") if checkpoint_problem(p) is None)
    assert complete == (["checkpoint-2"] if target != "final" else ["checkpoint-2", "checkpoint-4"])

    capsys.readouterr()
    train(load_recipe(path, ["--resume_from_checkpoint", "true"]))
    printed = capsys.readouterr()
    newest = "checkpoint-2" if target != "final" else "checkpoint-4"
    if kind in ("grpo", "ppo", "dpo"):  # llmrl's own loops say where they resumed
        assert f"resumed from {out / newest} at step {newest.split('-')[1]}" in printed.out
    assert not list(out.glob(".tmp-*")), "the unfinished save's leftovers are removed"
    assert_same_weights(final_weights(out), uninterrupted(kind))
    if kind in ("grpo", "ppo"):  # the replayed steps' samples are not logged twice
        steps = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and Counter(steps) == {step: steps.count(1) for step in (1, 2, 3, 4)}, steps


def corrupt_truncate(name):
    def corrupt(checkpoint: Path):
        file = checkpoint / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return corrupt


def corrupt_state(text):
    def corrupt(checkpoint: Path):
        if text is None:
            (checkpoint / "trainer_state.json").unlink()
        else:
            (checkpoint / "trainer_state.json").write_text(text)
    return corrupt


def empty_folder(checkpoint: Path):
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()


@pytest.fixture(scope="module")
def finished_runs(uninterrupted, tmp_path_factory):
    """A finished 4-step run of each kind (checkpoints 2 and 4), to copy and corrupt."""
    done = {}

    def run(kind):
        if kind not in done:
            folder = tmp_path_factory.mktemp(f"finished_{kind}")
            train(load_recipe(write_recipe(folder, kind)))
            done[kind] = folder
        return done[kind]

    return run


@pytest.mark.parametrize("kind, corrupt, reason", [
    ("grpo", corrupt_truncate("model/model.safetensors"), r"model/model\.safetensors is truncated"),
    ("grpo", corrupt_truncate("model.safetensors"), r"model\.safetensors is truncated"),
    ("grpo", corrupt_truncate("optimizer.bin"), r"optimizer\.bin is truncated or not a torch file"),
    ("grpo", corrupt_truncate("random_states_0.pkl"), r"random_states_0\.pkl is truncated"),
    ("grpo", corrupt_state(None), r"it holds no trainer_state\.json"),
    ("grpo", corrupt_state('{"step": 4, "batch'), r"trainer_state\.json is not valid JSON"),
    ("grpo", corrupt_state('{"batches_consumed": 4}'), r"trainer_state\.json holds no step"),
    ("grpo", empty_folder, r"it holds no trainer_state\.json"),
    ("sft", corrupt_truncate("scheduler.pt"), r"scheduler\.pt is truncated"),
    ("sft", corrupt_truncate("optimizer.pt"), r"optimizer\.pt is truncated"),
    ("reward_model", corrupt_truncate("model.safetensors"), r"model\.safetensors is truncated"),
], ids=lambda value: value if isinstance(value, str) and "\\" not in value else None)
def test_a_corrupt_newest_checkpoint_is_skipped_with_its_reason_and_refused_when_named(
        finished_runs, uninterrupted, tmp_path, caplog, kind, corrupt, reason):
    source = finished_runs(kind)
    shutil.copytree(source, tmp_path / "run")
    out = tmp_path / "run" / "out"
    path = write_recipe(tmp_path / "run", kind)  # same settings, this folder
    corrupt(out / "checkpoint-4")
    for name in ("model.safetensors", "adapter_model.safetensors", "completions.jsonl"):
        (out / name).unlink(missing_ok=True)  # the final model is made again by the resume

    with pytest.raises(CheckpointError, match=rf"Cannot resume from {out / 'checkpoint-4'}: {reason}"):
        train(load_recipe(path, ["--resume_from_checkpoint", str(out / "checkpoint-4")]))
    with caplog.at_level(logging.WARNING, logger="llmrl.trainers.checkpoint"):
        train(load_recipe(path, ["--resume_from_checkpoint", "true"]))
    assert any(record.getMessage().startswith("llmrl: skipping checkpoint-4: ") and
               "resuming from checkpoint-2 instead" in record.getMessage() for record in caplog.records)
    assert_same_weights(final_weights(out), uninterrupted(kind))


def test_no_resumable_checkpoint_is_one_error_naming_each(finished_runs, tmp_path):
    shutil.copytree(finished_runs("grpo"), tmp_path / "run")
    out = tmp_path / "run" / "out"
    corrupt_state(None)(out / "checkpoint-4")
    corrupt_truncate("optimizer.bin")(out / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be resumed: checkpoint-4: it holds no "
                                              r"trainer_state\.json.*; checkpoint-2: optimizer\.bin is truncated"):
        train(load_recipe(write_recipe(tmp_path / "run", "grpo"), ["--resume_from_checkpoint", "true"]))


class Planted:
    """A pickle that creates `marker` when it is unpickled: what a malicious checkpoint file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("kind, name", [
    ("grpo", "optimizer.bin"), ("grpo", "random_states_0.pkl"), ("ppo", "optimizer_1.bin"),
    ("sft", "optimizer.pt"), ("sft", "scheduler.pt"), ("sft", "rng_state.pth"), ("reward_model", "optimizer.pt"),
])
def test_a_planted_pickle_in_any_file_of_a_checkpoint_runs_no_code_and_is_refused_by_name(
        finished_runs, tmp_path, kind, name):
    shutil.copytree(finished_runs(kind), tmp_path / "run")
    out = tmp_path / "run" / "out"
    marker = tmp_path / "code_ran"
    assert (out / "checkpoint-4" / name).is_file()
    torch.save(Planted(marker), out / "checkpoint-4" / name)  # a real torch file, holding an object
    with pytest.raises(CheckpointError, match=rf"Refusing to resume from .*checkpoint-4/{name}: it does not load as "
                                              "tensors and plain values"):
        train(load_recipe(write_recipe(tmp_path / "run", kind), ["--resume_from_checkpoint", "true"]))
    assert not marker.exists()


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one failed: {result.stderr.strip()}")


@pytest.mark.skipif(os.geteuid() != 0, reason="a full disk is a small tmpfs, which only root can mount")
@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_a_full_disk_is_reported_as_such_and_the_partial_save_is_removed(finished_runs, tmp_path, kind):
    """The disk holds the run's data and its first checkpoint but not a second: the save of
    checkpoint-4 fails, the error says the disk is full, the unfinished save is gone (its space is
    free again) and checkpoint-2 is intact; with more room, the resume finishes the run."""
    whole = finished_runs(kind) / "out"
    checkpoint = sum(p.stat().st_size for p in (whole / "checkpoint-2").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    mount_tmpfs(disk, str(int(checkpoint * 1.6)))
    try:
        path = write_recipe(disk, kind)
        free_before = shutil.disk_usage(disk).free
        result = subprocess.run([sys.executable, "-m", "llmrl", "train", str(path)], capture_output=True, text=True,
                                timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        errors = [line for line in result.stderr.splitlines() if line.startswith("llmrl: error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
        assert f"The disk of {disk / 'out'} is full: writing checkpoint-4 failed" in errors[0]
        assert "checkpoint-2 is the newest checkpoint" in errors[0] and "resume_from_checkpoint: true" in errors[0]
        assert not list((disk / "out").glob(".tmp-*"))
        assert checkpoint_problem(disk / "out" / "checkpoint-2") is None
        assert shutil.disk_usage(disk).free >= free_before - 2 * checkpoint, "the unfinished save's space is free"

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = subprocess.run([sys.executable, "-m", "llmrl", "train", str(path), "--resume_from_checkpoint", "true"],
                                 capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_weights(final_weights(disk / "out"), final_weights(whole))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
