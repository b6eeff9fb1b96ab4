"""Per-token KL estimators (Schulman, "Approximating KL divergence", 2020).

With samples y ~ pi and Delta = log pi(y) - log pi_ref(y), each estimates KL(pi || pi_ref):

- k1 = Delta                        unbiased, high variance, can be negative (used as a reward term)
- k2 = Delta^2 / 2                  biased, low variance, >= 0 (its gradient is the one of KL)
- k3 = exp(-Delta) + Delta - 1      unbiased, low variance, >= 0 (GRPO's "low_var_kl": r - log r - 1
                                    with r = pi_ref / pi)

Every estimator is elementwise on ``[N, T]`` tensors and knows nothing of padding: mask the result
when you aggregate it.
"""

from __future__ import annotations

import torch

from .aggregate import lookup

# exp(20) ~ 4.9e8: large enough never to bind on a sane policy, small enough to stay finite in
# float32/bfloat16 even when multiplied by an advantage or summed over a long batch.
MAX_LOG_RATIO = 20.0


def safe_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(log_ratio)`` with the log-ratio clamped to ``[-MAX_LOG_RATIO, MAX_LOG_RATIO]`` (finite)."""
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``Delta = log pi - log pi_ref``, ``[N, T]``."""
    return logprobs - ref_logprobs


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``Delta^2 / 2``, ``[N, T]``."""
    return 0.5 * (logprobs - ref_logprobs).square()


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``exp(-Delta) + Delta - 1``, ``[N, T]``, with Delta clamped to ``+-MAX_LOG_RATIO``.

    The whole Delta is clamped (not only the exponent, unlike clamping the result as verl does) so
    the value stays finite AND >= 0 for any input; the gradient is 0 only beyond 20 nats per token.
    """
    delta = (logprobs - ref_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(-delta) + delta - 1.0


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate ``[N, T]`` with ``estimator`` in ``KL_ESTIMATORS``."""
    return lookup(KL_ESTIMATORS, estimator, "KL estimator")(logprobs, ref_logprobs)


def adaptive_kl_coef(beta: float, measured_kl: float, target: float, horizon: int, num_samples: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593), one update.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * num_samples / horizon)``:
    beta grows when the measured KL (per sequence, summed over its tokens) is above target and
    shrinks when below, by at most 20% per horizon's worth of samples. ``num_samples`` is the
    number of sequences the KL was measured on (the whole rollout, every process).
    """
    error = min(max(measured_kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * num_samples / horizon)
