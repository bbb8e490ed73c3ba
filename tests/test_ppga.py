"""PPGA (P269): the CMA-MAE archive, the coefficient search, branching, the per-objective gradients and the walk
loss on hand-computed numbers."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

import envs.qd_pointmass
from algorithms.onpolicy.ppga import (
    CMAMEArchive, PPGAConfig, PPGAModule, branch, es_mean_update, objective_gradient, recombination_weights,
    walk_loss,
)


def test_archive_thresholds_anneal_and_elites_keep_the_best():
    archive = CMAMEArchive(cells_per_dim=2, num_measures=2, f_min=-1.0, alpha=0.5)
    assert archive.num_cells == 4 and archive.cell(np.array([0.2, 0.7])) == 1  # row-major (0, 1)
    # First insert in a cell: improvement over t = f_min = -1: 2 - (-1) = 3; t <- 0.5 (-1) + 0.5 (2) = 0.5
    assert archive.add(np.array([1.0]), 2.0, np.array([0.2, 0.7])) == pytest.approx(3.0)
    assert archive.thresholds[1] == pytest.approx(0.5)
    # A worse solution in the same cell: improvement 1 - 0.5 = 0.5 > 0, t <- 0.75, elite stays f = 2
    assert archive.add(np.array([2.0]), 1.0, np.array([0.4, 0.9])) == pytest.approx(0.5)
    assert archive.thresholds[1] == pytest.approx(0.75) and archive.elites[1][0] == 2.0
    # Below the threshold: negative improvement, nothing changes
    assert archive.add(np.array([3.0]), 0.5, np.array([0.1, 0.6])) == pytest.approx(-0.25)
    assert archive.thresholds[1] == pytest.approx(0.75)
    archive.add(np.array([4.0]), 0.0, np.array([0.9, 0.1]))  # cell (1, 0) = 2
    # QD score = sum (f - f_min) = (2 + 1) + (0 + 1); coverage 2 of 4 cells
    assert archive.qd_score() == pytest.approx(4.0) and archive.coverage() == 0.5
    assert archive.cell(np.array([1.0, 1.0])) == 3  # the upper edge belongs to the last cell


def test_recombination_weights_and_mean_update():
    # n = 4: mu = 2, raw w = [ln 2.5 - ln 1, ln 2.5 - ln 2] = [0.9163, 0.2231] -> normalised [0.8042, 0.1958]
    w = recombination_weights(4)
    np.testing.assert_allclose(w, np.array([math.log(2.5), math.log(1.25)]) / math.log(2.5 * 1.25), rtol=1e-9)
    coefficients = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [-1.0, 0.0]])
    improvements = np.array([0.1, 3.0, 1.0, -5.0])  # ranking: row 1, row 2, row 0, row 3
    np.testing.assert_allclose(es_mean_update(coefficients, improvements), w[0] * np.array([1.0, 0.0])
                               + w[1] * np.array([2.0, 2.0]))


def test_branch_moves_theta_along_the_coefficient_mix():
    theta = np.array([1.0, 0.0, -1.0])
    gradients = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # g_f, g_m
    candidates = branch(theta, gradients, np.array([[2.0, 0.0], [0.5, -1.0]]))
    np.testing.assert_allclose(candidates, [[3.0, 0.0, -1.0], [1.5, -1.0, -1.0]])


def _module():
    obs_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    return PPGAModule(observation_space=obs_space, action_space=act_space,
                      model_config={"num_measures": 2, "fcnet_hiddens": [4], "init_log_std": 0.0})


def test_objective_gradient_matches_the_score_function_by_hand():
    # Zero the actor except the output bias b: mean = b, std = 1, so d/db log N(a; b, 1) = a - b.
    module = _module()
    with torch.no_grad():
        for p in module.actor.parameters():
            p.zero_()
    batch = {Columns.OBS: torch.zeros(2, 3), Columns.ACTIONS: torch.tensor([[1.0, -1.0], [0.5, 2.0]])}
    g = objective_gradient(module, batch, torch.tensor([2.0, -1.0]), None)
    # mean_t A_t (a_t - b): ((2 [1, -1]) + (-1 [0.5, 2])) / 2 = [0.75, -2.0] at the output bias; 0 elsewhere
    bias_grad = g[-2:]
    np.testing.assert_allclose(bias_grad.numpy(), [0.75, -2.0], rtol=1e-6)
    assert torch.count_nonzero(g[:-2]) == 0  # hidden weights see zero inputs / zero output weights
    assert g.shape == module.actor_vector().shape


def test_actor_vector_round_trip():
    module = _module()
    vector = module.actor_vector()
    module.set_actor_vector(vector + 1.0)
    torch.testing.assert_close(module.actor_vector(), vector + 1.0)


def test_walk_loss_mixes_the_objectives_by_mu_c():
    logp = torch.log(torch.tensor([0.5, 0.5]))
    advantages = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 4.0]])  # columns f, m1, m2
    coefficients = torch.tensor([1.0, 0.5, 0.25])
    values, targets = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    terms = walk_loss(logp, logp, advantages, coefficients, values, targets, clip_eps=0.2, vf_coeff=0.5)
    # A_walk = [1 + 1, -1 + 1] = [2, 0]; ratio 1 -> surrogate mean 1; vf per row [1, 4] -> mean 2.5
    assert terms["policy_loss"].item() == pytest.approx(-1.0)
    assert terms["vf_loss"].item() == pytest.approx(2.5)
    assert terms["total_loss"].item() == pytest.approx(-1.0 + 0.5 * 2.5)


def test_pointmass_measures_and_quality():
    env = gym.make(envs.qd_pointmass.ENV_ID)
    env.reset(seed=0)
    total, measure_sum, info = 0.0, np.zeros(2), {}
    done = False
    while not done:
        _, reward, done, _, info = env.step(np.array([1.0, -0.5]))
        total += reward
        measure_sum += info["measure_rewards"]
    # x: 25 steps of +0.1 clipped at 1 -> 1; y: 25 * -0.05 = -1.25 clipped at -1
    np.testing.assert_allclose(info["measures"], [1.0, 0.0]) and np.testing.assert_allclose(measure_sum, [1.0, 0.0])
    assert total == pytest.approx(25 * (0.04 - 0.05 * 1.25))
    assert env.unwrapped.min_return == pytest.approx(25 * (0.04 - 0.1))


def test_config_checks():
    for key, value, message in [("branch_population", -1, "branch_population"), ("coefficient_sigma", 0.0, "sigma"),
                                ("archive_learning_rate", 1.5, "archive_learning_rate"), ("minibatch_size", None,
                                                                                           "minibatch")]:
        config = PPGAConfig().environment(envs.qd_pointmass.ENV_ID)
        setattr(config, key, value)
        with pytest.raises(ValueError, match=message):
            config.validate()


def test_best_possible_qd_score_of_the_check():
    # A cell's best f is the straight constant-speed path to its point nearest the origin: f = 1 - 0.2 |d|^2
    # (a = d / 2.5 every step, energy 25 * 0.05 |a|^2). Summed over the 10 x 10 grid with offset f_min = -1.5:
    # 100 * 2.5 - 0.2 * (10 * 2.4 + 10 * 2.4) = 240.4, the ceiling the learning check's threshold is set against.
    nearest = np.array([0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8])
    best = 1.0 - 0.2 * (nearest[:, None] ** 2 + nearest[None, :] ** 2)
    assert (best + 1.5).sum() == pytest.approx(240.4)
    env = gym.make(envs.qd_pointmass.ENV_ID)
    env.reset(seed=0)
    total, info = 0.0, {}
    for _ in range(25):  # the straight path to (0.8, 0.6): a = (0.32, 0.24)
        _, reward, _, _, info = env.step(np.array([0.32, 0.24]))
        total += reward
    assert total == pytest.approx(1.0 - 0.2 * (0.8**2 + 0.6**2))
    np.testing.assert_allclose(info["measures"], [0.9, 0.8])
