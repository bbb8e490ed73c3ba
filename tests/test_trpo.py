"""TRPO's step (P145 Appendix C) on tiny problems solved by hand: CG solution, step length, KL after the step."""

import math

import numpy as np
import pytest
import torch

from algorithms.common.conjugate_gradient import backtracking_line_search, conjugate_gradient
from algorithms.common.divergences import kl_categorical, kl_diag_gaussian
from algorithms.onpolicy.trpo import trust_region_step


def test_conjugate_gradient_solves_spd_system():
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    # By hand: det = 11, x = [[3,-1],[-1,4]] b / 11 = [1/11, 7/11]
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))


def _softmax_problem(advantages):
    """One state, 3 actions, logits theta (theta_old = 0 -> uniform policy)."""
    theta = torch.zeros(3, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 0])
    adv = torch.tensor(advantages)
    old_logits = torch.zeros(3)
    old_logp = torch.log_softmax(old_logits, -1)[actions]

    def surrogate():
        logp = torch.log_softmax(theta, -1)[actions]
        return (torch.exp(logp - old_logp) * adv).mean()

    def kl():
        return kl_categorical(old_logits, theta)

    return theta, surrogate, kl


def test_trust_region_step_matches_the_hand_solution():
    theta, surrogate, kl = _softmax_problem([1.0, -1.0, 0.5, 1.0])
    stats = trust_region_step(surrogate, kl, [theta], max_kl=0.01, cg_iters=10, cg_damping=0.1,
                              backtrack_coeff=0.8, max_backtracks=10)
    # By hand: g_j = mean_i A_i (1[a_i = j] - 1/3) = [0.375, -0.375, 0].
    # F = diag(p) - p p^T at p = 1/3; g sums to 0, so F g = g/3 and (F + 0.1 I) x = g gives x = g / (1/3 + 0.1).
    # Step length beta = sqrt(2 delta / x^T (F + 0.1 I) x) = sqrt(0.02 / (g.g / 0.4333)).
    g = np.array([0.375, -0.375, 0.0])
    x = g / (1 / 3 + 0.1)
    beta = math.sqrt(2 * 0.01 / (x @ g))
    np.testing.assert_allclose(theta.detach().numpy(), beta * x, rtol=1e-4, atol=1e-6)
    assert stats["step_accepted"] == 1.0 and stats["line_search_backtracks"] == 0.0
    # The KL constraint holds after the step, and the surrogate improved.
    p_new = torch.softmax(theta.detach(), -1).numpy()
    true_kl = float(np.sum(np.full(3, 1 / 3) * np.log((1 / 3) / p_new)))
    assert true_kl <= 0.01
    assert abs(stats["kl"] - true_kl) < 1e-6
    assert stats["surrogate_improvement"] > 0


def test_line_search_shrinks_until_kl_holds():
    # A KL budget far below what the quadratic model predicts for the full step forces backtracking.
    theta, surrogate, _ = _softmax_problem([1.0, -1.0, 0.5, 1.0])
    calls = []

    def evaluate(fraction):
        calls.append(fraction)
        return 1.0, 0.04 * fraction**2  # KL grows quadratically with the step
    accepted, backtracks = backtracking_line_search(evaluate, max_kl=0.01, backtrack_coeff=0.5, max_backtracks=10)
    assert accepted == 0.5 and backtracks == 1 and calls == [1.0, 0.5]


def test_no_improvement_leaves_the_policy_unchanged():
    theta, surrogate, kl = _softmax_problem([0.0, 0.0, 0.0, 0.0])
    stats = trust_region_step(surrogate, kl, [theta], max_kl=0.01, cg_iters=10, cg_damping=0.1,
                              backtrack_coeff=0.5, max_backtracks=5)
    assert stats["step_accepted"] == 0.0
    torch.testing.assert_close(theta.detach(), torch.zeros(3))


def test_kl_formulas_by_hand():
    # KL([.5,.5] || [.25,.75]) = .5 ln 2 + .5 ln(2/3)
    p, q = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))
    assert kl_categorical(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-5)
    # KL(N(0,1) || N(1,2^2)) = ln 2 + (1 + 1) / 8 - 1/2
    kl = kl_diag_gaussian(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.full((1, 1), math.log(2.0)))
    assert kl.item() == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-5)

