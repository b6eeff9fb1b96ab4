"""Chunked log-probabilities equal the naive float32 log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config

from llmrl.logprobs import completion_logprobs, selective_log_softmax


def naive_log_softmax(logits, index):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _grads(fn, logits, index, weights):
    logits = logits.detach().clone().requires_grad_(True)
    (fn(logits, index) * weights).sum().backward()
    return logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_naive_on_32k_vocabulary_values_and_gradients(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 32000, generator=generator) * 4).to(dtype)
    index = torch.randint(0, 32000, (2, 5), generator=generator)
    weights = torch.randn(2, 5, generator=generator)  # a generic upstream gradient

    chunked = selective_log_softmax(logits, index, chunk_size=3)  # chunks do not divide T
    assert chunked.dtype == torch.float32 and chunked.shape == (2, 5)
    torch.testing.assert_close(chunked, naive_log_softmax(logits, index), rtol=0, atol=1e-5)

    grad = _grads(lambda x, i: selective_log_softmax(x, i, chunk_size=3), logits, index, weights)
    expected = _grads(naive_log_softmax, logits, index, weights)
    assert grad.dtype == dtype
    # Both compute the gradient in float32 and round it to the logits' dtype once, so they are at
    # most one bfloat16 step apart: 8 significant bits make that step 2**-8 to 2**-7 of the value
    # (seen: 2**-13 on a value of 0.018, when the two float32 results straddle a rounding boundary).
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grad.float(), expected.float(), rtol=rtol, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    num_seqs=st.integers(1, 4),
    seq_len=st.integers(1, 6),
    vocab=st.integers(2, 50),
    chunk_size=st.integers(1, 20),
    sliced=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_chunk_size_matches_naive(num_seqs, seq_len, vocab, chunk_size, sliced, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_seqs, seq_len + 1, vocab, generator=generator) * 3
    # The [:, :-1] slice (what completion_logprobs passes) is not viewable as 2-D.
    logits = logits[:, :-1] if sliced else logits[:, 1:].contiguous()
    index = torch.randint(0, vocab, (num_seqs, seq_len), generator=generator)
    weights = torch.randn(num_seqs, seq_len, generator=generator)
    chunked = selective_log_softmax(logits, index, chunk_size)
    torch.testing.assert_close(chunked, naive_log_softmax(logits, index), rtol=0, atol=1e-5)
    grad = _grads(lambda x, i: selective_log_softmax(x, i, chunk_size), logits, index, weights)
    torch.testing.assert_close(grad, _grads(naive_log_softmax, logits, index, weights), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match=r"logits \[N, T, V\] and index \[N, T\]"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _naive_completion(model, input_ids, attention_mask, num_completion_tokens, temperature):
    """Full logits over every position, float32 log-softmax: the reference."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, -num_completion_tokens - 1 : -1].float() / temperature
    logprobs = naive_log_softmax(logits, input_ids[:, -num_completion_tokens:])
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    return logprobs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_full_logits_and_carry_gradients(tiny_model, temperature):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(6, 103, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    logprobs, entropy = completion_logprobs(
        tiny_model, input_ids, attention_mask, 5, temperature=temperature, with_entropy=True, chunk_size=4
    )
    expected_logprobs, expected_entropy = _naive_completion(tiny_model, input_ids, attention_mask, 5, temperature)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-5)

    # The same gradients reach the weights as through the naive path.
    tiny_model.zero_grad()
    logprobs.sum().backward()
    grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    _naive_completion(tiny_model, input_ids, attention_mask, 5, temperature)[0].sum().backward()
    for grad, param in zip(grads, tiny_model.parameters()):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-6)
    tiny_model.zero_grad()


def test_lm_head_runs_on_completion_positions_only(tiny_model):
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            ids = torch.randint(6, 103, (2, 30))
            completion_logprobs(tiny_model, ids, torch.ones_like(ids), 4)
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 4, 64])]  # the C positions that predict a completion token, not all 30


def test_padding_shared_by_every_row_is_trimmed_and_changes_nothing(tiny_model):
    """Columns that are padding in every row (left of the shortest prompts, right of the longest
    completion) are not run: the LM head sees fewer positions, real logprobs are unchanged, and the
    trimmed completion positions come back as 0."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 103, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    # 3 columns of shared left padding, 2 more on row 1; completion C=6 with its last 2 columns
    # padding in both rows, one more in row 0.
    padded_ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids, torch.zeros(2, 2, dtype=torch.long)], 1)
    padded_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), mask, torch.zeros(2, 2, dtype=torch.long)], 1)
    padded_mask[1, 3:5] = 0
    padded_mask[0, -3] = 0
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        logprobs, entropy = completion_logprobs(tiny_model, padded_ids, padded_mask, 6, with_entropy=True)
    finally:
        hook.remove()
    assert seen == [4]
    untrimmed, untrimmed_entropy = _naive_completion(tiny_model, padded_ids, padded_mask, 6, 1.0)
    real = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(logprobs[real], untrimmed[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[real], untrimmed_entropy[real], rtol=0, atol=1e-5)
    assert torch.all(logprobs[:, -2:] == 0) and logprobs.requires_grad


def test_an_all_padding_completion_batch_still_has_a_graph(tiny_model):
    # A micro-batch of filler rows (empty completion masks) must still backpropagate (DDP waits for it).
    ids = torch.randint(6, 103, (2, 10))
    mask = torch.ones_like(ids)
    mask[:, -4:] = 0
    logprobs = completion_logprobs(tiny_model, ids, mask, 4)
    assert logprobs.shape == (2, 4) and logprobs.requires_grad
    (logprobs * 0).sum().backward()
    tiny_model.zero_grad()


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Learned absolute position embeddings: unlike RoPE, they break if padding shifts positions."""
    config = GPT2Config(
        vocab_size=103, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gpt2"])
def test_left_padded_batch_equals_each_sequence_alone(model_name, request):
    """Prompts of different lengths (left padding), completions of different lengths (right padding)."""
    tiny_model = request.getfixturevalue(model_name)
    generator = torch.Generator().manual_seed(2)
    pad = tiny_model.config.pad_token_id
    prompts = [torch.randint(6, 103, (n,), generator=generator) for n in (2, 7, 4)]
    completions = [torch.randint(6, 103, (n,), generator=generator) for n in (5, 2, 4)]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        left, right = width_p - len(p), width_c - len(c)
        rows.append(torch.cat([torch.full((left,), pad), p, c, torch.full((right,), pad)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(len(p) + len(c)), torch.zeros(right)]).long())
    with torch.no_grad():
        batch = completion_logprobs(tiny_model, torch.stack(rows), torch.stack(masks), width_c)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            alone_ids = torch.cat([p, c]).unsqueeze(0)
            alone = completion_logprobs(tiny_model, alone_ids, torch.ones_like(alone_ids), len(c))
            torch.testing.assert_close(batch[i, : len(c)], alone[0], rtol=0, atol=1e-5)


def test_completion_length_is_checked(tiny_model):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_completion_tokens must be between 1 and"):
        completion_logprobs(tiny_model, ids, torch.ones_like(ids), 0)

