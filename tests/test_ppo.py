"""PPO with a critic in the online loop: it learns, its critic learns, the adaptive KL controller
moves the right way, the critic saves, reloads and resumes, a reward model can be the reward, and
LoRA keeps one base model for policy and reference."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from llmrl import RLTrainer
from llmrl.algos import adaptive_kl_coef
from llmrl.config import ModelConfig, RLConfig
from llmrl.data import pad
from llmrl.models import load_reward_model, reward_scores, token_values
from llmrl.rewards import completion_text
from llmrl.rewards.model import RewardModelReward


def digit_fraction(prompts, completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def bonus_plus_digits(prompts, completions, bonus, **kwargs):
    """The prompt's bonus (1 for 'yes' prompts, 0 for 'no'), which a critic can learn to predict,
    plus the completion's digit fraction, which the policy can learn to raise."""
    return [b + d for b, d in zip(bonus, digit_fraction(prompts, completions))]


def bonus_prompts(n=32):
    return datasets.Dataset.from_list([{"prompt": f"{i} " + ("yes" if i % 2 else "no"), "bonus": float(i % 2)}
                                       for i in range(n)])


def ppo(model_dir, tmp_path, reward_funcs=(bonus_plus_digits, digit_fraction), model_config=None,
        processing_class=None, **overrides):
    settings = dict(algorithm="ppo", output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
                    max_completion_length=8, learning_rate=3e-3, value_learning_rate=3e-3, max_steps=30, seed=0,
                    logging_steps=1000, log_completions_steps=0, save_steps=0, reward_weights=[1.0, 0.0])
    args = RLConfig(**{**settings, **overrides})
    return RLTrainer(model_dir, args, bonus_prompts(), reward_funcs=list(reward_funcs), model_config=model_config,
                     processing_class=processing_class)


def mean(values):
    return sum(values) / len(values)


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


# ---- the critic as a second adapter on the policy's base (share_critic_base) -------------------


def lora_ppo(model_dir, tmp_path, checkpointing=False, **overrides):
    config = ModelConfig(model_name_or_path=model_dir, use_peft=True, lora_r=4, lora_alpha=8,
                         gradient_checkpointing=checkpointing)
    return ppo(model_dir, tmp_path, model_config=config, **overrides)


