"""(N)-HARPG (P009 Algorithm 2): the policy-Hessian estimator and the recursive step, checked by hand."""

import gymnasium as gym
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from algorithms.common.momentum_pg import (
    flat_grad,
    harpg_schedule,
    policy_hessian_vector_product,
    trajectory_terms,
)
from algorithms.onpolicy.harpg import HESSIAN, HARPGConfig, harpg_step


def _bandit_terms(theta, actions, psi, traj, steps, num, discount=1.0):
    logp = torch.log_softmax(theta, -1)[actions]
    return trajectory_terms(logp, psi, steps, traj, num, discount)


def test_hessian_vector_product_by_hand():
    # One-step trajectory, 3 actions, uniform policy (theta = 0), action 0, reward-to-go Psi = 3.
    # B = Psi (grad log pi grad log pi^T + Hess log pi), grad log pi(0) = (2/3, -1/3, -1/3),
    # Hess log pi = -(diag(p) - p p^T) = -(1/9) [[2,-1,-1],[-1,2,-1],[-1,-1,2]], so
    # B = 3 * (1/9) [[4,-2,-2],[-2,1,1],[-2,1,1]] - 3 * (1/9) [[2,-1,-1],[-1,2,-1],[-1,-1,2]]
    #   = (1/3) [[2,-1,-1],[-1,-1,2],[-1,2,-1]];  B (1, 0, 0) = (2/3, -1/3, -1/3).
    theta = torch.zeros(3, requires_grad=True)
    phi, log_p = _bandit_terms(theta, torch.tensor([0]), torch.tensor([3.0]), torch.tensor([0]), torch.tensor([0]), 1)
    hv = policy_hessian_vector_product(phi, log_p, [theta], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(hv, torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_hessian_estimator_is_unbiased_on_a_bandit():
    # J(theta) = sum_a pi_a r_a. E_a[B(a) v] must equal the exact Hessian-vector product of J.
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    rewards = torch.tensor([1.0, -2.0, 0.5, 3.0])
    v = torch.randn(4)
    probs = torch.softmax(theta, -1).detach()
    expected_hv = sum(
        probs[a] * policy_hessian_vector_product(
            *_bandit_terms(theta, torch.tensor([a]), rewards[a : a + 1], torch.tensor([0]), torch.tensor([0]), 1),
            [theta], v)
        for a in range(4)
    )
    exact = torch.autograd.functional.hvp(lambda th: (torch.softmax(th, -1) * rewards).sum(), theta.detach(), v)[1]
    torch.testing.assert_close(expected_hv, exact, rtol=1e-5, atol=1e-6)


def test_score_term_is_per_trajectory():
    # Two 2-step trajectories of a state-dependent linear softmax policy. Reference: for each trajectory the full
    # matrices grad Phi_i grad log p_i^T + Hess Phi_i by torch.autograd.functional, then the mean times v.
    torch.manual_seed(3)
    obs = torch.randn(4, 2)
    actions = torch.tensor([0, 2, 1, 1])
    psi = torch.tensor([1.0, -0.5, 2.0, 0.7])
    traj, steps = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    w0 = torch.randn(6)
    v = torch.randn(6)

    def logp_of(w):
        return torch.log_softmax(obs @ w.view(2, 3), -1)[torch.arange(4), actions]

    def per_traj(w, i, with_psi):
        weights = (0.9 ** steps.float()) * psi if with_psi else torch.ones(4)
        return (weights * logp_of(w))[traj == i].sum()

    reference = torch.zeros(6)
    for i in range(2):
        grad_phi = torch.autograd.functional.jacobian(lambda w: per_traj(w, i, True), w0)
        grad_logp = torch.autograd.functional.jacobian(lambda w: per_traj(w, i, False), w0)
        hess_phi = torch.autograd.functional.hessian(lambda w: per_traj(w, i, True), w0)
        reference += (torch.outer(grad_phi, grad_logp) + hess_phi) @ v / 2
    w = w0.clone().requires_grad_(True)
    phi, log_p = trajectory_terms(logp_of(w), psi, steps, traj, 2, 0.9)
    torch.testing.assert_close(policy_hessian_vector_product(phi, log_p, [w], v), reference, rtol=1e-5, atol=1e-6)


def test_schedules_by_hand():
    assert harpg_schedule(0, 0.5, 1.0, True) == (0.5, 1.0)
    gamma, eta = harpg_schedule(1, 0.5, 1.0, True)  # decay 2/3
    assert gamma == pytest.approx(1 / 3) and eta == pytest.approx(2 / 3)
    gamma, _ = harpg_schedule(1, 0.5, 1.0, False)  # HARPG: gamma_0 (2/3)^(1/2)
    assert gamma == pytest.approx(0.5 * (2 / 3) ** 0.5)


def test_recursive_step_by_hand():
    theta, d_prev, g, v = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    step = harpg_step(theta, d_prev, g, v, 1, 0.5, 1.0, normalized=True)
    # eta_1 = 2/3: d_1 = (1/3)([1, 0] + [1, 1]) + (2/3)[0, 2] = [2/3, 5/3]; ||d_1|| = 1.79505; gamma_1 = 1/3.
    torch.testing.assert_close(step["d"], torch.tensor([2 / 3, 5 / 3]))
    torch.testing.assert_close(step["theta"], torch.tensor([0.12380, 0.30950]), atol=1e-5, rtol=0)
    plain = harpg_step(theta, d_prev, g, v, 1, 0.5, 1.0, normalized=False)
    # HARPG: theta_1 = 0.5 (2/3)^(1/2) d_1 = 0.40825 [2/3, 5/3] = [0.27217, 0.68041].
    torch.testing.assert_close(plain["theta"], torch.tensor([0.27217, 0.68041]), atol=1e-5, rtol=0)
    first = harpg_step(theta, None, g, None, 0, 0.5, 1.0, normalized=True)
    torch.testing.assert_close(first["d"], g)  # d_0 = g_0


def test_learner_phases_keep_theta_and_interpolate():
    config = HARPGConfig().environment("CartPole-v1")
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    params = learner._policy_params(module)
    torch.manual_seed(2)
    batch = {
        Columns.OBS: torch.randn(5, 4), Columns.ACTIONS: torch.tensor([0, 1, 0, 1, 0]),
        Columns.LOSS_MASK: torch.tensor([True, True, False, True, False]),
        Postprocessing.ADVANTAGES: torch.tensor([1.0, -1.0, 0.0, 0.5, 0.0]),
        Postprocessing.VALUE_TARGETS: torch.tensor([2.0, 1.0, 0.0, 1.0, 0.0]),
    }
    assert learner.move_to_interpolated_point() is False  # t = 0: nothing to interpolate
    learner.set_phase("gradient")
    learner._update_module("default_policy", batch)
    state = learner._pg_state["default_policy"]
    theta1, theta0 = state["theta"].clone(), state["theta_prev"].clone()
    assert learner.move_to_interpolated_point() is True
    point = torch.nn.utils.parameters_to_vector(params).detach()
    q = ((point - theta0) @ (theta1 - theta0)) / ((theta1 - theta0) @ (theta1 - theta0))
    assert 0.0 <= float(q) <= 1.0
    torch.testing.assert_close(point, theta0 + q * (theta1 - theta0))  # on the segment
    learner.set_phase(HESSIAN)
    learner._update_module("default_policy", batch)
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(params).detach(), theta1)  # back at theta_t
    assert state["t"] == 1 and state["v"].shape == theta1.shape
    learner.set_phase("gradient")
    learner._update_module("default_policy", batch)
    assert state["t"] == 2 and "v" not in state  # the correction was used once


def test_flat_grad_fills_unused_parameters_with_zeros():
    x, y = torch.tensor([2.0], requires_grad=True), torch.ones(2, requires_grad=True)
    torch.testing.assert_close(flat_grad((3 * x).sum(), [x, y]), torch.tensor([3.0, 0.0, 0.0]))
