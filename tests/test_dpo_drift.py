"""Discovered Policy Optimisation (P161): the drift and the loss on batches computed by hand."""

import math

import pytest
import torch

from algorithms.onpolicy.dpo_drift import dpo_drift, dpo_drift_loss
from algorithms.registry import build_config, get_rule


def test_drift_by_hand():
    ratio = torch.tensor([1.5, 1.1, 0.5, 0.8, 1.0, 2.0, 0.5])
    adv = torch.tensor([2.0, 1.0, -1.0, -2.0, 3.0, -1.0, 1.0])
    # alpha = 2 (A >= 0), beta = 0.6 (A < 0)
    # r=1.5, A=2:  x = 0.5*2 = 1      -> 1 - 2 tanh(0.5) = 1 - 0.924234 = 0.075766
    # r=1.1, A=1:  x = 0.1            -> 0.1 - 2 tanh(0.05) = 0.1 - 0.099917 = 0.0000833
    # r=0.5, A=-1: x = -ln 0.5 = 0.693147 -> 0.693147 - 0.6 tanh(1.155245) = 0.693147 - 0.491691 = 0.201457
    # r=0.8, A=-2: x = -2 ln 0.8 = 0.446287 -> 0.446287 - 0.6 tanh(0.743812) = 0.446287 - 0.378866 = 0.067422
    # r=1,   A=3:  x = 0                -> 0
    # r=2,   A=-1: x = -ln 2 < 0        -> x - 0.6 tanh(x/0.6) < 0 -> ReLU -> 0 (moving against A is not penalised)
    # r=0.5, A=1:  x = -0.5 < 0         -> 0
    expected = torch.tensor([0.0757657, 0.0000833, 0.2014566, 0.0674215, 0.0, 0.0, 0.0])
    torch.testing.assert_close(dpo_drift(ratio, adv, 2.0, 0.6), expected, atol=1e-6, rtol=0)


def test_drift_is_nonnegative_flat_at_one_and_has_zero_slope_there():
    ratio = torch.linspace(0.2, 3.0, 57)
    for a in (-2.0, -0.3, 0.0, 0.4, 3.0):
        adv = torch.full_like(ratio, a)
        drift = dpo_drift(ratio, adv, 2.0, 0.6)
        assert bool((drift >= 0).all())
    r = torch.ones(4, requires_grad=True)
    adv = torch.tensor([2.0, -2.0, 0.5, -0.5])
    drift = dpo_drift(r, adv, 2.0, 0.6)
    (grad,) = torch.autograd.grad(drift.sum(), r)
    assert drift.abs().max().item() == 0.0 and grad.abs().max().item() == 0.0  # first step = policy gradient


def test_dpo_total_loss_by_hand():
    logp = torch.log(torch.tensor([0.75, 0.25]))
    old_logp = torch.log(torch.tensor([0.5, 0.5]))  # ratios 1.5 and 0.5
    adv = torch.tensor([2.0, -1.0])
    values, targets = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0])
    entropy = torch.tensor([0.5, 0.7])
    terms = dpo_drift_loss(logp, old_logp, adv, values, targets, entropy, alpha=2.0, beta=0.6, vf_coeff=0.5,
                           entropy_coeff=0.01)
    # objective: 1.5*2 - 0.075766 = 2.924234 ; 0.5*(-1) - 0.201457 = -0.701457
    # vf: (1-2)^2 = 1, (0-2)^2 = 4
    # per-sample loss: -2.924234 + 0.5 - 0.005 = -2.429234 ; 0.701457 + 2 - 0.007 = 2.694457 ; mean = 0.132611
    drift_pos = 1 - 2 * math.tanh(0.5)
    drift_neg = math.log(2) - 0.6 * math.tanh(math.log(2) / 0.6)
    assert terms["drift"].item() == pytest.approx((drift_pos + drift_neg) / 2, rel=1e-5)
    assert terms["policy_loss"].item() == pytest.approx(-((3 - drift_pos) + (-0.5 - drift_neg)) / 2, rel=1e-5)
    assert terms["vf_loss"].item() == pytest.approx(2.5)
    assert terms["total_loss"].item() == pytest.approx(0.132611, abs=1e-5)


def test_loss_mask_drops_phantom_rows():
    logp = torch.zeros(3)
    adv = torch.tensor([1.0, 3.0, 100.0])
    zeros = torch.zeros(3)
    mask = torch.tensor([True, True, False])
    terms = dpo_drift_loss(logp, logp, adv, zeros, zeros, zeros, alpha=2.0, beta=0.6, vf_coeff=0.5,
                           entropy_coeff=0.0, mask=mask)
    assert terms["policy_loss"].item() == pytest.approx(-2.0)  # r = 1: drift 0, objective mean(1, 3)


def test_bad_drift_constants_are_rejected():
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="drift_alpha"):
        build_config(get_rule("dpo_drift"), "CartPole-v1", 0, {"drift_alpha": "0"})
    assert "clip_param" not in get_rule("dpo_drift").option_names()  # no clipping in DPO
