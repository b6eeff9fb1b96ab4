"""The shipped launch configs on 2 CPU processes, each through the online trainer as `llmrl train`
builds it: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 really run (not DDP in their place), FSDP2 and ZeRO-3
really shard the policy, gradients sync on the last micro-batch of each step only, the backend takes
one optimizer step per step, and the update equals one process's with the same rows (1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("launch_worker.py")

# Two passes (num_iterations) over one rollout of 16 completions: 2 optimizer steps. One process
# takes each step as one micro-batch of 16; two processes as 2 micro-batches of 4 rows each, so the
# backend must accumulate. Greedy-like sampling (top_k 1) gives every launch the same completions;
# Adam's epsilon at 1e-3 keeps float rounding of tiny gradients from being amplified to lr.
SETTINGS = dict(algorithm="reinforce_pp", beta=0.0, num_generations=1, top_k=1, max_completion_length=8,
                max_steps=2, num_iterations=2, learning_rate=1e-3, adam_epsilon=1e-3, max_grad_norm=0.0,
                seed=3, save_steps=0, log_completions_steps=0, logging_steps=1000, disable_tqdm=True)


def run_worker(tmp_path, model_dir, name, launch_config=None, batch_size=16, accumulation=1):
    out = tmp_path / name
    out.mkdir()
    settings = {**SETTINGS, "model_name_or_path": model_dir, "output_dir": str(out / "model"),
                "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": accumulation}
    (out / "settings.json").write_text(json.dumps(settings))
    command = [sys.executable, str(WORKER), str(out / "settings.json"), str(out)]
    if launch_config is not None:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "recipes" / "accelerate" / f"{launch_config}.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", "--main_process_port", free_port(), *command[1:]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return AutoModelForCausalLM.from_pretrained(out / "model"), ranks


@pytest.fixture(scope="module")
def one_process(sharp_model_dir, tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("one"), sharp_model_dir, "one")


@pytest.mark.parametrize("config, backend, sharded", [("fsdp2", "FSDP", True), ("zero2", "DEEPSPEED", False),
                                                      ("zero3", "DEEPSPEED", True)])
def test_a_launch_config_runs_its_backend_and_gives_the_one_process_update(sharp_model_dir, tmp_path, one_process,
                                                                           config, backend, sharded):
    pytest.importorskip("deepspeed") if backend == "DEEPSPEED" else None
    reference, [alone] = one_process
    model, ranks = run_worker(tmp_path, sharp_model_dir, config, launch_config=config, batch_size=4, accumulation=2)
    assert alone["sync"] == [True, True] and alone["optimizer_steps"] == 2
    for rank in ranks:
        assert (rank["backend"], rank["processes"]) == (backend, 2)
        # 2 optimizer steps of 2 micro-batches: gradients sync on the second of each only, and the
        # backend (DeepSpeed's engine, which steps inside backward) steps once per step.
        assert rank["sync"] == [False, True, False, True], rank
        assert rank["optimizer_steps"] == 2, rank
        if sharded:  # each process holds about half of every parameter, not a replica
            assert 0.4 * rank["total"] < rank["held"] < 0.6 * rank["total"], rank
    if sharded:
        assert sum(rank["held"] for rank in ranks) == ranks[0]["total"]
    start = AutoModelForCausalLM.from_pretrained(sharp_model_dir)
    moved = 0.0
    for (name, p0), p1, p2 in zip(start.named_parameters(), reference.parameters(), model.parameters()):
        moved = max(moved, (p1 - p0).abs().max().item())
        assert torch.allclose(p1, p2, atol=1e-5, rtol=0), f"{config} {name}: {(p1 - p2).abs().max():.2e}"
    assert moved > 1e-4, "the steps must change the weights for the comparison to mean anything"
