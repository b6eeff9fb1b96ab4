"""A run never writes into another run's folder unless it resumes it or is told to overwrite, and
nothing is written before the run has started."""

import json
import subprocess
import sys

import pytest
import yaml


def grpo_recipe(tmp_path, model_dir, out, **more):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(8)))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "grpo", "model_name_or_path": model_dir, "dataset_name": str(data), "reward_funcs": ["length"],
        "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4, "learning_rate": 1e-3,
        "output_dir": str(out), "save_steps": 1, "log_completions_steps": 1, "disable_tqdm": True, **more}))
    return recipe


def llmrl_train(recipe, *flags):
    return subprocess.run([sys.executable, "-m", "llmrl", "train", str(recipe), *flags], capture_output=True,
                          text=True, timeout=300)


def test_a_fresh_run_into_a_previous_runs_folder_stops_and_overwrite_replaces_it(tiny_model_dir, tmp_path):
    """The old run had 3 steps; a fresh 2-step run into the same folder used to overwrite
    checkpoints 1-2 and the model, keep checkpoint-3, and a later resume brought the old run back."""
    out = tmp_path / "out"
    recipe = grpo_recipe(tmp_path, tiny_model_dir, out)
    assert llmrl_train(recipe, "--max_steps", "3").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    refused = llmrl_train(recipe, "--max_steps", "2", "--seed", "1")
    assert refused.returncode == 2
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("llmrl: error:")]
    assert f"output_dir {out} holds a previous run (checkpoint-1, checkpoint-2, checkpoint-3" in line
    assert "resume_from_checkpoint: true" in line and "overwrite_output_dir: true" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    replaced = llmrl_train(recipe, "--max_steps", "2", "--seed", "1", "--overwrite_output_dir", "true")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert {json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()} == {1, 2}
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


def test_resuming_the_previous_run_is_allowed(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    recipe = grpo_recipe(tmp_path, tiny_model_dir, out)
    assert llmrl_train(recipe, "--max_steps", "1").returncode == 0
    resumed = llmrl_train(recipe, "--max_steps", "2", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "checkpoint-2").is_dir()


def test_a_run_that_fails_at_start_leaves_the_previous_config_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("algorithm: grpo\nseed: 7\n")  # a previous run's, say
    recipe = grpo_recipe(tmp_path, tiny_model_dir, out, dataset_name=str(tmp_path / "missing.jsonl"))
    failed = llmrl_train(recipe, "--max_steps", "1")
    assert failed.returncode != 0
    assert (out / "config.yaml").read_text() == "algorithm: grpo\nseed: 7\n"


class RecordingState:
    """One process's view of the process state: whether it is the main one, and its barriers."""

    def __init__(self, is_main):
        self.is_main_process, self.barriers = is_main, 0

    def wait_for_everyone(self):
        self.barriers += 1


@pytest.mark.parametrize("resume", [False, True])
def test_every_process_meets_the_same_barriers_when_a_previous_run_is_replaced(tmp_path, resume):
    """Under a 2-process launch the main process deletes the previous run; a process that looks
    after it has (the folder is clean by then) must still wait at every barrier the main process
    waits at, or the main one waits for ever (seen: a second `overwrite_output_dir` run hung)."""
    from llmrl.config import RLConfig
    from llmrl.trainers.checkpoint import claim_output_dir

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "model.safetensors").write_text("x")
    args = RLConfig(output_dir=str(tmp_path), overwrite_output_dir=True, resume_from_checkpoint=resume or None)
    main, other = RecordingState(True), RecordingState(False)
    claim_output_dir(args, main)
    claim_output_dir(args, other)  # the slower process, after the main one has deleted
    assert main.barriers == other.barriers > 0
    assert resume or not (tmp_path / "checkpoint-2").exists()
