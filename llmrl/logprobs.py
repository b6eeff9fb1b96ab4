"""Log-probabilities of completion tokens, without a float32 log-softmax over the whole batch.

The naive `torch.log_softmax(logits.float(), -1).gather(...)` makes a float32 copy of a
[N, T, V] tensor (8 x 512 x 32000 floats = 500 MiB; with a 150k vocabulary, 2.4 GiB) and autograd
keeps it for the backward pass. Here logπ(token) = logit[token] - logsumexp(logits): the gather
needs no copy, and the logsumexp is taken on a few rows at a time, upcast to float32 one chunk
at a time. A custom backward recomputes the softmax chunk by chunk too, writing the gradient in
place, so nothing of size [N, T, V] in float32 is ever held beyond the logits and their gradient.
The entropy, for logging, comes from the same chunks while they are in cache.
"""

from __future__ import annotations

import torch

from llmrl.algos import entropy_from_logits
from llmrl.models import padded_forward

# Float32 values per chunk. On a CPU the chunk is read several times (logsumexp, entropy, the
# backward's exp, scale and scatter): at 1 MiB it stays in the L2 cache, which made the log-softmax
# and entropy of a 32k vocabulary 3-4x faster than 32 MiB chunks. On a GPU every chunk is a few
# kernel launches, so chunks are large (64 MiB: ~110 rows of a 150k vocabulary).
CHUNK_ELEMENTS = {"cpu": 2**18, "cuda": 2**24}


def default_chunk_size(logits: torch.Tensor) -> int:
    """Token positions per float32 chunk for `logits` [..., V] on their device."""
    elements = CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, elements // logits.shape[-1])


def _blocks(num_seqs: int, seq_len: int, rows: int):
    """(sequence slice, position slice) blocks of about `rows` positions covering [N, T].

    Chunks never cross a sequence boundary in the middle, so `logits[block]` stays a view even
    when `logits` is a non-contiguous slice such as `full_logits[:, :-1]` (a flat reshape would copy).
    """
    if seq_len >= rows:
        for n in range(num_seqs):
            for t in range(0, seq_len, rows):
                yield slice(n, n + 1), slice(t, t + rows)
    else:
        per_block = max(1, rows // max(seq_len, 1))
        for n in range(0, num_seqs, per_block):
            yield slice(n, n + per_block), slice(None)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, chunk_size, with_entropy):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
        logsumexp = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logsumexp) if with_entropy else None
        for block in _blocks(*index.shape, chunk_size):
            chunk = logits[block].float()
            logsumexp[block] = torch.logsumexp(chunk, dim=-1)
            if with_entropy:
                entropy[block] = entropy_from_logits(chunk)
        ctx.save_for_backward(logits, index, logsumexp)
        ctx.chunk_size = chunk_size
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return selected - logsumexp, entropy
        return selected - logsumexp

    @staticmethod
    def backward(ctx, grad_output, *_):
        # d logp[i] / d logits[j] = 1[j == index] - softmax(logits)[j], chunk by chunk in float32,
        # written straight into the gradient when the logits are float32.
        logits, index, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        in_place = logits.dtype == torch.float32
        for block in _blocks(*index.shape, ctx.chunk_size):
            g = grad_output[block].float().unsqueeze(-1)
            chunk = grad_logits[block] if in_place else torch.empty(logits[block].shape, device=logits.device)
            torch.sub(logits[block], logsumexp[block].unsqueeze(-1), out=chunk)
            chunk.exp_().mul_(-g)
            chunk.scatter_add_(-1, index[block].unsqueeze(-1), g)
            if not in_place:
                grad_logits[block] = chunk
        return grad_logits, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_size: int | None = None, *, with_entropy: bool = False
):
    """log_softmax(logits)[index], computed in float32 chunk by chunk.

    Args:
        logits: [N, T, V] in any float dtype (bfloat16 stays bfloat16; it is upcast per chunk).
        index: [N, T] long, the token ids whose log-probability is wanted.
        chunk_size: token positions per float32 chunk; None = `default_chunk_size`.
        with_entropy: also return the entropy of softmax(logits) per position, from the same chunks.
    Returns:
        [N, T] float32 log-probabilities, differentiable with respect to `logits`; with
        `with_entropy`, also the [N, T] float32 entropy, for logging (no gradient: an entropy
        bonus would use `llmrl.algos.entropy_from_logits`).
    """
    if logits.dim() != 3 or index.shape != logits.shape[:-1]:
        raise ValueError(
            f"selective_log_softmax wants logits [N, T, V] and index [N, T]; got {tuple(logits.shape)} "
            f"and {tuple(index.shape)}."
        )
    return _SelectiveLogSoftmax.apply(logits, index, chunk_size or default_chunk_size(logits), with_entropy)


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
):
    """Log-probabilities (and entropies) of the last C tokens of each sequence under `model`.

    Args:
        model: a causal LM (or a `ReferenceModel`) whose forward takes `logits_to_keep`.
        input_ids, attention_mask: [N, P + C], prompts (left padding fine) followed by completions;
            the completion is the last C columns (right padding after EOS fine).
        num_completion_tokens: C.
        temperature: the temperature the completions were sampled at. Logits are divided by it so
            these are the logprobs of the distribution that actually produced the tokens, which the
            importance ratio and the KL term assume.
        with_entropy: also return the per-token entropy of that distribution (for logging; no gradient).
    Returns:
        logprobs [N, C] float32, or (logprobs, entropy) both [N, C] float32. Positions that are
        padding hold junk (0 after the batch's longest completion): multiply by the completion mask.
    """
    num_completion_tokens = int(num_completion_tokens)
    length = input_ids.shape[1]
    if not 0 < num_completion_tokens < length:
        raise ValueError(
            f"num_completion_tokens must be between 1 and the sequence length minus one "
            f"({length - 1}); got {num_completion_tokens}."
        )
    # Padding trimmed: columns that are padding in every row (the left padding of the shortest
    # prompts, the right padding after the longest completion) change no real token's logprob,
    # since positions are counted over real tokens. The last prompt column and one completion
    # column always stay, so the pass (and its graph) exists even for an all-padding micro-batch.
    real = attention_mask.bool().any(0)
    prompt_end = length - num_completion_tokens
    start = min(int(real.int().argmax()), prompt_end - 1)
    end = max(length - int(real.flip(0).int().argmax()), prompt_end + 1) if real.any() else prompt_end + 1
    input_ids, attention_mask = input_ids[:, start:end], attention_mask[:, start:end]
    kept = end - prompt_end
    # The LM head runs only on the positions that predict a completion token: position t predicts
    # token t + 1. Given as indices, they come out contiguous: no slice of a larger logits tensor
    # whose backward would allocate and copy the whole of it.
    positions = torch.arange(input_ids.shape[1] - kept - 1, input_ids.shape[1] - 1, device=input_ids.device)
    logits = padded_forward(model, input_ids, attention_mask, logits_to_keep=positions).logits
    if temperature != 1.0:
        # In place: the LM head's matmul does not keep its output for backward, so this is safe
        # and saves one [N, C, V] copy.
        logits.div_(temperature)
    outputs = selective_log_softmax(logits, input_ids[:, -kept:], chunk_size, with_entropy=with_entropy)
    pad = (0, num_completion_tokens - kept)
    if not with_entropy:
        return torch.nn.functional.pad(outputs, pad)
    return tuple(torch.nn.functional.pad(x, pad) for x in outputs)
