"""SIGTERM (what preemptible and SLURM machines send) and SIGINT end an `llmrl train` run (every
trainer kind, one process or a 2-process launch) with a checkpoint of the step it was in, and a
resume ends where an uninterrupted run ends; a second signal stops at once. Logs reach a pipe line by line, as they are printed."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from ports import free_port
from safetensors.torch import load_file

from llmrl.trainers.checkpoint import checkpoint_problem

ROWS = {
    "grpo": lambda i: {"prompt": f"{i}+{i}="},
    "sft": lambda i: {"prompt": f"{i}+{i}=", "completion": str(2 * i)},
    "reward_model": lambda i: {"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)},
}
SETTINGS = {
    "grpo": {"reward_funcs": ["length"], "num_generations": 4, "max_completion_length": 8},
    "sft": {},
    "reward_model": {},
}


def recipe(tmp_path, model_dir, out, kind="grpo", **more):
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(ROWS[kind](i)) + "\n" for i in range(16)))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "algorithm": kind, "model_name_or_path": model_dir, "dataset_name": str(data), **SETTINGS[kind],
        "per_device_train_batch_size": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "save_steps": 0,
        "logging_steps": 1, "disable_tqdm": True, "output_dir": str(out), "seed": 0, **more}))
    return path


def start(path, *flags, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "llmrl", "train", str(path), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def first_record(process, timeout=240.0):
    """The first metrics line (a dict: llmrl's JSON, or transformers' printed dict), read from the
    pipe while the run goes on (line-buffered logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = process.stdout.readline()
        if line.startswith("{"):
            return line
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"no metrics line arrived while the run was going: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("kind, signum", [("grpo", signal.SIGTERM), ("sft", signal.SIGINT)])
def test_a_signal_writes_a_checkpoint_and_the_resume_ends_where_an_uninterrupted_run_ends(
        tiny_model_dir, tmp_path, kind, signum):
    """Online RL (llmrl's loop) and SFT (transformers' Trainer, as the reward-model trainer) alike;
    SIGINT and SIGTERM go through the same handler."""
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny_model_dir, out, kind)
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
    whole = subprocess.run([sys.executable, "-m", "llmrl", "train", str(recipe(tmp_path, tiny_model_dir, tmp_path / "whole", kind)),
                            "--max_steps", str(step + 2)], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


SLOW_REWARD = """
import os
import time


def slow(prompts, completions, **kwargs):
    with open(os.environ["REWARD_CALLS"], "a") as calls:
        calls.write("called\\n")
    time.sleep(4)
    return [0.0] * len(completions)
"""


def test_a_second_signal_stops_at_once(tiny_model_dir, tmp_path):
    """Long steps (a reward that takes 4 s), two signals 1.5 s apart while the second step's reward
    runs: the second, later than a launcher's forwarding of the first would come, ends the process
    before the step can finish; nothing is saved."""
    (tmp_path / "slowreward.py").write_text(SLOW_REWARD)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "run"
    process = start(recipe(tmp_path, tiny_model_dir, out, reward_funcs=["slowreward:slow"]), "--max_steps", "100000",
                    env={"PYTHONPATH": str(tmp_path), "REWARD_CALLS": str(calls)})
    deadline = time.monotonic() + 240
    while not (calls.is_file() and len(calls.read_text().splitlines()) >= 2):  # the second step's reward is running
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM
    assert not list(out.glob("checkpoint-*"))


def test_a_signal_to_every_process_of_a_two_process_launch_is_one_request(tiny_model_dir, tmp_path):
    """Ctrl-C and SLURM signal the whole process group: each worker gets SIGTERM from there and
    again from the launcher forwarding it. That is one request: both workers finish the same step,
    write one complete checkpoint together, and a 2-process resume continues from it."""
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny_model_dir, out)
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", free_port(), "--multi_gpu", "--num_processes", "2",
              "-m", "llmrl", "train", str(path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*launch, "--max_steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    first_record(process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, stderr[-3000:]
    [checkpoint] = checkpoints
    assert checkpoint_problem(checkpoint) is None
    step = int(checkpoint.name.split("-")[1])
    assert f"llmrl: stopped by SIGTERM after step {step}: {checkpoint} written" in stderr, stderr[-3000:]
    assert "Unable to shutdown process" not in stderr, "the launcher had to kill a worker"

    resumed = subprocess.run([*launch, "--max_steps", str(step + 1), "--resume_from_checkpoint", "true"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert (out / "model.safetensors").is_file()


LATE_FORWARD = """
import os, signal, time
from llmrl.trainers.signals import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.5)  # a loaded machine: the launcher's forwarded copy comes this late
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("still running, asked to stop by", stop.signum)
"""


def test_a_launchers_late_forwarded_signal_is_still_the_first_request():
    """Under torchrun a worker gets a group signal directly and again from the launcher; on a busy
    machine the copy can trail by more than a second. It must not count as a second request (which
    stops at once and loses the checkpoint); alone, a repeat that late still does."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    launched = subprocess.run([sys.executable, "-c", LATE_FORWARD], capture_output=True, text=True, env=env, timeout=60)
    assert launched.returncode == 0 and f"asked to stop by {int(signal.SIGTERM)}" in launched.stdout, launched.stderr
    env.pop("TORCHELASTIC_RUN_ID")
    alone = subprocess.run([sys.executable, "-c", LATE_FORWARD], capture_output=True, text=True, env=env, timeout=60)
    assert alone.returncode == -signal.SIGTERM
