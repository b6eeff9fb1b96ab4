"""LoRA after LoRA: a run that starts from an adapter folder with use_peft saves ONE adapter on the
true base that is exactly the model it trained (starting adapter + new adapter), so plain peft
reloads it with no llmrl import, from the final folder and from every checkpoint's model/."""

import json
import random

import datasets
import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    LoraConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from llmrl import DPOConfig, DPOTrainer, RewardTrainer, RLTrainer, SFTTrainer
from llmrl.config import ModelConfig, RewardConfig, RLConfig, SFTConfig
from llmrl.models import load_policy, reward_scores, token_values
from llmrl.rewards import completion_text

IDS = torch.tensor([[5, 17, 30, 42, 61, 77, 90, 3]])


def digits(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in completion_text(c)) / max(len(completion_text(c)), 1) for c in completions]


def lora(folder, r, alpha, **fields):
    # Each stage gets its own rank and scale, so a combination that drops or mis-scales one shows.
    return ModelConfig(model_name_or_path=str(folder), use_peft=True, lora_r=r, lora_alpha=alpha,
                       lora_dropout=0.0, **fields)


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """An SFT LoRA adapter (r=4, alpha=8) trained through llmrl's SFTTrainer, far from a no-op."""
    out = tmp_path_factory.mktemp("sft_lora")
    rows = datasets.Dataset.from_list([{"prompt": f"Q{i}: ", "completion": f"answer {i % 10}"} for i in range(16)])
    args = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=5e-2,
                     save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0)
    SFTTrainer(args=args, train_dataset=rows, model_config=lora(tiny_model_dir, 4, 8)).train()
    return str(out)


