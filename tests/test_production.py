"""What the paths past the one-process CPU demo rely on, checked in one process: dropout is off in
every forward that compares log-probs, gradient accumulation follows accelerate's contract (one
optimizer step per step, gradients synced on its last micro-batch only), every model a trainer
holds sits on the policy's device, and a KL in the loss uses an estimator with the right gradient.
The launches with 2 processes (DDP, FSDP2, trackers) are in tests/test_launch.py."""

import math

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmrl import DPOConfig, DPOTrainer, RLTrainer
from llmrl.config import ModelConfig, RLConfig
from llmrl.rewards import completion_text


def digit_fraction(prompts, completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def prompts(n=16):
    return datasets.Dataset.from_list([{"prompt": f"{i} plus {i} is"} for i in range(n)])


def online(model_dir, tmp_path, model_config=None, **overrides):
    settings = dict(algorithm="rloo", output_dir=str(tmp_path / "out"), num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=8, learning_rate=1e-2, max_steps=3,
                    seed=0, logging_steps=1000, log_completions_steps=0, save_steps=0, disable_tqdm=True)
    return RLTrainer(model_dir, RLConfig(**{**settings, **overrides}), prompts(), reward_funcs=[digit_fraction],
                     model_config=model_config)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with attention dropout 0.3: a model whose own forward is noisy in training mode."""
    path = tmp_path_factory.mktemp("dropout_model")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_dropout = 0.3
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


# ---- dropout ----------------------------------------------------------------------------------


def lora(model_dir):
    return ModelConfig(model_name_or_path=model_dir, use_peft=True, lora_r=8, lora_dropout=0.05)


@pytest.mark.parametrize("case", ["lora_dropout", "attention_dropout"])
def test_the_ratio_of_each_rollouts_first_update_is_exactly_one(tiny_model_dir, dropout_model_dir, tmp_path, case):
    """RLOO puts its KL in the reward, so old log-probs are computed before the update; with one
    update per rollout the ratio new / old is 1 when both forwards are the same function. LoRA's
    dropout (0.05, every LoRA recipe) matters once the adapter has moved (after step 1); attention
    dropout from step 1. With disable_dropout: false both make the ratio drift off 1."""
    model_dir, model_config = (tiny_model_dir, lora(tiny_model_dir)) if case == "lora_dropout" else (
        dropout_model_dir, None)
    history = online(model_dir, tmp_path / "off", model_config=model_config).train()
    assert [h["ratio_max"] for h in history] == [1.0, 1.0, 1.0]
    assert [h["ratio_mean"] for h in history] == pytest.approx([1.0] * 3, abs=1e-7)
    noisy = online(model_dir, tmp_path / "on", model_config=model_config, disable_dropout=False).train()
    assert max(h["ratio_max"] for h in noisy[1:]) > 1.001, [h["ratio_max"] for h in noisy]


def test_dpo_starts_at_ln2_with_a_dropout_model(dropout_model_dir, tmp_path):
    """Before any update the policy is its reference, so DPO's loss is ln 2 exactly; attention
    dropout in the policy's training forward (the reference runs in eval mode) moves it off."""
    pairs = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{i}{i}x"}
                                        for i in range(8)])

    def first_loss(**overrides):
        args = DPOConfig(output_dir=str(tmp_path / f"out{len(overrides)}"), per_device_train_batch_size=8, max_prompt_length=16,
                         max_length=32, max_steps=1, save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0,
                         **overrides)
        return DPOTrainer(dropout_model_dir, args, pairs).train()[0]["loss"]

    assert first_loss() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first_loss(disable_dropout=False) - math.log(2)) > 1e-3


# ---- accumulation through accelerate's contract -------------------------------------------------


def record_contract(trainer):
    """Hooks on the real model and optimizer: `sync_gradients` at each training forward (grad
    enabled: not generation, not the old/reference passes) and a count of optimizer steps."""
    seen = {"sync": [], "optimizer_steps": 0}
    model = trainer.accelerator.unwrap_model(trainer.model)

    def forward_hook(module, args):
        if torch.is_grad_enabled() and module.training:
            seen["sync"].append(trainer.accelerator.sync_gradients)

    def step_hook(optimizer, args, kwargs):
        seen["optimizer_steps"] += 1

    model.register_forward_pre_hook(forward_hook)
    trainer.optimizer.optimizer.register_step_post_hook(step_hook)
    return seen


