"""Orchestrated value mapping (P233, algorithms/offpolicy/dqn_value_mapping.py) on hand-computed numbers."""

import math

import pytest
import torch

from algorithms.common.value_mapping import decompose_reward, forward_map, inverse_map, orchestrate
from algorithms.offpolicy.dqn_value_mapping import value_mapping_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError


def test_loglin_map_and_its_inverse():
    x = torch.tensor([0.25, 1.0, 3.0])
    # c = 0.5, d = 0: break point x0 = 1. f(0.25) = 0.5 ln 0.25 = -0.693147; f(1) = 0; f(3) = 0.5 * 3 - 0.5 = 1
    y = forward_map(x, "loglin", 0.5, 0.0)
    torch.testing.assert_close(y, torch.tensor([-0.693147, 0.0, 1.0]))
    torch.testing.assert_close(inverse_map(y, "loglin", 0.5, 0.0), x)
    # d = 1: x0 = e^-2 = 0.135335. f(1) = 0.5 e^2 * 1 - 0.5 = 3.194528 (linear); f(0.05) = 0.5 ln 0.05 + 1 = -0.497866
    y = forward_map(torch.tensor([1.0, 0.05]), "loglin", 0.5, 1.0)
    torch.testing.assert_close(y, torch.tensor([3.194528, -0.497866]))
    torch.testing.assert_close(inverse_map(y, "loglin", 0.5, 1.0), torch.tensor([1.0, 0.05]))
    # log: 0.5 ln 4 = 0.693147; identity leaves values alone
    torch.testing.assert_close(forward_map(torch.tensor([4.0]), "log", 0.5, 0.0), torch.tensor([0.693147]))
    torch.testing.assert_close(inverse_map(torch.tensor([7.0]), "identity"), torch.tensor([7.0]))


def test_polar_decomposition_and_orchestration():
    # r = 2 -> (min(1, 2), 0) = (1, 0);  r = -0.5 -> (0, 0.5);  r = 0 -> (0, 0)
    torch.testing.assert_close(decompose_reward(torch.tensor([2.0, -0.5, 0.0]), "polar"),
                               torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]))
    # identity map: Q = 1 * Q_1 - 1 * Q_2 = [3 - 1, 5 - 4] = [2, 1]
    channels, q = orchestrate(torch.tensor([[[3.0, 5.0], [1.0, 4.0]]]), (1.0, -1.0), "identity")
    torch.testing.assert_close(q, torch.tensor([[2.0, 1.0]]))


# One transition, 2 channels x 2 actions, gamma = 0.5 (values clipped to [0, 1 / (1 - 0.5)] = [0, 2]).
Q_TILDE = torch.tensor([[[0.0, 0.25], [-1.0, -2.0]]])       # taken action 0: Q~ = (0, -1)
NEXT_CHANNELS = torch.tensor([[[1.0, 1.5], [0.2, 1.0]]])   # combined 1 * ch1 - 1 * ch2 = [0.8, 0.5]: a' = 0


def loss(beta_reg=1.0, terminated=False, q_tilde=Q_TILDE):
    return value_mapping_loss(q_tilde, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([terminated]),
                              NEXT_CHANNELS, gamma=0.5, beta_reg=beta_reg)


def test_mapped_td_loss_by_hand():
    out = loss()
    # a' = argmax [0.8, 0.5] = 0 (not argmax of channel 1 alone, which is action 1).
    # r = 1 -> channel rewards (1, 0);  U = (1 + 0.5 * 1.0, 0 + 0.5 * 0.2) = (1.5, 0.1)
    torch.testing.assert_close(out["bootstrap"], torch.tensor([[1.5, 0.1]]))
    # beta_reg = 1: U~ = f(U) = (0.5 * 1.5 - 0.5, 0.5 ln 0.1) = (0.25, -1.151293)
    torch.testing.assert_close(out["target_tilde"], torch.tensor([[0.25, -1.151293]]))
    # td = (0 - 0.25, -1 + 1.151293) = (-0.25, 0.151293); Huber: 0.03125 + 0.011445 = 0.042695 (sum of channels)
    torch.testing.assert_close(out["loss"], torch.tensor(0.042695), atol=1e-6, rtol=1e-5)


def test_beta_reg_averages_in_the_regular_space():
    out = loss(beta_reg=0.5)
    # q = f^-1(Q~(s, a)) = (exp(0 / 0.5), exp(-1 / 0.5)) = (1, 0.135335)
    torch.testing.assert_close(out["q_taken"], torch.tensor([[1.0, 0.135335]]))
    # q + 0.5 (U - q) = (1.25, 0.117668);  U~ = (0.5 * 1.25 - 0.5, 0.5 ln 0.117668) = (0.125, -1.069946)
    torch.testing.assert_close(out["target_tilde"], torch.tensor([[0.125, -1.069946]]))


def test_terminal_target_is_clipped_at_eps_before_the_log():
    out = loss(terminated=True)
    # No bootstrap: U = (1, 0). Channel 2: max(eps, 0) = 0.01687 -> 0.5 ln 0.01687 = -2.041109; channel 1: f(1) = 0
    torch.testing.assert_close(out["target_tilde"], torch.tensor([[0.0, -2.041109]]))


def test_gradient_reaches_only_the_taken_action():
    q_tilde = Q_TILDE.clone().requires_grad_(True)
    loss(q_tilde=q_tilde)["loss"].backward()
    # d Huber / d Q~ = td (inside the unit band) for action 0; action 1 gets nothing.
    torch.testing.assert_close(q_tilde.grad, torch.tensor([[[-0.25, 0.0], [0.151293, 0.0]]]))


def test_bad_options_are_refused():
    rule = get_rule("dqn_value_mapping")
    with pytest.raises(UserError, match="beta_reg"):
        build_config(rule, "CartPole-v1", 0, {"beta_reg": "0"})
    with pytest.raises(UserError, match="value_mapping"):
        build_config(rule, "CartPole-v1", 0, {"value_mapping": "sqrt"})
    with pytest.raises(UserError, match="gamma"):
        build_config(rule, "CartPole-v1", 0, {"gamma": "1"})
    config, options = build_config(rule, "CartPole-v1", 0, {"beta_reg": "0.1"})
    assert math.isclose(config.beta_reg, 0.1) and options["value_mapping"] == "loglin"
