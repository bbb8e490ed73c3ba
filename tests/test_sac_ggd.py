"""Generalized Gaussian TD-error loss (P256, algorithms/offpolicy/sac_ggd.py) on hand-computed numbers."""

import math

import pytest
import torch

from algorithms.common.generalized_gaussian import ggd_nll, ggd_variance, risk_averse_weights
from algorithms.offpolicy.sac_ggd import GGDCriticHead, sac_ggd_critic_losses
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

HALF_LOG_PI = 0.5 * math.log(math.pi)  # log Gamma(1/2) = log sqrt(pi) = 0.572365


def test_nll_reduces_to_gaussian_and_laplace():
    # beta = 2, alpha = 1, delta = 1: 1 + log 1 - log 2 + log Gamma(0.5) + log 2 = 1 + 0.572365 = 1.572365
    # (= the Gaussian NLL with variance 1/2: 1^2 / (2 * 0.5) + 0.5 log(2 pi 0.5))
    nll = ggd_nll(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0]))
    torch.testing.assert_close(nll, torch.tensor([1.0 + HALF_LOG_PI]))
    # beta = 1, alpha = 2, delta = -2: |-2| / 2 + log 2 - log 1 + log Gamma(1) + log 2 = 1 + 2 log 2 = 2.386294
    # (= the Laplace NLL |delta| / b + log(2 b) with b = 2)
    nll = ggd_nll(torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([1.0]))
    torch.testing.assert_close(nll, torch.tensor([1.0 + 2 * math.log(2.0)]))


def test_variance_falls_with_shape():
    # alpha^2 Gamma(3/beta) / Gamma(1/beta): beta = 2 -> Gamma(1.5) / Gamma(0.5) = 0.5; beta = 1, alpha = 2 -> 4 * 2 = 8
    var = ggd_variance(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([2.0, 1.0, 4.0]))
    # beta = 4: Gamma(0.75) / Gamma(0.25) = 1.225417 / 3.625610 = 0.337989
    torch.testing.assert_close(var, torch.tensor([0.5, 8.0, 0.337989]))


def test_risk_averse_weights_follow_shape_without_gradient():
    shapes = torch.tensor([[1.0, 2.0], [3.0, 2.0]], requires_grad=True)  # [2 critics, B = 2]
    w = risk_averse_weights(shapes, dim=0)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    assert not w.requires_grad


def test_critic_losses_by_hand():
    q = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)    # [2 critics, B = 2]
    target = torch.tensor([1.0, 3.0])
    scale = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    shape = torch.tensor([[2.0, 1.0], [2.0, 3.0]])
    out = sac_ggd_critic_losses(q, target, scale, shape)
    # critic 1: s0 delta 1, alpha 1, beta 2 -> 1.572365 (above), weight 2 / (2 + 2) = 0.5
    #           s1 delta 2, alpha 2, beta 1 -> 2.386294 (above), weight 1 / (1 + 3) = 0.25
    #           J_1 = (0.5 * 1.572365 + 0.25 * 2.386294) / 2 = (0.786183 + 0.596574) / 2 = 0.691378
    # critic 2: s0 delta 0 -> (1e-8)^2 + 0 - log 2 + 0.572365 + log 2 = 0.572365, weight 0.5
    #           s1 delta 2, alpha 2, beta 3 -> 1 + log 2 - log 3 + log Gamma(1/3) + log 2
    #              = 1 + 0.693147 - 1.098612 + 0.985420 + 0.693147 = 2.273102, weight 0.75
    #           J_2 = (0.5 * 0.572365 + 0.75 * 2.273102) / 2 = (0.286183 + 1.704827) / 2 = 0.995505
    torch.testing.assert_close(out["critic_losses"], torch.tensor([0.691378, 0.995505]), atol=1e-5, rtol=1e-5)
    out["critic_losses"].sum().backward()
    # d J_1 / d Q_1(s0) = w / B * d/dQ (q - y)^2 = 0.5 / 2 * 2 (0 - 1) = -0.5
    # d J_1 / d Q_1(s1) = 0.25 / 2 * d/dQ |y - q| / 2 = 0.125 * (-1 / 2) = -0.0625
    torch.testing.assert_close(q.grad[0], torch.tensor([-0.5, -0.0625]))


def test_unweighted_is_the_plain_mean_nll():
    q, target = torch.tensor([[0.0]]), torch.tensor([1.0])
    out = sac_ggd_critic_losses(q, target, torch.tensor([[1.0]]), torch.tensor([[2.0]]), weighted=False)
    torch.testing.assert_close(out["critic_losses"], torch.tensor([1.0 + HALF_LOG_PI]))


def test_ggd_head_starts_gaussian_with_unit_scale():
    head = GGDCriticHead(torch.nn.Linear(4, 1), latent_dim=4)
    scale, shape = head.scale_shape(torch.zeros(3, 4))
    torch.testing.assert_close(scale, torch.ones(3))
    torch.testing.assert_close(shape, torch.full((3,), 2.0))
    assert head(torch.zeros(3, 4)).shape == (3, 1)  # SAC's paths see Q only


def test_bad_options_are_refused():
    rule = get_rule("sac_ggd")
    with pytest.raises(UserError, match="samples_per_insert"):
        build_config(rule, "Pendulum-v1", 0, {"samples_per_insert": "0"})
    config, options = build_config(rule, "Pendulum-v1", 0, {"risk_averse_weighting": "false"})
    assert options["risk_averse_weighting"] is False
