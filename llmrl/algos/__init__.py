"""The algorithm library: pure torch functions on padded ``[N, T]`` tensors, and their registries.

Each registry is a plain dict from name to function with one signature per registry; each dispatcher
(``compute_advantages``, ``policy_loss``, ``kl_penalty``, ``aggregate_loss``, ``preference_loss``)
looks the name up and raises a ValueError listing the valid names for an unknown one.
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    REWARD_SCALES,
    compute_advantages,
    group_stats,
)
from .aggregate import (
    LOSS_AGG_MODES,
    aggregate_loss,
    explained_variance,
    loss_counts,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from .entropy import entropy_from_logits
from .kl import KL_ESTIMATORS, adaptive_kl_coef, kl_penalty
from .policy_losses import POLICY_LOSSES, policy_loss, value_loss, value_loss_metrics
from .preference_losses import PREFERENCE_LOSSES, preference_loss
from .sampler_correction import SAMPLER_CORRECTIONS, sampler_correction

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REWARD_SCALES",
    "SAMPLER_CORRECTIONS",
    "adaptive_kl_coef",
    "aggregate_loss",
    "compute_advantages",
    "entropy_from_logits",
    "explained_variance",
    "group_stats",
    "kl_penalty",
    "loss_counts",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "preference_loss",
    "sampler_correction",
    "value_loss",
    "value_loss_metrics",
]
