"""Per-token entropy of the policy's next-token distribution, for the entropy bonus and logging."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

# Values upcast at once: 2**24 float32 values are 64 MiB, e.g. 110 positions of a 152k vocabulary.
CHUNK_ELEMENTS = 2**24


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """``log s - sum_v e_v (z_v - m) / s`` with ``e = exp(z - m)``, ``s = sum e``, ``m = max z``.

    That is ``logsumexp(z) - sum softmax(z) z`` with the max taken out of both terms first, in float32
    (float64 stays float64): without the shift, the two terms (about ``max z``) cancel and, with
    ``torch.softmax``'s float32 rounding, leave errors near 1e-4 for a 32k vocabulary.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted = z - z.amax(dim=-1, keepdim=True).detach()  # H does not depend on the shift
    # A -inf logit (a banned token) has p = 0 and adds 0, not 0 * -inf = NaN.
    shifted = shifted.clamp(min=torch.finfo(z.dtype).min)
    exp = shifted.exp()
    total = exp.sum(dim=-1)
    return total.log() - (exp * shifted).sum(dim=-1) / total


def _chunked(logits: torch.Tensor, positions: int) -> torch.Tensor:
    """:func:`_entropy` over slices of dim 0 of about ``positions`` positions each.

    Slicing dim 0 (and recursing into one item when it alone is too large) keeps every chunk a view,
    even of a non-contiguous tensor such as ``logits[:, :-1]``, where a flat reshape would copy it.
    """
    per_item = math.prod(logits.shape[1:-1])
    if logits.dim() > 2 and per_item > positions:
        return torch.stack([_chunked(item, positions) for item in logits.unbind(0)])
    items = max(1, positions // max(1, per_item))
    # With a gradient, checkpointing makes backward recompute each chunk's float32 softmax instead
    # of autograd keeping all of them: the same memory bound in the backward pass as in the forward.
    keep_memory_low = torch.is_grad_enabled() and logits.requires_grad
    return torch.cat(
        [
            checkpoint(_entropy, chunk, use_reentrant=False) if keep_memory_low else _entropy(chunk)
            for chunk in logits.split(items)
        ]
    )


def entropy_from_logits(logits: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits)`` per position: ``[..., V] -> [...]``.

    Computed as ``logsumexp(z) - sum_v softmax(z)_v z_v``, which is exact and never forms
    ``0 * log 0``. Chunks of about ``chunk_elements`` values are upcast to float32 one at a time,
    so a bf16 ``[N, T, V]`` tensor is never copied to float32 whole, in the forward or (by
    recomputing each chunk) the backward pass. Differentiable; the result is float32 (float64 for
    float64 logits).
    """
    if logits.dim() == 1:
        return _entropy(logits)
    return _chunked(logits, max(1, chunk_elements // max(1, logits.shape[-1])))
