"""Model roles on the tiny model: policy, reference, reward and value models."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GPT2Config,
)

from llmrl import models
from llmrl.config import ModelConfig
from llmrl.models import (
    last_token_index,
    load_policy,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    lora_config,
    resolve_dtype,
    reward_scores,
    token_values,
)
from llmrl.reference import build_reference
from llmrl.tiny import build_tokenizer

# Three sequences of different lengths, each ending with EOS (id 1), as completions do.
SEQUENCES = [[4, 40, 41, 1], [4, 50, 51, 52, 53, 54, 1], [4, 60, 1]]


def pad(sequences, pad_id, side):
    """[N, T] ids and mask, padded on `side` with `pad_id`."""
    width = max(map(len, sequences))
    ids, mask = [], []
    for seq in sequences:
        filler = [pad_id] * (width - len(seq))
        ids.append(filler + seq if side == "left" else seq + filler)
        ones, zeros = [1] * len(seq), [0] * (width - len(seq))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    """A reward model saved from the tiny causal LM (fresh random head, as before reward training)."""
    path = tmp_path_factory.mktemp("reward")
    load_reward_model(tiny_model_dir).save_pretrained(path)
    return str(path)


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") is torch.float32  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") is torch.bfloat16
    with pytest.raises(ValueError, match="not one of auto"):
        resolve_dtype("int8")


def test_load_tokenizer_pads_left_and_falls_back_to_eos(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=tiny_model_dir))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"

    no_pad = build_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=tiny_model_dir, tokenizer_name_or_path=str(tmp_path)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_lora_config_targets():
    assert lora_config(ModelConfig(), "CAUSAL_LM").target_modules == "all-linear"
    assert lora_config(ModelConfig(lora_target_modules="all-linear")).target_modules == "all-linear"
    config = lora_config(ModelConfig(lora_target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=8), "SEQ_CLS")
    assert set(config.target_modules) == {"q_proj", "v_proj"} and (config.r, config.lora_alpha) == (4, 8)


def test_load_policy_dtype_lora_and_checkpointing_train_the_adapter(tiny_model_dir):
    config = ModelConfig(
        model_name_or_path=tiny_model_dir, dtype="bfloat16", use_peft=True, lora_r=4, gradient_checkpointing=True
    )
    policy = load_policy(config)
    assert isinstance(policy, PeftModel) and policy.get_base_model().dtype == torch.bfloat16
    base = policy.get_base_model()  # transformers 5.23 renamed the flag
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    policy.train()
    ids = torch.tensor([SEQUENCES[1]])
    policy(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # B starts at zero, so B (not yet A) gets the gradient; through checkpointed blocks too.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    # An object that already is a PeftModel is used as is, not wrapped twice.
    assert load_policy(config, policy) is policy


def test_load_policy_accepts_a_model_object(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert load_policy(ModelConfig(), model) is model


def test_4bit_without_gpu_is_refused_before_loading(monkeypatch):
    # A folder that does not exist: the error must come from the check, not from loading.
    config = ModelConfig(model_name_or_path="/nonexistent/model", use_peft=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_policy(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'llmrl\[quant\]'"):
        load_policy(config)


def _train_adapter(policy):
    with torch.no_grad():  # LoRA starts with B = 0; make the adapter change the outputs, as training would
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return policy


def test_lora_reference_is_the_base_model_without_a_copy(tiny_model_dir):
    policy = load_policy(ModelConfig(model_name_or_path=tiny_model_dir, use_peft=True, lora_r=4))
    reference = build_reference(policy, ModelConfig(use_peft=True), needed=True)  # before training
    _train_adapter(policy).eval()
    ids, mask = pad(SEQUENCES, 0, "left")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        policy_logits = policy(input_ids=ids, attention_mask=mask).logits
    policy.train()  # as mid-training: LoRA dropout on, which the reference must not see
    ref_logits = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)
    # No second copy: the reference runs the policy's own parameter storage.
    assert reference.model is policy
    assert {p.data_ptr() for p in reference.model.parameters()} == {p.data_ptr() for p in policy.parameters()}
    # The policy comes back with its adapter on and in training mode.
    assert policy.training
    with torch.no_grad():
        assert torch.equal(policy.eval()(input_ids=ids, attention_mask=mask).logits, policy_logits)
    assert not ref_logits.requires_grad


def test_full_reference_is_a_frozen_copy_and_none_when_not_needed(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert build_reference(policy, ModelConfig(), needed=False) is None
    reference = build_reference(policy, ModelConfig(), needed=True)
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in reference.model.parameters()}
    assert not any(p.requires_grad for p in reference.model.parameters())
    ids, mask = pad(SEQUENCES, 0, "right")
    before = reference(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():  # training the policy must not move the reference
        policy.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(reference(input_ids=ids, attention_mask=mask).logits, before)


def test_reference_refuses_unwrapped_policy_when_lora_is_configured(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="not a PeftModel"):
        build_reference(policy, ModelConfig(use_peft=True), needed=True)


def _gpt2_reward_model():
    """Absolute position embeddings and another backbone name (`transformer`) than Llama's `model`."""
    config = GPT2Config(vocab_size=103, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=1,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("pad_id", [0, 1], ids=["pad", "pad_is_eos"])
def test_reward_scores_ignore_padding_side_and_pad_id(reward_dir, pad_id, architecture):
    if architecture == "llama":
        reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    else:
        reward_model = _gpt2_reward_model().eval()
    with torch.no_grad():
        alone = torch.cat([reward_scores(reward_model, torch.tensor([s]), torch.ones(1, len(s))) for s in SEQUENCES])
        left = reward_scores(reward_model, *pad(SEQUENCES, pad_id, "left"))
        right = reward_scores(reward_model, *pad(SEQUENCES, pad_id, "right"))
    assert left.dtype == torch.float32 and left.shape == (3,)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    assert alone.unique().numel() == 3  # a real head, not a constant


def test_last_token_index_left_and_right():
    assert last_token_index(pad(SEQUENCES, 0, "left")[1]).tolist() == [6, 6, 6]
    assert last_token_index(pad(SEQUENCES, 0, "right")[1]).tolist() == [3, 6, 2]


def _all_outputs(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_reward_and_value_models_reload_with_plain_transformers_to_identical_outputs(reward_dir, tmp_path):
    ids, mask = pad(SEQUENCES, 0, "right")
    reward_model = load_reward_model(reward_dir)
    assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == 0
    value_model = load_value_model(reward_dir)
    value_model.save_pretrained(tmp_path / "value")
    reloaded_value = AutoModelForTokenClassification.from_pretrained(tmp_path / "value")
    reloaded_reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    # The same weights, bit for bit; the outputs then agree to float rounding (CPU kernels may round
    # differently when a reloaded tensor sits at another memory alignment: seen 3e-8).
    for reloaded, model in ((reloaded_value, value_model), (reloaded_reward, reward_model)):
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
        torch.testing.assert_close(_all_outputs(reloaded, ids, mask), _all_outputs(model.eval(), ids, mask),
                                   rtol=0, atol=1e-6)
    assert reloaded_value.config.classifier_dropout == 0.0


def test_value_model_from_reward_model_starts_at_the_reward(reward_dir):
    reward_model = load_reward_model(reward_dir).eval()
    value_model = load_value_model(reward_dir).eval()
    ids, mask = pad(SEQUENCES, 0, "left")
    with torch.no_grad():
        values = token_values(value_model, ids, mask)
        scores = reward_scores(reward_model, ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    torch.testing.assert_close(values[torch.arange(3), last_token_index(mask)], scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["folder", "object"])
def test_value_model_from_policy_starts_at_zero_on_the_same_backbone(tiny_model_dir, tmp_path, source):
    shutil.copytree(tiny_model_dir, tmp_path / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    value_model = load_value_model(str(tmp_path / "policy") if source == "folder" else policy)
    ids, mask = pad(SEQUENCES, 0, "right")
    values = token_values(value_model, ids, mask)
    assert torch.equal(values, torch.zeros_like(values))
    assert torch.equal(value_model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert value_model.dropout.p == 0.0
    # Gradients reach the zero head, so the critic can learn.
    values.sum().backward()
    assert value_model.score.weight.grad.abs().sum() > 0


def test_token_values_for_completion_align_with_completion_logprobs(reward_dir):
    value_model = load_value_model(reward_dir).eval()
    ids, mask = pad(SEQUENCES, 0, "left")
    with torch.no_grad():
        everything = token_values(value_model, ids, mask)
        completion = token_values(value_model, ids, mask, num_completion_tokens=2)
    # The value of the state before completion token t is read where token t is predicted.
    assert torch.equal(completion, everything[:, -3:-1])


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_lora_reward_and_value_models_train_adapter_and_whole_head(reward_dir, task_type):
    load, read = (load_reward_model, reward_scores) if task_type == "SEQ_CLS" else (load_value_model, token_values)
    wrapped = get_peft_model(load(reward_dir), lora_config(ModelConfig(lora_r=4), task_type)).eval()
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    ids, mask = pad(SEQUENCES, 0, "left")
    with torch.no_grad():  # B = 0 and a copied head: the wrapped model starts where the plain one is
        # (float rounding apart: peft's wrapped Linear may add the zero update in another order)
        torch.testing.assert_close(read(wrapped, ids, mask), read(load(reward_dir).eval(), ids, mask),
                                   rtol=0, atol=1e-6)
