"""DQN's loss (algorithms/offpolicy/dqn.py) on a hand-computed batch, double-DQN target included."""

import pytest
import torch

from algorithms.common.td_targets import huber, q_learning_target
from algorithms.offpolicy.dqn import dqn_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

# Two transitions, two actions, gamma = 0.9.
Q = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
ACTIONS = torch.tensor([1, 0])                 # Q(s, a) = [2.0, 0.5]
REWARDS = torch.tensor([1.0, -1.0])
TERMINATEDS = torch.tensor([False, True])      # the second transition ends the episode: no bootstrap
NEXT_Q_TARGET = torch.tensor([[3.0, 1.0], [10.0, 10.0]])
NEXT_Q_ONLINE = torch.tensor([[0.0, 5.0], [7.0, 0.0]])  # the online net prefers a' = 1 in s'_0


def test_dqn_target_and_huber_loss():
    q = Q.clone().requires_grad_(True)
    out = dqn_loss(q, ACTIONS, REWARDS, TERMINATEDS, NEXT_Q_TARGET, gamma=0.9)
    # y_0 = 1 + 0.9 * max(3, 1) = 3.7;  y_1 = -1 (terminated)
    torch.testing.assert_close(out["target"], torch.tensor([3.7, -1.0]))
    # td = [2 - 3.7, 0.5 + 1] = [-1.7, 1.5]; Huber_1: |td| - 0.5 = [1.2, 1.0]; mean 1.1
    torch.testing.assert_close(out["td_error"], torch.tensor([-1.7, 1.5]))
    torch.testing.assert_close(out["loss"], torch.tensor(1.1))
    out["loss"].backward()
    # Error clipping: d loss / d Q(s, a) = clip(td, -1, 1) / B = [-0.5, 0.5]; the other actions get nothing.
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, -0.5], [0.5, 0.0]]))


def test_double_dqn_target_uses_online_argmax_and_target_value():
    out = dqn_loss(Q, ACTIONS, REWARDS, TERMINATEDS, NEXT_Q_TARGET, gamma=0.9, next_q_online=NEXT_Q_ONLINE)
    # argmax_a' Q_online(s'_0, a') = 1, evaluated by the target net: 1.0 -> y_0 = 1 + 0.9 * 1 = 1.9
    torch.testing.assert_close(out["target"], torch.tensor([1.9, -1.0]))
    # td = [0.1, 1.5]; Huber: 0.5 * 0.01 = 0.005 and 1.0; mean 0.5025
    torch.testing.assert_close(out["loss"], torch.tensor(0.5025))


def test_target_carries_no_gradient_and_truncation_bootstraps():
    next_q = NEXT_Q_TARGET.clone().requires_grad_(True)
    target = q_learning_target(REWARDS, torch.tensor([False, False]), 0.9, next_q)
    assert not target.requires_grad
    # Not terminated (e.g. time-limit truncation): the second transition bootstraps, -1 + 0.9 * 10 = 8.
    torch.testing.assert_close(target, torch.tensor([3.7, 8.0]))


def test_huber_is_quadratic_inside_and_linear_outside():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.4, 2.0])
    torch.testing.assert_close(huber(x, 1.0), torch.tensor([2.5, 0.125, 0.0, 0.08, 1.5]))
    torch.testing.assert_close(huber(x, 2.0), torch.tensor([4.0, 0.125, 0.0, 0.08, 2.0]))


def test_bad_options_are_refused():
    rule = get_rule("dqn")
    with pytest.raises(UserError, match="samples_per_insert"):
        build_config(rule, "CartPole-v1", 0, {"samples_per_insert": "0"})
    with pytest.raises(UserError, match="learning_starts"):
        build_config(rule, "CartPole-v1", 0, {"learning_starts": "200", "replay_capacity": "100"})
    with pytest.raises(UserError, match="replay_namespace"):
        build_config(rule, "CartPole-v1", 0, {"replay_namespace": "a:b"})
    config, options = build_config(rule, "CartPole-v1", 0, {"double_q": "true"})
    assert options["double_q"] is True and config.double_q is True
