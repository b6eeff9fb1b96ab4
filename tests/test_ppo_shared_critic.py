"""PPO under LoRA with the critic as a second adapter (and a value head) on the policy's own base
(share_critic_base): one base for policy, reference and critic, the same gradients as a separate
LoRA critic, learning, exact resume, plain adapter folders, and 2 processes."""

import pytest
import torch
from ppo_task import mean, ppo
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from llmrl.config import ModelConfig, RLConfig
from llmrl.data import pad
from llmrl.models import token_values


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
