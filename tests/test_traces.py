"""Multi-step targets of algorithms/common/traces.py and the RBIS loss of algorithms/offpolicy/dqn_rbis.py (P179),
each on a batch computed by hand."""

import math

import pytest
import torch

from algorithms.common.traces import (
    discounted_window_sum,
    epsilon_greedy_probs,
    nstep_target,
    trace_coefficients,
    trace_target,
)
from algorithms.offpolicy.dqn_rbis import rbis_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

ALL = torch.tensor([[True, True, True, True]])


def test_rbis_recovers_a_cut_trace_that_retrace_keeps():
    # rho_0 is never used; lambda = 0.5. rho = [_, 0.1, 10, 1]
    rho = torch.tensor([[7.0, 0.1, 10.0, 1.0]])
    # RBIS: beta_1 = min(0.5, 0.1 * 1) = 0.1; beta_2 = min(0.25, 10 * 0.1) = 0.25 (recovered to the lambda bound);
    #       beta_3 = min(0.125, 1 * 0.25) = 0.125
    torch.testing.assert_close(trace_coefficients(rho, ALL, 0.5, "rbis"), torch.tensor([[1.0, 0.1, 0.25, 0.125]]))
    # Retrace: 0.5 * min(1, 0.1) = 0.05; 0.5 * 1 * 0.05 = 0.025; 0.5 * 1 * 0.025 = 0.0125
    torch.testing.assert_close(trace_coefficients(rho, ALL, 0.5, "retrace"),
                               torch.tensor([[1.0, 0.05, 0.025, 0.0125]]))
    # Truncated IS: lambda^t min(1, prod rho): 0.5 * 0.1 = 0.05; 0.25 * min(1, 1.0) = 0.25; 0.125 * 1 = 0.125
    torch.testing.assert_close(trace_coefficients(rho, ALL, 0.5, "truncated_is"),
                               torch.tensor([[1.0, 0.05, 0.25, 0.125]]))