def trained_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_plain_peft_reloads(folder, trained, base):
    """The folder names the true base, and plain peft rebuilds the trained policy from it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        difference = (reloaded(input_ids=IDS).logits - trained).abs().max().item()
    assert difference < 1e-5, f"{folder}: reloaded logits differ from the trained policy's by {difference:.2e}"


def assert_start_matters(sft_adapter_dir, base, trained):
    """The starting adapter moves the logits far more than the tolerance (else the test proves nothing)."""
    bare = trained_logits(AutoModelForCausalLM.from_pretrained(base))
    sft = trained_logits(AutoPeftModelForCausalLM.from_pretrained(sft_adapter_dir))
    assert (sft - bare).abs().max() > 1e-2 and (trained - sft).abs().max() > 1e-4


def test_grpo_from_an_sft_adapter_saves_the_whole_trained_policy(tiny_model_dir, sft_adapter_dir, tmp_path):
    prompts = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(8)])
    args = RLConfig(algorithm="grpo", output_dir=str(tmp_path / "out"), num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=6, learning_rate=5e-2, max_steps=2,
                    save_steps=2, seed=0, logging_steps=1000)
    trainer = RLTrainer(sft_adapter_dir, args, prompts, reward_funcs=[digits],
                        model_config=lora(sft_adapter_dir, 2, 8))
    trainer.train()
    trained = trained_logits(trainer.accelerator.unwrap_model(trainer.model))
    assert_start_matters(sft_adapter_dir, tiny_model_dir, trained)
    assert_plain_peft_reloads(tmp_path / "out", trained, tiny_model_dir)
    assert_plain_peft_reloads(tmp_path / "out" / "checkpoint-2" / "model", trained, tiny_model_dir)


def test_ppo_from_an_sft_adapter_saves_policy_and_shared_critic_whole(tiny_model_dir, sft_adapter_dir, tmp_path):
    """PPO's critic shares the policy's base (base + SFT adapter, merged): its value_model/ adapter
    holds the SFT LoRA too, so plain peft on the bare base gives the values that were trained."""
    prompts = datasets.Dataset.from_list([{"prompt": f"{i} yes"} for i in range(8)])
    args = RLConfig(algorithm="ppo", output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                    max_completion_length=6, learning_rate=5e-2, value_learning_rate=5e-2, max_steps=2,
                    save_steps=0, seed=0, logging_steps=1000, log_completions_steps=0)
    trainer = RLTrainer(sft_adapter_dir, args, prompts, reward_funcs=[digits], model_config=lora(sft_adapter_dir, 2, 4))
    assert trainer.critic.shared
    trainer.train()
    trained = trained_logits(trainer.accelerator.unwrap_model(trainer.model))
    assert_plain_peft_reloads(tmp_path / "out", trained, tiny_model_dir)
    folder = tmp_path / "out" / "value_model"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    critic = AutoPeftModelForTokenClassification.from_pretrained(str(folder), num_labels=1).eval()
    mask = torch.ones_like(IDS)
    difference = (token_values(critic, IDS, mask) - token_values(trainer.critic.value_model, IDS, mask)).abs().max()
    assert difference < 1e-5, f"reloaded critic values differ by {difference:.2e}"


def preference_pairs(n):
    rng = random.Random(0)
    return datasets.Dataset.from_list([{"prompt": "".join(rng.choice("abcdefgh") for _ in range(4)) + ":",
                                        "chosen": "".join(rng.choice("0123456789") for _ in range(4)),
                                        "rejected": "".join(rng.choice("qrstuvwxyz") for _ in range(4))}
                                       for _ in range(n)])


def dpo_args(out):
    return DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_prompt_length=16, max_length=32,
                     learning_rate=5e-2, max_steps=2, save_steps=2, logging_steps=1000, report_to="none",
                     disable_tqdm=True, seed=0)


def test_dpo_from_an_sft_adapter_saves_the_whole_trained_policy(tiny_model_dir, sft_adapter_dir, tmp_path):
    trainer = DPOTrainer(sft_adapter_dir, dpo_args(tmp_path / "out"), preference_pairs(8),
                         model_config=lora(sft_adapter_dir, 8, 4))
    trainer.train()
    trained = trained_logits(trainer.accelerator.unwrap_model(trainer.model))
    assert_start_matters(sft_adapter_dir, tiny_model_dir, trained)
    assert_plain_peft_reloads(tmp_path / "out", trained, tiny_model_dir)
    assert_plain_peft_reloads(tmp_path / "out" / "checkpoint-2" / "model", trained, tiny_model_dir)


def test_a_chain_of_three_adapters_still_names_the_true_base(tiny_model_dir, sft_adapter_dir, tmp_path):
    """SFT -> DPO -> SFT again, each with a new LoRA (the last one on fewer modules): the last
    folder is one adapter on the bare base holding all three."""
    DPOTrainer(sft_adapter_dir, dpo_args(tmp_path / "dpo"), preference_pairs(8),
               model_config=lora(sft_adapter_dir, 2, 2)).train()
    rows = datasets.Dataset.from_list([{"prompt": f"Q{i}: ", "completion": f"again {i % 7}"} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "sft2"), max_steps=2, per_device_train_batch_size=8,
                     learning_rate=5e-2, save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(args=args, train_dataset=rows,
                         model_config=lora(tmp_path / "dpo", 3, 6, lora_target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert_plain_peft_reloads(tmp_path / "sft2", trained_logits(trainer.model), tiny_model_dir)


def test_a_reward_model_from_an_sft_adapter_saves_its_whole_backbone(tiny_model_dir, sft_adapter_dir, tmp_path):
    """A causal-LM adapter starts a LoRA reward model: the saved SEQ_CLS adapter keeps the SFT
    LoRA on the backbone (its lm_head has no place in a reward model) and the trained score head."""
    rows = datasets.Dataset.from_list([{"prompt": f"Q{i}: ", "chosen": f"{i} yes", "rejected": f"{i} no"}
                                       for i in range(8)])
    args = RewardConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8,
                        learning_rate=5e-2, save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0)
    trainer = RewardTrainer(args=args, train_dataset=rows, model_config=lora(sft_adapter_dir, 2, 4))
    trainer.train()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir and config["task_type"] == "SEQ_CLS"
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "out"), num_labels=1).eval()
    trainer.model.eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        difference = (reward_scores(reloaded, IDS, mask) - reward_scores(trainer.model, IDS, mask)).abs().max()
    assert difference < 1e-5, f"reloaded reward scores differ by {difference:.2e}"


def test_a_starting_adapter_that_cannot_be_folded_is_refused_before_training(tiny_model_dir, tmp_path):
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    load_policy(ModelConfig(model_name_or_path=str(tmp_path / "dora")))  # merging alone is fine
    with pytest.raises(ValueError, match="use_dora"):
        load_policy(lora(tmp_path / "dora", 2, 4))