def test_online_accumulation_syncs_on_the_last_micro_batch_and_steps_once(tiny_model_dir, tmp_path):
    """4 micro-batches x 2 mini-batches per rollout, 2 rollouts: 4 optimizer steps, and gradients
    sync on micro-batches 4 and 8 of each rollout only."""
    trainer = online(tiny_model_dir, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                     num_mini_batches=2, max_steps=4)
    seen = record_contract(trainer)
    history = trainer.train()
    assert seen["sync"] == ([False] * 3 + [True]) * 4
    assert seen["optimizer_steps"] == 4 and trainer.global_step == 4
    assert len(history) == 2 and trainer.accelerator.gradient_accumulation_steps == 4


def test_offline_accumulation_syncs_on_the_last_micro_batch_and_steps_once(tiny_model_dir, tmp_path):
    pairs = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{i}x"}
                                        for i in range(12)])
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                     max_prompt_length=16, max_length=32, max_steps=2, save_steps=0, logging_steps=1000,
                     disable_tqdm=True)
    trainer = DPOTrainer(tiny_model_dir, args, pairs)
    seen = record_contract(trainer)
    trainer.train()
    assert seen["sync"] == [False, False, True] * 2 and seen["optimizer_steps"] == 2


# ---- devices ------------------------------------------------------------------------------------


def test_every_model_a_trainer_holds_is_on_the_policys_device(tiny_model_dir, tmp_path, monkeypatch):
    """Full-weight PPO holds four models: policy, frozen reference copy, critic and reward model.
    With the run's device replaced by `meta` (a stand-in for a GPU: nothing can compute across
    it), every one of them must have moved there, not only the prepared policy."""
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    args = RLConfig(algorithm="ppo", output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                    reward_model_name_or_path=tiny_model_dir, max_steps=1)
    trainer = RLTrainer(tiny_model_dir, args, prompts(), reward_funcs=[digit_fraction])
    held = {"policy": trainer.model, "reference": trainer.reference.model, "critic": trainer.critic.model,
            "reward model": trainer.reward_funcs[-1][1].model}
    for role, model in held.items():
        assert {p.device.type for p in model.parameters()} == {"meta"}, role


def test_dpo_reference_copy_is_on_the_policys_device(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    pairs = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    trainer = DPOTrainer(tiny_model_dir, DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                                   max_prompt_length=8, max_length=16), pairs,
                         ref_model=tiny_model_dir)
    for role, model in {"policy": trainer.model, "reference": trainer.reference.model}.items():
        assert {p.device.type for p in model.parameters()} == {"meta"}, role


# ---- the KL estimator of each placement -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["dapo", "dr_grpo"])
def test_a_kl_in_the_loss_uses_k3_unless_asked_otherwise(algorithm):
    assert RLConfig(algorithm=algorithm, beta=0.05).kl_estimator == "k3"
    assert RLConfig(algorithm=algorithm, beta=0.05, kl_estimator="k2").kl_estimator == "k2"


def test_moving_a_presets_kl_takes_the_estimator_of_its_new_place():
    assert RLConfig(algorithm="ppo").kl_estimator == "k1"  # in the reward, as the preset says
    assert RLConfig(algorithm="ppo", kl_placement="loss").kl_estimator == "k3"
    assert RLConfig(algorithm="grpo", kl_placement="reward").kl_estimator == "k1"
    assert RLConfig(algorithm="reinforce_pp_baseline", kl_placement="loss").kl_estimator == "k2"  # its own place


def test_k1_in_the_loss_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"k1 with kl_placement: loss.*expectation zero.*k3"):
        RLConfig(algorithm="grpo", kl_estimator="k1")
    RLConfig(algorithm="grpo", kl_estimator="k1", beta=0.0)  # no KL term at all: nothing to refuse
