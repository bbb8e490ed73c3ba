"""PPO's clipped surrogate (P147 eq. 7/9) and the value losses on batches computed by hand."""

import pytest
import torch

from algorithms.common.losses import clipped_surrogate, masked_mean, value_loss
from algorithms.onpolicy.ppo import ppo_loss


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([0.5, 1.1, 1.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    # eps = 0.2:  r=0.5,A=1  -> min(0.5, 0.8) = 0.5    (pessimistic: unclipped is lower)
    #             r=1.1,A=1  -> 1.1                    (inside the range)
    #             r=1.5,A=1  -> min(1.5, 1.2) = 1.2    (clipped)
    #             r=1.5,A=-1 -> min(-1.5, -1.2) = -1.5 (unclipped is lower)
    #             r=0.5,A=-1 -> min(-0.5, -0.8) = -0.8 (clipped)
    out = clipped_surrogate(ratio, adv, 0.2)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.1, 1.2, -1.5, -0.8]))


def test_ppo_total_loss_by_hand():
    logp = torch.log(torch.tensor([0.6, 0.3]))
    old_logp = torch.log(torch.tensor([0.5, 0.5]))  # ratios 1.2 and 0.6
    adv = torch.tensor([2.0, -1.0])
    values, targets = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0])
    entropy = torch.tensor([0.5, 0.7])
    terms = ppo_loss(logp, old_logp, adv, values, targets, entropy, clip_eps=0.1, vf_coeff=0.5, entropy_coeff=0.01)
    # surrogate: r=1.2,A=2 -> min(2.4, 1.1*2=2.2) = 2.2 ; r=0.6,A=-1 -> min(-0.6, -0.9) = -0.9
    # vf: (1-2)^2 = 1, (0-2)^2 = 4
    # per-sample loss: -2.2 + 0.5*1 - 0.005 = -1.705 ; 0.9 + 0.5*4 - 0.007 = 2.893 ; mean = 0.594
    assert terms["total_loss"].item() == pytest.approx(0.594)
    assert terms["policy_loss"].item() == pytest.approx(-(2.2 - 0.9) / 2)
    assert terms["vf_loss"].item() == pytest.approx(2.5)
    assert terms["clip_fraction"].item() == pytest.approx(1.0)  # |1.2-1| and |0.6-1| both exceed 0.1


def test_ppo_loss_respects_the_loss_mask():
    logp = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, 100.0])
    zeros = torch.zeros(3)
    mask = torch.tensor([True, True, False])  # the third row is a phantom bootstrap row
    terms = ppo_loss(logp, logp, adv, zeros, zeros, zeros, clip_eps=0.2, vf_coeff=0.5, entropy_coeff=0.0, mask=mask)
    assert terms["policy_loss"].item() == pytest.approx(-1.0)


def test_value_loss_clipping_by_hand():
    values, old, targets = torch.tensor([3.0, 1.2]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    # row 0: unclipped (3-3)^2 = 0; clipped V = 1 + 0.5 = 1.5 -> (1.5-3)^2 = 2.25; max = 2.25
    # row 1: unclipped (1.2-3)^2 = 3.24; clipped V = 1.2 -> 3.24; max = 3.24
    torch.testing.assert_close(value_loss(values, targets, old, clip=0.5), torch.tensor([2.25, 3.24]))
    torch.testing.assert_close(value_loss(values, targets), torch.tensor([0.0, 3.24]))


def test_masked_mean():
    x = torch.tensor([1.0, 2.0, 30.0])
    assert masked_mean(x, torch.tensor([True, True, False])).item() == 1.5
    assert masked_mean(x, None).item() == 11.0

