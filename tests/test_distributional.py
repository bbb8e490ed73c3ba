"""IQN's quantile embedding and quantile Huber loss (algorithms/common/distributional.py), and the transition
ring, on tiny batches computed by hand."""

import math

import numpy as np
import pytest
import torch

from algorithms.common.distributional import (
    QuantileEmbedding,
    cosine_basis,
    midpoint_taus,
    quantile_huber_loss,
    quantile_td_targets,
)
from algorithms.common.transitions import TransitionRing, segment_transition_rows


def test_cosine_basis_by_hand():
    # cos(pi * i * 0.5) for i = 0, 1, 2 = cos 0, cos(pi/2), cos(pi) = 1, 0, -1
    out = cosine_basis(torch.tensor([[0.5]]), 3)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 0.0, -1.0]), atol=1e-6, rtol=0)


def test_quantile_embedding_is_relu_of_linear_cosines():
    emb = QuantileEmbedding(dim=2, num_cosines=2)
    with torch.no_grad():
        emb.linear.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
        emb.linear.bias.copy_(torch.tensor([0.0, -1.0]))
    # tau = 0 -> cosines [1, 1]: [1 + 1 + 0, -1 + 2 - 1] = [2, 0]; tau = 1 -> [1, -1]: [0, -1 - 2 - 1 = -4 -> 0]
    out = emb(torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out[0], torch.tensor([[2.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_midpoint_taus():
    torch.testing.assert_close(midpoint_taus(4, 2), torch.tensor([[0.125, 0.375, 0.625, 0.875]] * 2))


def test_quantile_td_targets_by_hand():
    # y = r + gamma (1 - d) Z': row 0: 1 + 0.9 * [1, 2] = [1.9, 2.8]; row 1 terminated: [2, 2]
    y = quantile_td_targets(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), 0.9,
                            torch.tensor([[1.0, 2.0], [5.0, 5.0]]))
    torch.testing.assert_close(y, torch.tensor([[1.9, 2.8], [2.0, 2.0]]))


QUANTILES = torch.tensor([[0.0, 1.0]])
TAUS = torch.tensor([[0.25, 0.75]])
TARGETS = torch.tensor([[0.5, 2.0]])


def test_quantile_huber_loss_kappa_1_by_hand():
    # delta_ij = y_j - Z_i.
    # i=0 (Z=0, tau=.25): delta = .5, 2 -> Huber .125, 2 - .5 = 1.5; weight |.25 - 0| = .25 -> .03125, .375; mean .203125
    # i=1 (Z=1, tau=.75): delta = -.5, 1 -> Huber .125, .5; weights |.75 - 1| = .25, .75 -> .03125, .375; mean .203125
    # sum over i: .40625
    loss = quantile_huber_loss(QUANTILES, TAUS, TARGETS, kappa=1.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.40625)


def test_quantile_huber_loss_kappa_0_is_quantile_regression():
    # i=0: |delta| = .5, 2 times .25 -> .125, .5; mean .3125.  i=1: .5 * .25 = .125, 1 * .75 = .75; mean .4375
    assert quantile_huber_loss(QUANTILES, TAUS, TARGETS, kappa=0.0).item() == pytest.approx(0.75)


def test_quantile_huber_loss_kappa_2_by_hand():
    # Huber/kappa: i=0: delta .5 -> .125/2 = .0625; delta 2 (|2| <= 2) -> 2/2 = 1; times .25 -> .015625, .25; mean .1328125
    #              i=1: delta -.5 -> .0625 * .25 = .015625; delta 1 -> .5/2 = .25 * .75 = .1875; mean .1015625
    assert quantile_huber_loss(QUANTILES, TAUS, TARGETS, kappa=2.0).item() == pytest.approx(0.234375)


def test_quantile_loss_gradient_pushes_quantiles_towards_their_fraction():
    # Targets 0..4: the tau = 0.5 quantile (the median) is 2. Below it the loss falls as Z rises, above it rises.
    targets = torch.arange(5.0).view(1, 5)
    taus = torch.tensor([[0.5]])
    for z, sign in ((0.5, -1.0), (3.5, 1.0)):
        q = torch.tensor([[z]], requires_grad=True)
        quantile_huber_loss(q, taus, targets, kappa=0.0).sum().backward()
        assert math.copysign(1.0, q.grad.item()) == sign
    losses = [quantile_huber_loss(torch.tensor([[z]]), taus, targets, kappa=0.0).item() for z in (1.5, 2.0, 2.5)]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_quantile_loss_does_not_differentiate_through_targets():
    targets = torch.tensor([[1.0, 2.0]], requires_grad=True)
    quantile_huber_loss(torch.zeros(1, 2, requires_grad=True), TAUS, targets).sum().backward()
    assert targets.grad is None


def test_negative_kappa_is_rejected():
    with pytest.raises(ValueError, match="kappa"):
        quantile_huber_loss(QUANTILES, TAUS, TARGETS, kappa=-1.0)


def test_segment_transition_rows():
    # Chunks of 3 (2 real + phantom), 2 (1 real + phantom) and 1 (phantom only) rows.
    rows, next_rows = segment_transition_rows([3, 2, 1])
    np.testing.assert_array_equal(rows, [0, 1, 3])
    np.testing.assert_array_equal(next_rows, [1, 2, 4])


def test_transition_ring_keeps_the_newest_rows():
    ring = TransitionRing(capacity=3)
    ring.add({"x": np.array([1, 2])})
    ring.add({"x": np.array([3, 4])})  # 4 overwrites 1
    assert len(ring) == 3
    assert sorted(ring._columns["x"].tolist()) == [2, 3, 4]
    ring.add({"x": np.arange(10, 15)})  # more than the capacity: the last 3 survive
    assert sorted(ring._columns["x"].tolist()) == [12, 13, 14]
    sample = ring.sample(50)
    assert set(sample["x"].tolist()) <= {12, 13, 14}
    with pytest.raises(ValueError, match="columns"):
        ring.add({"y": np.array([1])})
