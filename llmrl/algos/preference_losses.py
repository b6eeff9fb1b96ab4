"""Offline preference losses (DPO and its neighbours), as TRL's ``DPOTrainer`` defines them, but
for ``sigmoid`` with label smoothing: TRL 1.16 ignores ``label_smoothing`` there, we apply it (cDPO).

Every loss here is a function of the preference margin alone,
``h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))``, so ``PREFERENCE_LOSSES``
maps a name to ``fn(margin [B], *, beta, label_smoothing) -> per-pair loss [B]``;
:func:`preference_loss` computes the margin and the implicit rewards once for all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregate import lookup


def sigmoid(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), conservative with label smoothing (cDPO):

    ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``.

    At ``ls = 0`` this is TRL's ``sigmoid``. TRL 1.16 ignores ``label_smoothing`` for ``sigmoid``
    (it applies it only to robust and the pair losses); we take it as the cDPO smoothing that the
    DPO authors' code and earlier TRL releases used, so a recipe's ``label_smoothing`` is never
    silently ignored.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
        -beta * margin
    )


def ipo(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``(h - 1 / (2 beta))^2``; ``ls`` is ignored.

    The paper's h uses length-averaged log-probabilities (TRL averages them for IPO); here that is
    the caller's choice of which log-probabilities to pass.
    """
    return (margin - 1 / (2 * beta)).square()


def hinge(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC / RSO hinge loss (Zhao et al. 2023; Liu et al. 2023): ``relu(1 - beta h)``; ignores ``ls``."""
    return torch.relu(1 - beta * margin)


def robust(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), unbiased under label noise rate ``ls``:

    ``((1 - ls)(-log sigmoid(beta h)) - ls (-log sigmoid(-beta h))) / (1 - 2 ls)``.
    """
    if label_smoothing >= 0.5:
        raise ValueError(
            "preference loss 'robust' needs label_smoothing < 0.5 (it divides by "
            f"1 - 2 * label_smoothing); got {label_smoothing}"
        )
    noisy = -(1 - label_smoothing) * F.logsigmoid(beta * margin) + label_smoothing * F.logsigmoid(
        -beta * margin
    )
    return noisy / (1 - 2 * label_smoothing)


PREFERENCE_LOSSES = {"sigmoid": sigmoid, "ipo": ipo, "hinge": hinge, "robust": robust}


def preference_loss(
    name: str,
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per_pair_loss, chosen_rewards, rejected_rewards)``, each ``[B]``, of the loss ``name``.

    Inputs are ``[B]`` sequence log-probabilities (summed over the completion tokens, or averaged
    if you want IPO's length normalisation) of the policy and the reference. The implicit rewards
    ``beta * (log pi - log pi_ref)`` are detached: they are for logging (accuracy, margins).
    """
    fn = lookup(PREFERENCE_LOSSES, name, "preference loss")
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the strength of the implicit KL constraint), got {beta}")
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] (a label noise rate), got {label_smoothing}")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    loss = fn(chosen_logratios - rejected_logratios, beta=beta, label_smoothing=label_smoothing)
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
