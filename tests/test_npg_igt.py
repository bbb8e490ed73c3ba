"""N-PG-IGT (P009 Algorithm 1) and the shared GPOMDP estimate, on cases worked out by hand."""

import math

import gymnasium as gym
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from algorithms.common.momentum_pg import (
    flat_grad,
    igt_extrapolation,
    npg_igt_schedule,
    trajectory_index,
    trajectory_terms,
)
from algorithms.onpolicy.npg_igt import NPGIGTConfig, npg_igt_step
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError


def test_schedule_by_hand():
    assert npg_igt_schedule(0, 0.5, 1.0) == (0.5, 1.0)  # decay 2/2 = 1: eta_0 = 1 makes d_0 = g_0
    gamma, eta = npg_igt_schedule(2, 0.5, 1.0)  # decay 2/4
    assert gamma == pytest.approx(0.25) and eta == pytest.approx(0.5**0.8)


def test_extrapolation_by_hand():
    # (1 - 0.25)/0.25 = 3: theta + 3 (theta - theta_prev) = [1, 2] + 3 [1, 1]
    point = igt_extrapolation(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), 0.25)
    torch.testing.assert_close(point, torch.tensor([4.0, 5.0]))


def test_two_npg_igt_steps_by_hand():
    theta0 = torch.tensor([1.0, 0.0])
    first = npg_igt_step(theta0, theta0, None, torch.tensor([3.0, 4.0]), 0, 0.5, 1.0)
    # t = 0: d_0 = g = [3, 4], ||d|| = 5, theta_1 = [1, 0] + 0.5 [0.6, 0.8] = [1.3, 0.4].
    torch.testing.assert_close(first["d"], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(first["theta"], torch.tensor([1.3, 0.4]))
    # The next sampling point: eta_1 = (2/3)^0.8 = 0.72298, (1 - eta_1)/eta_1 = 0.38316,
    # theta~_1 = [1.3, 0.4] + 0.38316 [0.3, 0.4] = [1.41495, 0.55326].
    torch.testing.assert_close(first["sample_at"], torch.tensor([1.41495, 0.55326]), atol=1e-5, rtol=0)
    second = npg_igt_step(first["theta"], theta0, first["d"], torch.tensor([0.0, -5.0]), 1, 0.5, 1.0)
    # d_1 = 0.27702 [3, 4] + 0.72298 [0, -5] = [0.83106, -2.50683], ||d_1|| = 2.64100, gamma_1 = 1/3:
    # theta_2 = [1.3, 0.4] + (1/3) [0.31468, -0.94920] = [1.40489, 0.08360].
    torch.testing.assert_close(second["d"], torch.tensor([0.83106, -2.50683]), atol=1e-5, rtol=0)
    torch.testing.assert_close(second["theta"], torch.tensor([1.40489, 0.08360]), atol=1e-5, rtol=0)
    assert second["gamma"] == pytest.approx(1 / 3) and second["eta"] == pytest.approx((2 / 3) ** 0.8)


def test_trajectory_index_from_phantom_rows():
    # Two episodes of 2 and 1 real steps, each closed by a phantom row (mask False).
    traj, steps, num = trajectory_index(torch.tensor([True, True, False, True, False]))
    assert traj.tolist() == [0, 0, 1] and steps.tolist() == [0, 1, 0] and num == 2


def test_gpomdp_gradient_by_hand():
    # One state, 3 actions, logits theta = 0 (uniform): grad log pi(a) = e_a - 1/3.
    theta = torch.zeros(3, requires_grad=True)
    actions = torch.tensor([0, 1, 2])
    logp = torch.log_softmax(theta, -1)[actions]
    psi = torch.tensor([1.0, 2.0, -1.0])
    traj, steps, num = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 2
    phi, log_p = trajectory_terms(logp, psi, steps, traj, num, discount=0.5)
    # Phi_0 = 1 log pi(0) + 0.5 * 2 log pi(1); Phi_1 = -1 log pi(2).
    # grad Phi_0 = (2/3, -1/3, -1/3) + (-1/3, 2/3, -1/3) = (1/3, 1/3, -2/3); grad Phi_1 = (1/3, 1/3, -2/3).
    g = flat_grad(phi.mean(), [theta])
    torch.testing.assert_close(g, torch.tensor([1 / 3, 1 / 3, -2 / 3]))
    torch.testing.assert_close(log_p.detach(), torch.full((2,), 0.0) + torch.tensor([2.0, 1.0]) * math.log(1 / 3))


def _batch(module):
    """Two CartPole-shaped episodes (3 and 2 steps), each closed by a phantom row."""
    torch.manual_seed(1)
    mask = torch.tensor([True, True, True, False, True, True, False])
    return {
        Columns.OBS: torch.randn(7, 4),
        Columns.ACTIONS: torch.tensor([0, 1, 1, 0, 1, 0, 0]),
        Columns.LOSS_MASK: mask,
        Postprocessing.ADVANTAGES: torch.tensor([1.0, -0.5, 2.0, 0.0, 0.3, -1.0, 0.0]),
        Postprocessing.VALUE_TARGETS: torch.tensor([3.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0]),
    }


def _independent_gradient(module, batch, params, discount):
    """g = (1/M) sum_i sum_h gamma^h Psi_h grad log pi, written out row by row."""
    dist = module.get_train_action_dist_cls().from_logits(module.forward_train(batch)[Columns.ACTION_DIST_INPUTS])
    logp = dist.logp(batch[Columns.ACTIONS])
    adv = batch[Postprocessing.ADVANTAGES]
    h = [0, 1, 2, None, 0, 1, None]
    total = sum(discount**h[i] * adv[i] * logp[i] for i in range(7) if h[i] is not None) / 2
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])


def test_learner_step_and_next_sampling_point():
    config = NPGIGTConfig().environment("CartPole-v1")
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    params = learner._policy_params(module)
    theta0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    batch = _batch(module)
    g = _independent_gradient(module, batch, params, config.gamma)
    learner._update_module("default_policy", batch)
    theta1 = theta0 + config.pg_gamma_0 * g / g.norm()  # t = 0: d_0 = g_0, normalized step gamma_0
    eta1 = (2 / 3) ** 0.8
    expected = theta1 + (1 - eta1) / eta1 * (theta1 - theta0)  # the module now holds theta~_1
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(params).detach(), expected, rtol=1e-5, atol=1e-6)
    state = learner._pg_state["default_policy"]
    assert state["t"] == 1
    torch.testing.assert_close(state["theta"], theta1, rtol=1e-5, atol=1e-6)
    # The learner state survives a checkpoint round trip (get_state -> set_state on a fresh learner).
    fresh = config.build_learner(env=gym.make("CartPole-v1"))
    fresh.set_state(learner.get_state())
    restored = fresh._pg_state["default_policy"]
    assert restored["t"] == 1
    torch.testing.assert_close(restored["theta"], state["theta"])
    torch.testing.assert_close(restored["d"], state["d"])


def test_bad_options_are_refused():
    rule = get_rule("npg_igt")
    with pytest.raises(UserError, match="pg_eta_0 must be in"):
        build_config(rule, "CartPole-v1", 0, {"pg_eta_0": "1.5"})
    with pytest.raises(UserError, match="pg_gamma_0 must be > 0"):
        build_config(rule, "CartPole-v1", 0, {"pg_gamma_0": "0"})
    config = NPGIGTConfig()
    config.batch_mode = "truncate_episodes"
    with pytest.raises(ValueError, match="whole trajectories"):
        config.validate()