def randomize_adapters(model, seed=0):
    """Move every LoRA B and the value head off their zero init, so each adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "value_head" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def some_inputs(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return pad([tokenizer(text)["input_ids"] for text in ["3 yes 12", "10 no"]], tokenizer.pad_token_id)


def test_lora_ppo_shares_one_base_between_policy_reference_and_critic(tiny_model_dir, tmp_path):
    shared = lora_ppo(tiny_model_dir, tmp_path / "shared", max_steps=1)
    separate = lora_ppo(tiny_model_dir, tmp_path / "separate", max_steps=1, share_critic_base=False)
    policy = shared.accelerator.unwrap_model(shared.model)
    assert shared.critic.shared and not separate.critic.shared
    assert shared.reference.model is policy and shared.critic.model is shared.model

    # The critic adds one adapter like the policy's and a head (hidden_size + 1), and no other tensor.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n and ".default." in n)
    assert sum(p.numel() for p in policy.parameters()) == (sum(p.numel() for p in plain.parameters()) + 2 * adapter
                                                           + plain.config.hidden_size + 1)
    value_model = shared.critic.value_model
    held = {p.data_ptr() for module in (policy, value_model.backbone, value_model.head) for p in module.parameters()}
    assert len(held) == len(list(policy.parameters()))

    ids, mask = some_inputs(tiny_model_dir)
    assert torch.equal(token_values(value_model, ids, mask), torch.zeros(ids.shape))  # values start at 0

    # With every adapter trained, the policy still computes what the separate setup's policy
    # computes with the same adapter, and the reference is the plain base: the critic's adapter
    # takes part in neither. Running the reference leaves the critic trainable.
    randomize_adapters(policy)
    separate_policy = separate.accelerator.unwrap_model(separate.model).eval()
    policy.eval()  # no LoRA dropout
    separate_policy.load_state_dict({k: v for k, v in policy.state_dict().items() if "critic" not in k
                                     and "value_head" not in k})
    torch.testing.assert_close(policy(input_ids=ids, attention_mask=mask).logits,
                               separate_policy(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    torch.testing.assert_close(shared.reference(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert token_values(value_model, ids, mask).abs().min() > 0
    policy_tensors = sum(".default." in name for name, _ in policy.named_parameters())
    assert len(shared.critic._parameters) == policy_tensors + 2 and all(p.requires_grad for p in shared.critic._parameters)


def one_backward_gradients(trainer, model_dir):
    """Gradients of one policy + value loss over both adapters (the loop's single backward)."""
    from llmrl.logprobs import completion_logprobs

    ids, mask = some_inputs(model_dir)
    trainer.model.train()
    torch.manual_seed(1)  # the same LoRA dropout masks in both runs
    logprobs = completion_logprobs(trainer.model, ids, mask, 4)
    values = token_values(trainer.critic.value_model, ids, mask, 4)
    (logprobs.sum() + (values - 1).pow(2).sum()).backward()
    return {n: p.grad for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if p.requires_grad}


def test_shared_critic_gradients_are_the_same_with_gradient_checkpointing(tiny_model_dir, tmp_path):
    """Checkpointing recomputes each layer in the backward, after the critic's forward has ended:
    the recompute must run the adapter its forward ran, or both adapters get wrong gradients."""
    plain = lora_ppo(tiny_model_dir, tmp_path / "plain", max_steps=1)
    checkpointed = lora_ppo(tiny_model_dir, tmp_path / "checkpointed", checkpointing=True, max_steps=1)
    policy = plain.accelerator.unwrap_model(plain.model)
    randomize_adapters(policy)
    checkpointed.accelerator.unwrap_model(checkpointed.model).load_state_dict(policy.state_dict())
    assert checkpointed.accelerator.unwrap_model(checkpointed.model).is_gradient_checkpointing
    expected = one_backward_gradients(plain, tiny_model_dir)
    got = one_backward_gradients(checkpointed, tiny_model_dir)
    assert expected.keys() == got.keys() and any(".critic." in n for n in got) and any("value_head" in n for n in got)
    for name, gradient in expected.items():
        assert gradient is not None and gradient.abs().max() > 0, name
        assert torch.equal(got[name], gradient), name


def test_the_shared_critic_trains_exactly_like_the_separate_lora_critic(tiny_model_dir, tmp_path):
    """Given the same starting weights, PPO with the critic as a second adapter on the policy's base
    and PPO with a separate LoRA critic on its own copy of the base take the same steps, bit for bit."""
    from accelerate.utils import set_seed

    separate = lora_ppo(tiny_model_dir, tmp_path / "separate", max_steps=3, share_critic_base=False)
    shared = lora_ppo(tiny_model_dir, tmp_path / "shared", max_steps=3)
    separate_policy, critic = separate.accelerator.unwrap_model(separate.model), separate.critic.export()
    shared_policy = shared.accelerator.unwrap_model(shared.model)
    # The separate critic's LoRA and `score` head, by their names in the shared module.
    critic_names = {name: name.replace(".default.", ".critic.") for name, _ in critic.named_parameters() if "lora_" in name}
    critic_names |= {f"base_model.model.score.modules_to_save.default.{k}": f"value_head.{k}" for k in ("weight", "bias")}
    with torch.no_grad():
        targets = dict(shared_policy.named_parameters())
        for name, value in separate_policy.named_parameters():
            targets[name].copy_(value)
        for name, value in critic.named_parameters():
            if name in critic_names:
                targets.pop(critic_names[name]).copy_(value)
    assert all(".default." in name or not p.requires_grad for name, p in targets.items())  # every critic tensor set
    set_seed(0)
    separate_history = separate.train()
    set_seed(0)
    shared_history = shared.train()
    assert [h["critic/value_loss"] for h in shared_history] == [h["critic/value_loss"] for h in separate_history]
    assert [h["reward"] for h in shared_history] == [h["reward"] for h in separate_history]
    trained = dict(shared_policy.named_parameters())
    for name, value in separate_policy.named_parameters():
        assert torch.equal(trained[name], value), name
    for name, value in critic.named_parameters():
        if name in critic_names:
            assert torch.equal(trained[critic_names[name]], value), name


@pytest.mark.parametrize("seed", [0, 2])
def test_ppo_with_lora_and_a_shared_critic_learns(sharp_model_dir, tmp_path, seed):
    """LoRA leaves the LM head frozen, so the policy needs the sharp model (a tiny model's 0.02-scale
    head caps how far an adapter can move its logits) and a LoRA-sized learning rate. Measured over
    seeds 0-5 (digit fraction, mean of the last 5 steps against the first 3): with 16 completions a
    step and beta 0.05 two seeds of six did not learn (the KL penalty outweighs the digit signal);
    with 32 and beta 0.01 every seed did, the weakest (seed 2) 0.098 -> 0.217, the others to 0.58-0.89."""
    trainer = lora_ppo(sharp_model_dir, tmp_path, learning_rate=3e-2, value_learning_rate=3e-2, seed=seed,
                       per_device_train_batch_size=32, beta=0.01)
    history = trainer.train()
    assert trainer.critic.shared
    digits = [h["rewards/digit_fraction"] for h in history]
    value_loss = [h["critic/value_loss"] for h in history]
    explained = [h["critic/explained_variance"] for h in history]
    # Above the start (step 0) and above the first steps (the reward dips while the critic, at 0, learns).
    assert mean(digits[-5:]) > max(digits[0], mean(digits[:3])) + 0.05, [round(d, 3) for d in digits]
    assert mean(value_loss[-5:]) < mean(value_loss[:3]) / 2, [round(v, 4) for v in value_loss]
    assert explained[0] == pytest.approx(0.0, abs=1e-6)  # the head and the adapter start at zero: V = 0
    assert mean(explained[-5:]) > 0.5, [round(e, 3) for e in explained]


def test_shared_critic_resumes_exactly_and_saves_plain_adapter_folders(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from llmrl.models import load_value_model

    common = dict(lr_scheduler_type="constant", kl_target=1.0)
    whole = lora_ppo(tiny_model_dir, tmp_path / "whole", max_steps=4, **common)
    whole.train()
    lora_ppo(tiny_model_dir, tmp_path / "split", max_steps=2, save_steps=2, **common).train()
    checkpoint = tmp_path / "split" / "out" / "checkpoint-2"
    assert (checkpoint / "value_model" / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model" / "critic").exists()  # the policy folder holds the policy adapter only
    resumed = lora_ppo(tiny_model_dir, tmp_path / "split", max_steps=4, save_steps=2, resume_from_checkpoint="true",
                       **common)
    assert [h["step"] for h in resumed.train()] == [3, 4]
    # The policy's module holds both adapters and the head; the critic's optimizer moments shape steps 3-4.
    for (name, x), y in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(x, y), name
    assert any(".critic." in n and "lora_B" in n and p.abs().max() > 0 for n, p in resumed.model.named_parameters())

    # output_dir is a plain policy adapter; value_model/ a plain TOKEN_CLS adapter with the same values.
    out = tmp_path / "whole" / "out"
    ids, mask = some_inputs(tiny_model_dir)
    policy = whole.accelerator.unwrap_model(whole.model).eval()  # no LoRA dropout
    reloaded_policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert list(reloaded_policy.peft_config) == ["default"] and not (out / "critic").exists()
    torch.testing.assert_close(reloaded_policy(input_ids=ids, attention_mask=mask).logits,
                               policy(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
    expected = token_values(whole.critic.value_model, ids, mask)
    base = AutoModelForTokenClassification.from_pretrained(tiny_model_dir, num_labels=1)
    critic = PeftModel.from_pretrained(base, out / "value_model").eval()
    torch.testing.assert_close(token_values(critic, ids, mask), expected, rtol=0, atol=1e-6)
    # ... and llmrl reloads it as value_model_name_or_path (merged onto its base).
    torch.testing.assert_close(token_values(load_value_model(str(out / "value_model")), ids, mask), expected,
                               rtol=0, atol=1e-5)


def test_a_lora_on_the_lm_head_stays_out_of_the_critic_adapter(tiny_model_dir, tmp_path):
    """The critic runs the backbone only; a critic LoRA on the LM head would get no gradient (DDP fails)."""
    config = ModelConfig(model_name_or_path=tiny_model_dir, use_peft=True, lora_r=4,
                         lora_target_modules=["q_proj", "v_proj", "lm_head"])
    trainer = ppo(tiny_model_dir, tmp_path, model_config=config, max_steps=1, share_critic_base=True)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    names = [name for name, _ in policy.named_parameters()]
    assert any("lm_head.lora_A.default" in n for n in names) and not any("lm_head.lora_A.critic" in n for n in names)
    randomize_adapters(policy)
    gradients = one_backward_gradients(trainer, tiny_model_dir)
    assert all(g is not None and g.abs().max() > 0 for g in gradients.values()), [n for n, g in gradients.items()
                                                                                  if g is None or not g.any()]


def run_lora_ppo(tmp_path, model_dir, name, processes, batch_size, accumulation):
    """Two PPO steps with LoRA, the shared critic and gradient checkpointing under `accelerate launch`
    on CPU, deterministic (top_k 1; no LoRA dropout, as each process draws its own random numbers);
    returns the weights of the saved policy adapter and of the critic folder, and the logged records."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import safetensors.torch
    import yaml
    from ports import free_port

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is"}) + "\n" for i in range(32)))
    (tmp_path / "digitmod.py").write_text("def digits(prompts, completions, **kwargs):\n"
                                          "    return [sum(c.isdigit() for c in text) / 8 for text in completions]\n")
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "ppo", "model_name_or_path": model_dir, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "gradient_checkpointing": True,
        "dataset_name": str(data), "reward_funcs": ["digitmod:digits"], "top_k": 1, "max_completion_length": 8,
        "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": accumulation, "max_steps": 2,
        "learning_rate": 1e-2, "output_dir": str(tmp_path / name), "seed": 3, "log_completions_steps": 0}))
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]
    launch += ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1", "--cpu"]
    python_path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": python_path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "-m", "llmrl", "train", str(recipe)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / name
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    return [safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
            for folder in (out, out / "value_model")], records


def test_two_processes_give_the_one_process_shared_critic_update(sharp_model_dir, tmp_path):
    """DDP all-reduces the critic adapter's and head's gradients with the policy's, though the
    critic's forward bypasses the wrapper; gradient accumulation (no_sync) and checkpointing too."""
    one, logged_one = run_lora_ppo(tmp_path, sharp_model_dir, "one", processes=1, batch_size=16, accumulation=1)
    two, logged_two = run_lora_ppo(tmp_path, sharp_model_dir, "two", processes=2, batch_size=4, accumulation=2)
    # The logged losses are the step's, the same for 1 x 16 and 2 processes x 2 micro-batches of 4.
    for key in ("loss", "critic/value_loss"):
        assert [r[key] for r in logged_two] == pytest.approx([r[key] for r in logged_one], rel=1e-4, abs=1e-7), key
    assert min(r["critic/value_loss"] for r in logged_one) > 1e-3
    for weights_one, weights_two in zip(one, two):
        assert weights_one.keys() == weights_two.keys()
        for key, value in weights_one.items():
            torch.testing.assert_close(weights_two[key], value, rtol=0, atol=1e-5, msg=key)
    assert one[1]["base_model.model.score.weight"].abs().max() > 1e-3  # the critic moved: the check means something


def test_share_critic_base_says_why_it_cannot(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter.*use_peft: true.*share_critic_base: false"):
        ppo(tiny_model_dir, tmp_path, share_critic_base=True)
    with pytest.raises(ValueError, match="the critic starts from .*value_model_name_or_path"):
        lora_ppo(tiny_model_dir, tmp_path, share_critic_base=True, value_model_name_or_path=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="uses no critic"):
        RLConfig(algorithm="grpo", share_critic_base=True)
