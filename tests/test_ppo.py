"""PPO with a critic in the online loop: it learns, its critic learns, the adaptive KL controller
moves the right way, the critic saves, reloads and resumes, a reward model can be the reward, and
LoRA keeps one base model for policy and reference (the critic as a second adapter on the policy's
base: tests/test_ppo_shared_critic.py)."""

import pytest
import torch
from ppo_task import mean, ppo
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from llmrl.algos import adaptive_kl_coef
from llmrl.config import ModelConfig
from llmrl.data import pad
from llmrl.models import load_reward_model, reward_scores, token_values
from llmrl.rewards.model import RewardModelReward


@pytest.mark.parametrize("seed", [0, 5])
def test_ppo_learns_and_its_critic_learns_the_returns(tiny_model_dir, tmp_path, seed):
    """Measured over seeds 0-5 (digit fraction, mean of the last 5 steps against the start and the
    first 3): with 16 completions a step seed 5 did not learn (0.11 -> 0.104); with 32 every seed
    gains 0.12 (seed 5) to 0.18, value loss falls 20-30x and explained variance ends above 0.93."""
    history = ppo(tiny_model_dir, tmp_path, seed=seed, per_device_train_batch_size=32).train()
    digits = [h["rewards/digit_fraction"] for h in history]
    value_loss = [h["critic/value_loss"] for h in history]
    explained = [h["critic/explained_variance"] for h in history]
    # Above the start (step 0) and above the first steps (the reward dips while the critic, at 0, learns).
    assert mean(digits[-5:]) > max(digits[0], mean(digits[:3])) + 0.05, [round(d, 3) for d in digits]
    assert mean(value_loss[-5:]) < mean(value_loss[:3]) / 5, [round(v, 4) for v in value_loss]
    assert explained[0] == pytest.approx(0.0, abs=1e-6)  # the head starts at zero: V = 0 everywhere
    assert mean(explained[-5:]) > 0.5, [round(e, 3) for e in explained]
    assert all(h["kl_coef"] == pytest.approx(0.05) for h in history)  # no kl_target: the preset's fixed beta


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    assert adaptive_kl_coef(0.1, measured_kl=6.6, target=6.0, horizon=100, num_samples=10) == pytest.approx(
        0.1 * (1 + 0.1 * 10 / 100))
    assert adaptive_kl_coef(0.1, measured_kl=3.0, target=6.0, horizon=100, num_samples=10) < 0.1
    # The error is clipped to +-20%: a KL 100x the target grows beta by at most 20% per horizon.
    assert adaptive_kl_coef(0.1, measured_kl=600.0, target=6.0, horizon=10, num_samples=10) == pytest.approx(0.12)
    assert adaptive_kl_coef(0.1, measured_kl=0.0, target=6.0, horizon=10, num_samples=10) == pytest.approx(0.08)


@pytest.mark.parametrize("target, direction", [(1e-4, 1), (100.0, -1)])
def test_adaptive_kl_in_the_trainer(tiny_model_dir, tmp_path, target, direction):
    history = ppo(tiny_model_dir, tmp_path, max_steps=4, kl_target=target, kl_horizon=64).train()
    coefs = [h["kl_coef"] for h in history]
    assert coefs[0] == pytest.approx(0.05)
    # The first rollout comes from the reference itself (KL 0, below any target), so beta first
    # falls; from then on the policy has moved and beta follows the target.
    assert coefs[1] < coefs[0]
    steps = [b - a for a, b in zip(coefs[1:], coefs[2:])]
    assert all(direction * s > 0 for s in steps), coefs
    # At most 20% per horizon: 16 samples per rollout, horizon 64 -> at most 5% per step (logged in float32).
    assert all(abs(b / a - 1) <= 0.05 + 1e-6 for a, b in zip(coefs, coefs[1:])), coefs


def test_ppo_resume_equals_uninterrupted_and_the_critic_reloads(tiny_model_dir, tmp_path):
    common = dict(lr_scheduler_type="constant", kl_target=1.0)  # the KL coefficient must resume too
    whole = ppo(tiny_model_dir, tmp_path / "whole", max_steps=4, **common)
    whole.train()
    ppo(tiny_model_dir, tmp_path / "split", max_steps=2, save_steps=2, **common).train()
    assert (tmp_path / "split" / "out" / "checkpoint-2" / "value_model" / "model.safetensors").exists()
    resumed = ppo(tiny_model_dir, tmp_path / "split", max_steps=4, save_steps=2, resume_from_checkpoint="true",
                  **common)
    history = resumed.train()
    assert [h["step"] for h in history] == [3, 4]
    assert resumed.kl_coef == whole.kl_coef != 0.05
    for a, b in [(whole.model, resumed.model), (whole.critic.model, resumed.critic.model)]:
        for (name, x), y in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(x, y), name

    # The final critic is a plain token-classification folder with the same values.
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "whole" / "out" / "value_model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "whole" / "out" / "value_model")
    ids, mask = pad([tokenizer(text)["input_ids"] for text in ["3 yes 12", "10 no"]], tokenizer.pad_token_id)
    expected = token_values(whole.critic.export(), ids, mask)
    torch.testing.assert_close(token_values(reloaded, ids, mask), expected, rtol=0, atol=1e-6)  # float rounding only


