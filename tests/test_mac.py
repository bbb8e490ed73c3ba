"""P069 MAC: the MLMC estimator, MAC's losses and one update by hand; the continuing gridworld's exact gains."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from algorithms.common.adagrad_norm import AdaGradNorm
from algorithms.common.mlmc import mlmc_estimate, mlmc_weights, rollout_length, sample_level
from algorithms.onpolicy.mac import MACConfig, mac_losses
from algorithms.registry import build_config, get_rule
from envs.continuing_gridworld import ENV_ID, ContinuingGridworld, average_reward, optimal_average_reward
from rlfleet.errors import UserError


def test_mlmc_estimate_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # J = 2: g^0 = 1, g^2 = mean(1..4) = 2.5, g^1 = mean(1, 2) = 1.5 -> 1 + 4 (2.5 - 1.5) = 5
    assert mlmc_estimate(x, 2, t_max=8) == pytest.approx(5.0)
    # the same as weights [0, -1, 1, 1]: 0 - 2 + 3 + 4 = 5
    np.testing.assert_array_equal(mlmc_weights(2, 8), [0.0, -1.0, 1.0, 1.0])
    # J = 1: 1 + 2 (1.5 - 1) = 2 = X_2
    np.testing.assert_array_equal(mlmc_weights(1, 8), [0.0, 1.0])
    # 2^4 = 16 > T_max = 8: only g^0 = X_1, from a one-step rollout
    assert rollout_length(4, 8) == 1 and rollout_length(3, 8) == 8
    np.testing.assert_array_equal(mlmc_weights(4, 8), [1.0])
    assert mlmc_estimate(x, 4, t_max=8) == 1.0


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_mlmc_weights_match_the_definition(level):
    samples = np.random.default_rng(level).normal(size=(rollout_length(level, 16), 3))
    weights = mlmc_weights(level, 16)
    np.testing.assert_allclose(weights @ samples, mlmc_estimate(samples, level, 16))
    assert weights.sum() == pytest.approx(1.0)  # unbiased for a constant signal


def test_levels_are_geometric_one_half():
    rng = np.random.default_rng(0)
    levels = np.array([sample_level(rng) for _ in range(20_000)])
    assert levels.min() == 1
    assert abs((levels == 1).mean() - 0.5) < 0.02 and abs((levels == 2).mean() - 0.25) < 0.02
    assert abs(levels.mean() - 2.0) < 0.05


def test_adagrad_norm_by_hand():
    p = torch.zeros(2, requires_grad=True)
    optimizer = AdaGradNorm([p], lr=1.0)
    # step 1: g = [3, 4], b^2 = 25 -> p = -[3, 4] / 5
    p.grad = torch.tensor([3.0, 4.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))
    # step 2: g = [0, 5], b^2 = 50 -> p -= [0, 5] / sqrt(50)
    p.grad = torch.tensor([0.0, 5.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8 - 5 / math.sqrt(50)]))
    assert optimizer.state_dict()["state"][0]["sum_squared_norms"].item() == pytest.approx(50.0)


def test_mac_losses_by_hand():
    # Two steps with MLMC weights [0, 1] (J = 1); eta = .5; V(s) = [1, 2]; V(s') = [2, 0]; r = [0, 1].
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    eta = torch.tensor(0.5, requires_grad=True)
    logp = torch.log(torch.tensor([0.5, 0.25]))
    terms = mac_losses(logp, values, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), eta, torch.tensor([0.0, 1.0]))
    # delta = r - eta + V' - V = [0 - .5 + 2 - 1, 1 - .5 + 0 - 2] = [.5, -1.5]
    assert terms["td_error"].item() == pytest.approx(-1.5)
    assert terms["policy_loss"].item() == pytest.approx(-(-1.5 * math.log(0.25)))  # -(w2 delta2 log pi)
    assert terms["vf_loss"].item() == pytest.approx(0.5 * 1.5**2)
    assert terms["eta_loss"].item() == pytest.approx(0.5 * 0.5**2)
    (terms["vf_loss"] + terms["eta_loss"]).backward()
    # d vf / dV(s2) = w2 delta2 * (-1) = 1.5 (SGD lowers V(s2) towards r - eta + V' = .5); V(s1) has weight 0.
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 1.5]))
    # d eta_loss / d eta = -w2 (r2 - eta) = -.5: SGD raises eta towards the MLMC reward estimate.
    assert eta.grad.item() == pytest.approx(-0.5)


def test_mac_update_moves_eta_by_the_mlmc_reward_estimate():
    env = ContinuingGridworld(size=3)
    config = MACConfig().environment(observation_space=env.observation_space, action_space=env.action_space)
    learner = config.build_learner()
    obs = np.eye(9, dtype=np.float32)[[0, 1]]
    rollout = {"obs": obs, "next_obs": obs[::-1].copy(), "actions": np.array([0, 1]),
               "rewards": np.array([0.0, 1.0], np.float32), "terminateds": np.zeros(2, np.float32)}
    stats = learner.mac_update(rollout, mlmc_weights(1, 128))
    # eta_1 = eta_0 + gamma * sum_t w_t (r_t - eta_0) = 0 + 0.01 * (0 * 0 + 1 * 1)
    assert stats["average_reward"] == pytest.approx(0.01)
    assert learner.module[DEFAULT_MODULE_ID].unwrapped().average_reward.item() == pytest.approx(0.01)


def test_gridworld_optimal_gain_by_hand():
    # 2x2 grid without slips: cells 1 and 2 are one step from the goal, cell 0 two; restarts are uniform over
    # {0, 1, 2}: (2 + 1 + 1) / 3 = 4/3 steps per reward -> gain 3/4.
    assert optimal_average_reward(size=2, slip=0.0) == pytest.approx(0.75)
    uniform = np.full((3, 4), 0.25)
    assert average_reward(uniform, size=2, slip=0.0) < 0.75


def test_gridworld_dynamics_and_the_exact_random_policy_gain():
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64,) and obs.sum() == 1.0 and obs[63] == 0.0  # never starts on the goal
    rng = np.random.default_rng(0)
    total, steps, truncations = 0.0, 20_000, 0
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(4)))
        assert not terminated and obs[63] == 0.0  # the goal teleports: it is never an observed state
        total += reward
        if truncated:
            truncations += 1
            env.reset()
    assert truncations == steps // 1000
    exact = average_reward(np.full((63, 4), 0.25))
    assert abs(total / steps - exact) < 0.0015  # 3.4 per 1000 steps, within sampling error


def test_bad_options_are_rejected():
    rule = get_rule("mac")
    with pytest.raises(UserError, match="mac_t_max"):
        build_config(rule, ENV_ID, 0, {"mac_t_max": "1"})
    with pytest.raises(UserError, match="one Markov chain"):
        build_config(rule, ENV_ID, 0, {"num_envs_per_env_runner": "2"})
