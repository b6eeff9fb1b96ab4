"""SIGTERM (what preemptible and SLURM machines send) and SIGINT end an `llmrl train` run with a
checkpoint of the step it was in, and a resume ends where an uninterrupted run ends; a second
signal stops at once. Logs reach a pipe line by line, as they are printed."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file


def recipe(tmp_path, model_dir, out, **more):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(16)))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "algorithm": "grpo", "model_name_or_path": model_dir, "dataset_name": str(data), "reward_funcs": ["length"],
        "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 8, "learning_rate": 1e-3,
        "lr_scheduler_type": "constant", "save_steps": 0, "logging_steps": 1, "disable_tqdm": True,
        "output_dir": str(out), "seed": 0, **more}))
    return path


def start(path, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmrl", "train", str(path), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def first_record(process, timeout=240.0):
    """The first JSON metrics line, read from the pipe while the run goes on (line-buffered logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = process.stdout.readline()
        if line.startswith('{"'):
            return json.loads(line)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"no metrics line arrived while the run was going: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_and_the_resume_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir, tmp_path, signum):
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny_model_dir, out)
    process = start(path, "--max_steps", "100000")
    first_record(process)  # it is training, with no checkpoint due (save_steps: 0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, stderr[-2000:]
    [checkpoint] = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert f"llmrl: stopped by {signal.Signals(signum).name} after step {step}: {checkpoint} written" in stderr

    resumed = subprocess.run([sys.executable, "-m", "llmrl", "train", str(path), "--max_steps", str(step + 2),
                              "--resume_from_checkpoint", "true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run([sys.executable, "-m", "llmrl", "train", str(recipe(tmp_path, tiny_model_dir, tmp_path / "whole")),
                            "--max_steps", str(step + 2)], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_second_signal_stops_at_once(tiny_model_dir, tmp_path):
    """Long steps (256-token completions), two signals a moment apart: the default handler, back in
    place after the first, ends the process before the step can finish; nothing is saved."""
    out = tmp_path / "run"
    process = start(recipe(tmp_path, tiny_model_dir, out, max_completion_length=256), "--max_steps", "100000")
    first_record(process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM
    assert not list(out.glob("checkpoint-*"))
