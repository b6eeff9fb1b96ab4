"""Log-probabilities of completion tokens, without a float32 log-softmax over the whole batch.

The naive `torch.log_softmax(logits.float(), -1).gather(...)` makes a float32 copy of a
[N, T, V] tensor (8 x 512 x 32000 floats = 500 MiB; with a 150k vocabulary, 2.4 GiB) and autograd
keeps it for the backward pass. Here logπ(token) = logit[token] - logsumexp(logits): the gather
needs no copy, and the logsumexp is taken on a few rows at a time, upcast to float32 one chunk
at a time. A custom backward recomputes the softmax chunk by chunk too, so nothing of size
[N, T, V] in float32 is ever held.
"""

from __future__ import annotations

import torch

from llmrl.algos import entropy_from_logits
from llmrl.models import padded_forward

# Rows (token positions) per float32 chunk: 256 x 32000 x 4 bytes = 32 MiB, plus logsumexp's
# temporaries. Large enough that the Python loop costs nothing next to the kernels.
DEFAULT_CHUNK_SIZE = 256


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
    def forward(ctx, logits, index, chunk_size):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
        logsumexp = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        for block in _blocks(*index.shape, chunk_size):
            logsumexp[block] = torch.logsumexp(logits[block].float(), dim=-1)
        ctx.save_for_backward(logits, index, logsumexp)
        ctx.chunk_size = chunk_size
        return selected - logsumexp

    @staticmethod
    def backward(ctx, grad_output):
        # d logp[i] / d logits[j] = 1[j == index] - softmax(logits)[j], chunk by chunk in float32.
        logits, index, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for block in _blocks(*index.shape, ctx.chunk_size):
            g = grad_output[block].float()
            softmax = torch.exp(logits[block].float() - logsumexp[block].unsqueeze(-1))
            chunk_grad = softmax.mul_(-g.unsqueeze(-1))
            chunk_grad.scatter_add_(-1, index[block].unsqueeze(-1), g.unsqueeze(-1))
            grad_logits[block] = chunk_grad.to(logits.dtype)
        return grad_logits, None, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log_softmax(logits)[index], computed in float32 chunk by chunk.

    Args:
        logits: [N, T, V] in any float dtype (bfloat16 stays bfloat16; it is upcast per chunk).
        index: [N, T] long, the token ids whose log-probability is wanted.
        chunk_size: token positions per float32 chunk; lower it if the vocabulary is huge.
    Returns:
        [N, T] float32 log-probabilities, differentiable with respect to `logits`.
    """
    if logits.dim() != 3 or index.shape != logits.shape[:-1]:
        raise ValueError(
            f"selective_log_softmax wants logits [N, T, V] and index [N, T]; got {tuple(logits.shape)} "
            f"and {tuple(index.shape)}."
        )
    return _SelectiveLogSoftmax.apply(logits, index, chunk_size)


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
        with_entropy: also return the per-token entropy of that distribution.
    Returns:
        logprobs [N, C] float32, or (logprobs, entropy) both [N, C] float32. Positions that are
        padding hold finite junk: multiply by the completion mask.
    """
    num_completion_tokens = int(num_completion_tokens)
    if not 0 < num_completion_tokens < input_ids.shape[1]:
        raise ValueError(
            f"num_completion_tokens must be between 1 and the sequence length minus one "
            f"({input_ids.shape[1] - 1}); got {num_completion_tokens}."
        )
    # The LM head runs only on the C + 1 last positions: position t predicts token t + 1, so the
    # last prompt position predicts the first completion token and the final position is unused.
    logits = padded_forward(model, input_ids, attention_mask, logits_to_keep=num_completion_tokens + 1).logits[:, :-1]
    if temperature != 1.0:
        # In place: the LM head's matmul does not keep its output for backward, so this is safe
        # and saves one [N, C, V] copy.
        logits.div_(temperature)
    completion_ids = input_ids[:, -num_completion_tokens:]
    logprobs = selective_log_softmax(logits, completion_ids, chunk_size)
    if not with_entropy:
        return logprobs
    # Block by block: `logits` is a strided slice, and a flat reshape of it would copy it whole.
    blocks = _blocks(*completion_ids.shape, chunk_size)
    entropy = torch.cat([entropy_from_logits(logits[block]).flatten() for block in blocks])
    return logprobs, entropy.view(completion_ids.shape)