def test_a_reward_model_is_the_reward_and_the_critic_starts_from_it(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    reward_model = load_reward_model(tiny_model_dir)
    with torch.no_grad():
        reward_model.score.weight.normal_(0, 1.0)  # a head that gives different pairs different scores
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    # As a reward function: prompt + completion + EOS through the reward model's tokenizer.
    reward = RewardModelReward(str(tmp_path / "rm"))
    scores = reward(prompts=["2+2=", "7 yes"], completions=["4", "x1"])
    by_hand = [reward_scores(reward_model, torch.tensor([tokenizer(text + tokenizer.eos_token)["input_ids"]]),
                             torch.ones(1, len(tokenizer(text + tokenizer.eos_token)["input_ids"]), dtype=torch.long))
               for text in ["2+2=4", "7 yesx1"]]
    assert scores == pytest.approx([float(s) for s in by_hand], abs=1e-5) and scores[0] != scores[1]

    trainer = ppo(tiny_model_dir, tmp_path, reward_funcs=[], reward_weights=None, max_steps=2,
                  reward_model_name_or_path=str(tmp_path / "rm"))
    # The critic starts from the reward model: its value after the last token is the reward score.
    ids, mask = pad([tokenizer("5 no" + tokenizer.eos_token)["input_ids"]], tokenizer.pad_token_id)
    values = token_values(trainer.critic.model, ids, mask)
    assert values[0, -1].item() == pytest.approx(reward_scores(reward_model, ids, mask).item(), abs=1e-5)
    history = trainer.train()
    assert all("rewards/reward_model" in h and h["reward"] == pytest.approx(h["rewards/reward_model"]) for h in history)


def test_a_critic_cannot_start_from_a_reward_model_with_other_tokens(tiny_model_dir, tmp_path):
    """The critic reads the policy's token ids: a reward model whose tokenizer differs is refused
    as its starting point, with the fix, rather than read the ids as other tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    load_reward_model(tiny_model_dir).save_pretrained(tmp_path / "rm")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="tokenizer differs from the policy's.*value_model_name_or_path"):
        ppo(tiny_model_dir, tmp_path, reward_funcs=[], reward_weights=None, reward_model_name_or_path=str(tmp_path / "rm"))


def test_lora_ppo_with_a_separate_critic_keeps_both_bases_frozen(tiny_model_dir, tmp_path):
    """share_critic_base: false, with the policy given as an object: LoRA wraps that object in place,
    and the critic is still a plain copy of its weights, with its own adapter."""
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = {name: value.clone() for name, value in start.state_dict().items()}
    config = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8)
    trainer = ppo(start, tmp_path, model_config=config, max_steps=1, share_critic_base=False,
                  processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.reference.model is policy  # the reference is the policy with its adapter disabled
    critic = trainer.critic.export()
    backbone = {name.removeprefix("base_model.model.").replace(".base_layer", ""): p
                for name, p in critic.named_parameters() if "lora_" not in name and "score" not in name}
    assert {name: plain[name] for name in backbone} and all(torch.equal(p, plain[name]) for name, p in backbone.items())
    frozen = {n: p.clone() for n, p in critic.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    base = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainer.train()
    for name, value in policy.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name
    for name, value in critic.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


def test_lora_adapter_folders_load_merged_for_every_role(tiny_model_dir, tmp_path):
    """A reward-model run and an SFT run with LoRA save adapter folders; PPO loads them as the
    reward model, the critic's start and the policy: merged onto their base, same outputs."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmrl.models import load_policy, load_value_model, lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = pad([tokenizer(t)["input_ids"] for t in ["3 yes 12", "10 no"]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    for task, model in [("SEQ_CLS", load_reward_model(tiny_model_dir)),
                        ("CAUSAL_LM", AutoModelForCausalLM.from_pretrained(tiny_model_dir))]:
        adapter = get_peft_model(model, lora_config(ModelConfig(lora_r=4), task))
        with torch.no_grad():
            for parameter in adapter.parameters():
                if parameter.requires_grad:  # a trained adapter: LoRA B and the head away from their init
                    parameter.add_(torch.randn_like(parameter) * 0.3)
        adapter.save_pretrained(tmp_path / task)
        tokenizer.save_pretrained(tmp_path / task)

    trained = PeftModel.from_pretrained(load_reward_model(tiny_model_dir), tmp_path / "SEQ_CLS")
    expected = reward_scores(trained, ids, mask)
    assert torch.allclose(reward_scores(load_reward_model(str(tmp_path / "SEQ_CLS")), ids, mask), expected, atol=1e-5)
    critic = load_value_model(str(tmp_path / "SEQ_CLS"))
    # Left padding: every row's last real token is the last column.
    assert torch.allclose(token_values(critic, ids, mask)[:, -1], expected, atol=1e-5)

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "CAUSAL_LM")
    policy = load_policy(ModelConfig(model_name_or_path=str(tmp_path / "CAUSAL_LM")))
    assert not isinstance(policy, PeftModel)
    assert torch.allclose(policy(input_ids=ids).logits, sft(input_ids=ids).logits, atol=1e-5)
