"""P157's saddle-point robust Bellman losses (algorithms/common/robust_bellman.py, algorithms/offpolicy/dqn_robust.py)
on hand-computed batches."""

import pytest
import torch

from algorithms.common.robust_bellman import dual_link, robust_bellman_losses
from algorithms.offpolicy.dqn_robust import robust_dqn_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

# Two samples: delta = [2.5, -0.4], g(s, a) = [1.5, -0.2]; the second is terminal; gamma = 0.9, tau = 1.
TD = torch.tensor([2.5, -0.4])
TERMINATEDS = torch.tensor([False, True])


def run(loss="huber", form="correction", weights=None):
    q = torch.tensor([1.0, 2.0], requires_grad=True)
    q_next = torch.tensor([3.0, 4.0], requires_grad=True)
    g = torch.tensor([1.5, -0.2], requires_grad=True)
    out = robust_bellman_losses(q, q_next, TD, g, TERMINATEDS, 0.9, loss, 1.0, form, weights)
    (out["value_loss"] + out["h_loss"]).backward()
    return out, q.grad, q_next.grad, g.grad


def test_dual_link_is_the_conjugate_maximiser():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.4, 2.0])
    torch.testing.assert_close(dual_link(x, "huber", 1.0), torch.tensor([-1.0, -0.5, 0.0, 0.4, 1.0]))
    torch.testing.assert_close(dual_link(x, "absolute"), torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(dual_link(x, "squared"), x)
    with pytest.raises(ValueError, match="bellman_loss"):
        dual_link(x, "cauchy")


def test_huber_correction_form():
    out, dq, dq_next, dg = run()
    # h = clip(g, -1, 1) = [1, -0.2]; psi(delta) = clip(delta) = [1, -0.4]; discount = [0.9, 0]
    torch.testing.assert_close(out["h"], torch.tensor([1.0, -0.2]))
    # value loss = mean(-psi(delta) Q + disc h Q') = mean(-1 + 0.9 * 3, 0.4 * 2) = mean(1.7, 0.8) = 1.25
    torch.testing.assert_close(out["value_loss"], torch.tensor(1.25))
    # h loss = 1/2 mean((2.5 - 1.5)^2, (-0.4 + 0.2)^2) = 1/2 mean(1, 0.04) = 0.26
    torch.testing.assert_close(out["h_loss"], torch.tensor(0.26))
    # Descent on Q(s, a) along +psi(delta) (clipped TD), on Q(s', a') along -gamma h (the correction), on g towards
    # delta; h enters the value loss as a constant, so g's gradient is the regression's alone.
    torch.testing.assert_close(dq, torch.tensor([-0.5, 0.2]))
    torch.testing.assert_close(dq_next, torch.tensor([0.45, 0.0]))
    torch.testing.assert_close(dg, torch.tensor([-0.5, 0.1]))


def test_huber_saddle_form_uses_h_in_both_terms():
    out, dq, dq_next, _ = run(form="saddle")
    # mean(h (-Q + disc Q')) = mean(1 * (-1 + 2.7), -0.2 * (-2 + 0)) = mean(1.7, 0.4) = 1.05
    torch.testing.assert_close(out["value_loss"], torch.tensor(1.05))
    torch.testing.assert_close(dq, torch.tensor([-0.5, 0.1]))
    torch.testing.assert_close(dq_next, torch.tensor([0.45, 0.0]))


def test_absolute_and_squared_losses():
    out, dq, _, _ = run(loss="absolute")
    # h = sign(g) = [1, -1]; psi(delta) = sign(delta) = [1, -1]: mean(-1 + 0.9 * 3, 1 * 2) = mean(1.7, 2) = 1.85
    torch.testing.assert_close(out["value_loss"], torch.tensor(1.85))
    torch.testing.assert_close(dq, torch.tensor([-0.5, 0.5]))
    out, dq, dq_next, _ = run(loss="squared")
    # QC/TDC: h = g = [1.5, -0.2], psi(delta) = delta: mean(-2.5 + 0.9 * 1.5 * 3, 0.4 * 2) = mean(1.55, 0.8) = 1.175
    torch.testing.assert_close(out["value_loss"], torch.tensor(1.175))
    # the semi-gradient TD term -delta / B and the correction gamma h / B
    torch.testing.assert_close(dq, torch.tensor([-1.25, 0.2]))
    torch.testing.assert_close(dq_next, torch.tensor([0.675, 0.0]))


def test_weights_scale_each_sample():
    out, *_ = run(weights=torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out["value_loss"], torch.tensor(2.0 * 1.7 / 2))
    torch.testing.assert_close(out["h_loss"], torch.tensor(2.0 * 0.5 / 2))


def test_robust_dqn_loss_on_q_tables():
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    q_next = torch.tensor([[2.0, 5.0], [1.0, 1.0]], requires_grad=True)
    h = torch.tensor([[0.3, 2.0], [-0.5, 0.1]], requires_grad=True)
    out = robust_dqn_loss(q, q_next, torch.tensor([[3.0, 1.0], [10.0, 10.0]]), h, torch.tensor([1, 0]),
                          torch.tensor([1.0, -1.0]), torch.tensor([False, True]), 0.9)
    # a' = argmax Q_b(s', .) = [0, 0]; target = [1 + 0.9 * 3, -1] = [3.7, -1]; delta = [3.7 - 2, -1 - 0.5] = [1.7, -1.5]
    torch.testing.assert_close(out["td_error"], torch.tensor([1.7, -1.5]))
    # g at the taken actions [2.0, -0.5] -> h = [1, -0.5]; psi(delta) = [1, -1]; online Q(s', a') = [2, 1]
    # value loss = mean(-1 * 2 + 0.9 * 1 * 2, 1 * 0.5 + 0) = mean(-0.2, 0.5) = 0.15
    # h loss = 1/2 mean((1.7 - 2)^2, (-1.5 + 0.5)^2) = 1/2 mean(0.09, 1) = 0.2725
    torch.testing.assert_close(out["value_loss"], torch.tensor(0.15))
    torch.testing.assert_close(out["h_loss"], torch.tensor(0.2725))
    out["loss"].backward()
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, -0.5], [0.5, 0.0]]))
    torch.testing.assert_close(q_next.grad, torch.tensor([[0.45, 0.0], [0.0, 0.0]]))
    # g: (g - delta) / B at the taken actions = [(2 - 1.7) / 2, (-0.5 + 1.5) / 2]
    torch.testing.assert_close(h.grad, torch.tensor([[0.0, 0.15], [0.5, 0.0]]))


def test_bad_options_are_refused():
    rule = get_rule("dqn_robust")
    with pytest.raises(UserError, match="bellman_loss"):
        build_config(rule, "CartPole-v1", 0, {"bellman_loss": "cauchy"})
    with pytest.raises(UserError, match="gradient"):
        build_config(rule, "CartPole-v1", 0, {"gradient": "semi"})
    with pytest.raises(UserError, match="h_reg"):
        build_config(rule, "CartPole-v1", 0, {"h_reg": "-1"})
    config, options = build_config(rule, "CartPole-v1", 0, {"bellman_loss": "absolute"})
    assert options["bellman_loss"] == "absolute" and config.bellman_loss == "absolute"
