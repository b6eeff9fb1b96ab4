"""The command line as a user types it: `llmrl ...` and `python -m llmrl ...`, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

LLMRL = Path(sys.executable).with_name("llmrl")


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llmrl", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_console_script_is_installed():
    assert LLMRL.exists(), "the `llmrl` console script is missing: pip install -e . installs it"
    result = subprocess.run([str(LLMRL), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "llmrl train" in result.stdout


def test_top_level_help_lists_algorithms_and_fields():
    out = run("--help").stdout
    for word in ("dapo", "reinforce_pp_baseline", "dpo", "sft", "reward_model", "model_name_or_path",
                 "num_generations", "loss_type", "epsilon_high"):
        assert word in out


def test_train_help_lists_fields_with_help_text_for_the_recipe_algorithm(tmp_path):
    out = run("train", "--help").stdout
    assert "--num_generations" in out and "Completions sampled per prompt" in out
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("algorithm: dpo\n")
    out = run("train", str(recipe), "--help").stdout
    assert "--loss_type" in out and "--num_generations" not in out


def test_train_help_text_is_the_fields_help_not_argparse_internals():
    """A '%' in a field's help ("~30% slower") used to print argparse's own dict of the option."""
    out = run("train", "--help").stdout
    assert "~30% slower" in out and "option_strings" not in out


def test_eval_help_lists_what_eval_reads_and_its_output_file():
    result = run("eval", "--help")
    assert result.returncode == 0 and "--output_file" in result.stdout
    for field in ("--model_name_or_path", "--dataset_name", "--reward_funcs", "--max_completion_length",
                  "--eval_do_sample"):
        assert field in result.stdout
    for training_only in ("--learning_rate", "--num_generations", "--lora_r", "--save_steps"):
        assert training_only not in result.stdout


def test_print_config_resolves_preset_recipe_and_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: dapo\nmodel_name_or_path: m\nepsilon: 0.1\n")
    result = run("train", str(recipe), "--epsilon_high", "0.35", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["algorithm"] == "dapo"
    assert config["epsilon"] == 0.1 and config["epsilon_high"] == 0.35
    assert config["dynamic_sampling"] is True and config["loss_agg_mode"] == "token_mean"


def test_user_errors_are_one_clear_line_not_a_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: grpo\nnum_generation: 4\n")
    result = run("train", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Unknown field 'num_generation'" in result.stderr and "num_generations" in result.stderr


@pytest.mark.parametrize("reward, message", [
    ("nosuchmodule_xyz:brevity", "could not import module 'nosuchmodule_xyz'"),
    ("accuracy", "needs the dataset column 'answer'"),  # raised by the reward function during the first step
])
def test_reward_errors_at_run_time_are_one_clear_line(tiny_model_dir, tmp_path, reward, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1="}\n' * 4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "grpo", "model_name_or_path": tiny_model_dir, "dataset_name": str(data), "reward_funcs": [reward],
        "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 4, "max_steps": 1,
        "output_dir": str(tmp_path / "out")}))
    result = run("train", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr


def test_unknown_command():
    result = run("trian")
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_every_algorithm_has_a_trainer():
    from llmrl.config import ALGORITHMS
    from llmrl.trainers import RUNNERS

    missing = sorted(name for name, cls in ALGORITHMS.items() if cls not in RUNNERS)
    assert not missing, f"algorithms with no trainer: {missing}"


def test_a_dataset_without_the_needed_column_is_one_clear_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Q: ", "answer": "A"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"algorithm: sft\nmodel_name_or_path: m\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n")
    result = run("train", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"Dataset '{data}' has no column 'completion'" in result.stderr and "Rename" in result.stderr


def test_runs_under_accelerate_launch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: rloo\nmodel_name_or_path: m\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "--cpu", "-m", "llmrl", "train",
                             str(recipe), "--print_config"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["advantage_estimator"] == "rloo"