def test_rbis_differs_from_truncated_is_and_padding_is_zero():
    rho = torch.tensor([[1.0, 2.0, 0.25, 1.5]])
    # RBIS: min(0.5, 2) = 0.5; min(0.25, 0.125) = 0.125; min(0.125, 0.1875) = 0.125
    torch.testing.assert_close(trace_coefficients(rho, ALL, 0.5), torch.tensor([[1.0, 0.5, 0.125, 0.125]]))
    # Truncated IS: products 2, 0.5, 0.75 -> 0.5 * 1, 0.25 * 0.5, 0.125 * 0.75 = 0.5, 0.125, 0.09375
    torch.testing.assert_close(trace_coefficients(rho, ALL, 0.5, "truncated_is"),
                               torch.tensor([[1.0, 0.5, 0.125, 0.09375]]))
    mask = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(trace_coefficients(rho, mask, 0.5), torch.tensor([[1.0, 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="trace kind"):
        trace_coefficients(rho, ALL, 0.5, "tree_backup")


def test_trace_target_and_window_sums():
    deltas = torch.tensor([[1.0, 2.0, -1.0, 4.0]])
    betas = torch.tensor([[1.0, 0.5, 0.125, 0.125]])
    # G = 1 + 1 + 0.9 * 0.5 * 2 + 0.81 * 0.125 * (-1) + 0.729 * 0.125 * 4 = 3.16325
    torch.testing.assert_close(trace_target(torch.tensor([1.0]), deltas, betas, ALL, 0.9), torch.tensor([3.16325]))
    total, discount = discounted_window_sum(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, False]]), 0.5)
    torch.testing.assert_close(total, torch.tensor([2.0]))  # 1 + 0.5 * 2; the padded 3 is ignored
    torch.testing.assert_close(discount, torch.tensor([0.25]))
    # n-step target: 2 + 0.25 * 10 when alive, 2 when the second step terminated.
    y = nstep_target(torch.tensor([[1.0, 2.0, 3.0]] * 2), torch.tensor([[False, False, False], [False, True, False]]),
                     torch.tensor([[True, True, False]] * 2), 0.5, torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(y, torch.tensor([4.5, 2.0]))


def test_epsilon_greedy_probs():
    probs = epsilon_greedy_probs(torch.tensor([[1.0, 3.0, 2.0]]), 0.3)
    torch.testing.assert_close(probs, torch.tensor([[0.1, 0.8, 0.1]]))


def test_rbis_loss_by_hand():
    # gamma 0.5, lambda 0.8, greedy target (epsilon 0); mu(a|s) = 0.5 everywhere.
    # Q^-: s0 = [1, 3], s1 = [2, 0], s2 = [5, 1]  -> greedy 1, 0, 0; E_pi Q^-(s1) = 2, E_pi Q^-(s2) = 5.
    q_target = torch.tensor([[[1.0, 3.0], [2.0, 0.0], [5.0, 1.0]]] * 3)
    actions = torch.tensor([[1, 1], [1, 0], [1, 0]])
    rewards = torch.tensor([[1.0, 2.0]] * 3)
    terminateds = torch.tensor([[False, False], [False, False], [True, False]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    logp = torch.full((3, 2), math.log(0.5))
    q_first = torch.tensor([[0.0, 2.5]] * 3, requires_grad=True)
    out = rbis_loss(q_first, actions, rewards, terminateds, mask, logp, q_target, gamma=0.5, lambda_=0.8,
                    target_epsilon=0.0)
    # delta_0 = 1 + 0.5 * 2 - Q^-(s0, 1) = -1 for windows 0 and 1.
    # Window 0: a_1 = 1 is not greedy in s1: rho_1 = 0 -> beta_1 = 0, G = 3 - 1 = 2.
    # Window 1: a_1 = 0 greedy: rho_1 = 1 / 0.5 = 2 -> beta_1 = min(0.8, 2) = 0.8;
    #           delta_1 = 2 + 0.5 * 5 - Q^-(s1, 0) = 2.5; G = 3 - 1 + 0.5 * 0.8 * 2.5 = 3.
    # Window 2: terminated after step 0: delta_0 = 1 - 3 = -2, G = 1.
    torch.testing.assert_close(out["target"], torch.tensor([2.0, 3.0, 1.0]))
    torch.testing.assert_close(out["betas"], torch.tensor([[1.0, 0.0], [1.0, 0.8], [1.0, 0.0]]))
    # td = 2.5 - G = [0.5, -0.5, 1.5]; Huber_1 = [0.125, 0.125, 1.0]; mean 0.41666...
    torch.testing.assert_close(out["td_error"], torch.tensor([0.5, -0.5, 1.5]))
    torch.testing.assert_close(out["loss"], torch.tensor(1.25 / 3))
    out["loss"].backward()
    # Only Q(s_0, a_0) gets gradient: clip(td, -1, 1) / 3.
    torch.testing.assert_close(q_first.grad, torch.tensor([[0.0, 0.5 / 3], [0.0, -0.5 / 3], [0.0, 1.0 / 3]]))
    weighted = rbis_loss(q_first, actions, rewards, terminateds, mask, logp, q_target, 0.5, 0.8, 0.0,
                         weights=torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(weighted["loss"], torch.tensor((0.125 + 0.0625) / 3))


def test_rbis_with_lambda_zero_is_one_step_expected_sarsa():
    q_target = torch.tensor([[[1.0, 3.0], [2.0, 0.0], [5.0, 1.0]]])
    out = rbis_loss(torch.zeros(1, 2), torch.tensor([[1, 0]]), torch.tensor([[1.0, 2.0]]),
                    torch.tensor([[False, False]]), torch.tensor([[True, True]]), torch.zeros(1, 2), q_target,
                    gamma=0.5, lambda_=0.0, target_epsilon=0.2)
    # pi(s1) = [0.9, 0.1]: E_pi Q^-(s1) = 1.8 + 0 = 1.8; G = r_0 + 0.5 * 1.8 = 1.9
    torch.testing.assert_close(out["target"], torch.tensor([1.9]))


def test_rbis_options_are_checked():
    rule = get_rule("dqn_rbis")
    with pytest.raises(UserError, match="trace_lambda"):
        build_config(rule, "CartPole-v1", 0, {"trace_lambda": "1.5"})
    with pytest.raises(UserError, match="trace"):
        build_config(rule, "CartPole-v1", 0, {"trace": "tree_backup"})
    config, _ = build_config(rule, "CartPole-v1", 0, {"trace_length": "5"})
    assert config.sequence_length() == 5 and config.record_behaviour_logp
