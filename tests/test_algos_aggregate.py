"""Loss aggregation and masked statistics: hand values, the empty cases, and gradient invariance."""

import math
import statistics

import pytest
import torch

from llmrl.algos import (
    LOSS_AGG_MODES,
    aggregate_loss,
    loss_counts,
    masked_mean,
    masked_var,
    masked_whiten,
)

MAX_LEN = 16

# Row lengths 2, 3 and 0 (an all-padding row, which is not a sequence).
LOSS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [7.0, 7.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])


def test_modes_by_hand():
    expected = {
        "token_mean": (1 + 2 + 3 + 4 + 5) / 5,
        "seq_mean_token_mean": ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2,
        "seq_mean_token_sum": ((1 + 2) + (3 + 4 + 5)) / 2,
        "seq_mean_token_sum_norm": ((1 + 2) + (3 + 4 + 5)) / (2 * MAX_LEN),
    }
    assert expected.keys() == LOSS_AGG_MODES.keys()
    for mode, value in expected.items():
        assert float(aggregate_loss(LOSS, MASK, mode, max_len=MAX_LEN)) == pytest.approx(value), mode


def test_step_counts_replace_the_batch_counts():
    # This batch is one of several micro-batches of a step with 20 tokens and 8 sequences.
    assert float(aggregate_loss(LOSS, MASK, "token_mean", num_tokens=20)) == pytest.approx(15 / 20)
    per_seq = aggregate_loss(LOSS, MASK, "seq_mean_token_sum", num_seqs=torch.tensor(8))
    assert float(per_seq) == pytest.approx(15 / 8)
    assert [int(c) for c in loss_counts(MASK)] == [5, 2]


@pytest.mark.parametrize("mode", list(LOSS_AGG_MODES))
def test_all_padding_gives_zero_not_nan(mode):
    loss = torch.full((2, 3), float("nan"), requires_grad=True)
    value = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode, max_len=MAX_LEN)
    value.backward()
    assert value == 0 and torch.all(loss.grad == 0)
    empty_step = {"num_tokens": 0, "num_seqs": 0, "max_len": 4}
    assert aggregate_loss(torch.ones(1, 2), torch.zeros(1, 2), mode, **empty_step) == 0


def test_sum_norm_needs_max_len():
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm")


def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mean, std = statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])
    assert float(masked_mean(x, mask)) == pytest.approx(mean)
    assert torch.allclose(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0], dtype=torch.float64))
    assert float(masked_var(x, mask)) == pytest.approx(std**2)
    assert float(masked_var(x, mask, unbiased=False)) == pytest.approx(statistics.pvariance([1, 2, 4]))
    whitened = masked_whiten(x, mask)
    rows = [[1, 2, None], [4, None, None]]
    expected = [[0.0 if v is None else (v - mean) / (std + 1e-6) for v in row] for row in rows]
    assert torch.allclose(whitened, torch.tensor(expected, dtype=torch.float64))
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept[mask.bool()], whitened[mask.bool()] + mean)
    assert float(masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))) == 0  # one value: no spread


# ---------------------------------------------------------------- gradient invariance

LENGTHS = [5, 1, 0, 3, 8, 2, 6, 4]
WIDTH = max(LENGTHS)
# Micro-batches of different sizes, each padded to its own width plus some extra columns, the
# all-padding row in the middle one, as accumulation steps on different processes would see them.
MICRO_BATCHES = [([0, 1], 1), ([2, 3, 5], 0), ([4], 3), ([6, 7], 2)]


def per_token_loss(theta, advantages):
    """A nonlinear function of the parameters, as a surrogate of a policy loss."""
    return torch.sin(theta) * advantages + 0.5 * theta.square()


def micro_batch(theta, advantages, rows, extra):
    """Rows ``rows`` cut to their own longest length, then padded with ``extra`` NaN columns."""
    width = max(LENGTHS[i] for i in rows) + extra
    cut = min(width, WIDTH)
    pad = torch.full((len(rows), width - cut), float("nan"), dtype=theta.dtype)
    mask = torch.arange(width)[None, :] < torch.tensor([LENGTHS[i] for i in rows])[:, None]
    return torch.cat([theta[rows, :cut], pad], 1), torch.cat([advantages[rows, :cut], pad], 1), mask


@pytest.mark.parametrize("mode", list(LOSS_AGG_MODES))
def test_gradient_is_independent_of_the_micro_batch_split(mode):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64, requires_grad=True)
    advantages = torch.randn(len(LENGTHS), WIDTH, generator=gen, dtype=torch.float64)
    mask = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    whole = aggregate_loss(per_token_loss(theta, advantages), mask, mode, max_len=MAX_LEN)
    (whole_grad,) = torch.autograd.grad(whole, theta)

    # The trainer's way: sum the step's counts over micro-batches (and processes) first.
    counts = [loss_counts(micro_batch(theta, advantages, rows, extra)[2]) for rows, extra in MICRO_BATCHES]
    num_tokens, num_seqs = (sum(c) for c in zip(*counts))
    total = 0.0
    for rows, extra in MICRO_BATCHES:
        theta_mb, advantages_mb, mask_mb = micro_batch(theta, advantages, rows, extra)
        total = total + aggregate_loss(
            per_token_loss(theta_mb, advantages_mb), mask_mb, mode,
            num_tokens=num_tokens, num_seqs=num_seqs, max_len=MAX_LEN,
        )
    (split_grad,) = torch.autograd.grad(total, theta)
    assert math.isclose(total.item(), whole.item(), rel_tol=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-6, rtol=0)
    assert whole_grad.abs().sum() > 0
