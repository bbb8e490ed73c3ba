"""P241's evolved DQN losses (algorithms/offpolicy/dqn_evolved.py) on hand-computed batches."""

import pytest
import torch

from algorithms.offpolicy.dqn_evolved import evolved_dqn_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

# Two transitions, two actions, gamma = 0.9 (the same batch as tests/test_dqn.py).
Q = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
ACTIONS = torch.tensor([1, 0])                 # Q(s, a) = [2.0, 0.5]
REWARDS = torch.tensor([1.0, -1.0])
TERMINATEDS = torch.tensor([False, True])
NEXT_Q_TARGET = torch.tensor([[3.0, 1.0], [10.0, 10.0]])


def run(kind, q=Q, **kwargs):
    q = q.clone().requires_grad_(True)
    out = evolved_dqn_loss(q, ACTIONS, REWARDS, TERMINATEDS, NEXT_Q_TARGET, 0.9, kind=kind, **kwargs)
    out["loss"].backward()
    return out, q.grad


def test_dqn_reg():
    out, grad = run("dqn_reg")
    # Y = [1 + 0.9 * 3, -1] = [3.7, -1]; delta = Q - Y = [-1.7, 1.5]
    torch.testing.assert_close(out["target"], torch.tensor([3.7, -1.0]))
    torch.testing.assert_close(out["td_error"], torch.tensor([-1.7, 1.5]))
    # 0.1 Q + delta^2 = [0.2 + 2.89, 0.05 + 2.25] = [3.09, 2.30]; mean 2.695
    torch.testing.assert_close(out["loss"], torch.tensor(2.695))
    # d/dQ = (0.1 + 2 delta) / B = [(0.1 - 3.4) / 2, (0.1 + 3.0) / 2] = [-1.65, 1.55]; the other actions get nothing
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.65], [1.55, 0.0]]))


def test_dqn_reg_weight_zero_is_plain_squared_td():
    out, grad = run("dqn_reg", reg_weight=0.0)
    torch.testing.assert_close(out["loss"], torch.tensor((2.89 + 2.25) / 2))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.7], [1.5, 0.0]]))


def test_dqn_clipped_td_branch():
    out, grad = run("dqn_clipped")
    # sample 0: max(Q=2, delta^2 + Y = 2.89 + 3.7 = 6.59) = 6.59;  max(delta = -1.7, 0.9 * 3^2 = 8.1) = 8.1
    # sample 1: max(0.5, 2.25 - 1 = 1.25) = 1.25;  max(1.5, 0.9 * 0^2 = 0 (terminated)) = 1.5
    # mean(6.59 + 8.1, 1.25 + 1.5) = mean(14.69, 2.75) = 8.72
    torch.testing.assert_close(out["loss"], torch.tensor(8.72))
    # d/dQ: sample 0 from delta^2 only: 2 * -1.7 = -3.4; sample 1: 2 * 1.5 + 1 (delta branch of the 2nd max) = 4
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.7], [2.0, 0.0]]))
    torch.testing.assert_close(out["q_branch_fraction"], torch.tensor(0.0))


def test_dqn_clipped_minimises_an_overestimated_q():
    q = torch.tensor([[1.0, 3.9], [0.5, -1.0]])  # Q(s0, 1) = 3.9 > delta^2 + Y = 0.04 + 3.7
    out, grad = run("dqn_clipped", q=q)
    # sample 0: max(3.9, 3.74) = 3.9 (d/dQ = 1);  max(0.2, 8.1) = 8.1 (constant) -> 12.0
    # sample 1 as above: 2.75; mean 7.375
    torch.testing.assert_close(out["loss"], torch.tensor(7.375))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5], [2.0, 0.0]]))
    torch.testing.assert_close(out["q_branch_fraction"], torch.tensor(0.5))


def test_double_q_target_weights_and_discount_tensor():
    # Double DQN: the online net picks a' = 1 in s'_0, the target net values it at 1.0: Y_0 = 1 + 0.9 = 1.9
    out, _ = run("dqn_reg", next_q_online=torch.tensor([[0.0, 5.0], [7.0, 0.0]]))
    torch.testing.assert_close(out["target"], torch.tensor([1.9, -1.0]))
    # Importance weights [1, 0]: (1 * 3.09 + 0 * 2.30) / 2
    out, _ = run("dqn_reg", weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["loss"], torch.tensor(3.09 / 2))
    # Per-sample discounts (n-step records): Y = [1 + 0.5 * 3, -1] = [2.5, -1]
    out = evolved_dqn_loss(Q, ACTIONS, REWARDS, TERMINATEDS, NEXT_Q_TARGET, torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(out["target"], torch.tensor([2.5, -1.0]))


def test_bad_options_are_refused():
    rule = get_rule("dqn_evolved")
    with pytest.raises(UserError, match="value_loss"):
        build_config(rule, "CartPole-v1", 0, {"value_loss": "huber"})
    with pytest.raises(UserError, match="reg_weight"):
        build_config(rule, "CartPole-v1", 0, {"reg_weight": "-0.1"})
    config, options = build_config(rule, "CartPole-v1", 0, {"value_loss": "dqn_clipped"})
    assert options["value_loss"] == "dqn_clipped" and config.value_loss == "dqn_clipped"
    with pytest.raises(ValueError, match="unknown value_loss"):
        evolved_dqn_loss(Q, ACTIONS, REWARDS, TERMINATEDS, NEXT_Q_TARGET, 0.9, kind="mse")
