"""SQIRL's targets and loss (P048, algorithms/offpolicy/sqirl.py) on a hand-computed batch."""

import pytest
import torch

from algorithms.offpolicy.sqirl import sqirl_loss, sqirl_targets
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

# Two transitions, k = 3 heads, two actions, gamma = 0.5; the second one terminates.
REWARDS = torch.tensor([1.0, -1.0])
TERMINATEDS = torch.tensor([False, True])
NEXT_HEADS = torch.tensor([
    [[2.0, 4.0], [1.0, 3.0], [10.0, 10.0]],   # Q_3 of s' is never used: no head bootstraps from the last one
    [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],
])
Q_HEADS = torch.tensor([
    [[0.0, 2.0], [0.0, 3.0], [0.0, 1.5]],      # action 1 taken: (Q_1, Q_2, Q_3) = (2, 3, 1.5)
    [[-1.0, 5.0], [0.0, 5.0], [1.0, 5.0]],     # action 0 taken: (-1, 0, 1)
])
ACTIONS = torch.tensor([1, 0])


def test_targets_random_policy_then_greedy_steps():
    targets = sqirl_targets(REWARDS, TERMINATEDS, 0.5, NEXT_HEADS)
    # y_1 = 1 + 0.5 * mean(2, 4) = 2.5   (the random policy's value at s')
    # y_2 = 1 + 0.5 * max(2, 4)  = 3.0   (one greedy step on Q_1)
    # y_3 = 1 + 0.5 * max(1, 3)  = 2.5   (one greedy step on Q_2)
    # terminated: y = r = -1 for every head
    torch.testing.assert_close(targets, torch.tensor([[2.5, 3.0, 2.5], [-1.0, -1.0, -1.0]]))
    assert not targets.requires_grad


def test_loss_by_hand_and_its_gradient():
    q = Q_HEADS.clone().requires_grad_(True)
    out = sqirl_loss(q, ACTIONS, REWARDS, TERMINATEDS, NEXT_HEADS, 0.5)
    # errors: s0 (2 - 2.5, 3 - 3, 1.5 - 2.5) = (-0.5, 0, -1); s1 (-1 + 1, 0 + 1, 1 + 1) = (0, 1, 2)
    # per head mean of squares: (0.25 + 0) / 2 = 0.125, (0 + 1) / 2 = 0.5, (1 + 4) / 2 = 2.5
    torch.testing.assert_close(out["per_head"], torch.tensor([0.125, 0.5, 2.5]))
    # loss = mean over heads = 3.125 / 3
    torch.testing.assert_close(out["loss"], torch.tensor(3.125 / 3))
    out["loss"].backward()
    # d/dQ_j(s, a) = 2 error / (B k) = error / 3; untaken actions get nothing.
    expected = torch.tensor([
        [[0.0, -0.5 / 3], [0.0, 0.0], [0.0, -1.0 / 3]],
        [[0.0, 0.0], [1.0 / 3, 0.0], [2.0 / 3, 0.0]],
    ])
    torch.testing.assert_close(q.grad, expected)


def test_single_head_is_the_random_policy_evaluation():
    # k = 1: only y_1 = r + gamma mean_a' Q_1(s', a') = 1 + 0.5 * 3 = 2.5
    targets = sqirl_targets(REWARDS[:1], TERMINATEDS[:1], 0.5, NEXT_HEADS[:1, :1])
    torch.testing.assert_close(targets, torch.tensor([[2.5]]))


def test_bad_options_are_refused():
    rule = get_rule("sqirl")
    with pytest.raises(UserError, match="planning_depth"):
        build_config(rule, "CartPole-v1", 0, {"planning_depth": "0"})
    config, options = build_config(rule, "CartPole-v1", 0, {"planning_depth": "2"})
    assert options["planning_depth"] == 2 and config.model_config["planning_depth"] == 2
