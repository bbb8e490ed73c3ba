"""SubPO (P032): the coverage task's marginal gains, the estimator on a hand-computed batch, the config's checks."""

import numpy as np
import pytest
import torch

from algorithms.onpolicy.gae import segment_advantages
from algorithms.onpolicy.subpo import RULE, SubPOConfig, subpo_policy_loss
from envs.coverage import CoverageGridEnv, coverage, disc


def test_marginal_gains_sum_to_the_coverage_by_hand():
    # 3x3 grid, radius 1, start (0,0). Moves: 0 = x+1, 2 = y+1, 1 = x-1.
    env = CoverageGridEnv(size=3, horizon=3, radius=1, start=(0, 0))
    env.reset(seed=0)
    # D(0,0) = {(0,0),(1,0),(0,1)}; step to (1,0): D = {(1,0),(0,0),(2,0),(1,1)} adds (2,0),(1,1) -> r0 = 3 + 2 = 5
    _, r0, term0, _, info0 = env.step(0)
    # to (1,1): D = {(1,1),(0,1),(2,1),(1,0),(1,2)} adds (2,1),(1,2) -> r1 = 2
    _, r1, term1, _, _ = env.step(2)
    # to (0,1): D = {(0,1),(1,1),(0,0),(0,2)} adds (0,2) -> r2 = 1; H = 3 reached
    _, r2, term2, _, info2 = env.step(1)
    assert (r0, r1, r2) == (5.0, 2.0, 1.0)
    assert info0["coverage"] == 5 and info2["coverage"] == 8
    assert not term0 and not term1 and term2
    assert r0 + r1 + r2 == coverage([(0, 0), (1, 0), (1, 1), (0, 1)], 3, 1) == 8


def test_modular_reward_counts_every_visit_again():
    env = CoverageGridEnv(size=3, horizon=2, radius=1, reward="modular")
    env.reset(seed=0)
    _, r0, _, _, _ = env.step(0)  # (1,0): |D| = 4
    _, r1, _, _, info = env.step(1)  # back to (0,0): |D| = 3, no new cell, but the Markov reward pays again
    assert (r0, r1) == (4.0, 3.0) and info["coverage"] == 5


def test_walls_and_observation():
    env = CoverageGridEnv(size=3, horizon=4, radius=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (9 + 4,) and obs[0] == 1.0 and obs[9] == 1.0 and obs.sum() == 2.0
    obs, r, _, _, _ = env.step(1)  # x-1 into the wall: stays at (0,0), which is already covered... except at t=1
    assert env.position == (0, 0) and r == 1.0  # r0 always includes the start cell's disc
    obs, r, _, _, _ = env.step(1)
    assert r == 0.0 and obs[9 + 2] == 1.0  # revisiting gains nothing; time one-hot at t = 2
    assert disc((1, 1), 3, 1) == {(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)}


def test_reward_to_go_minus_baseline_is_the_connector_with_gamma_lambda_one():
    # One terminated trajectory of 3 steps (+ the phantom bootstrap row): gains r = [5, 2, 1], baseline b = V(s_i).
    rewards = np.array([5.0, 2.0, 1.0, 0.0], np.float32)
    values = np.array([4.0, 1.0, 0.5, 9.0], np.float32)  # the phantom row's value must be ignored (terminated)
    terminateds = np.array([False, False, True, False])
    advantages, targets = segment_advantages(values, rewards, terminateds, [4], gamma=1.0, lambda_=1.0)
    # G = [5+2+1, 2+1, 1] = [8, 3, 1]; A = G - b = [4, 2, 0.5]
    np.testing.assert_allclose(targets[:3], [8.0, 3.0, 1.0])
    np.testing.assert_allclose(advantages[:3], [4.0, 2.0, 0.5])


def test_policy_loss_gradient_is_minus_the_subpo_estimate():
    # Two actions, logits theta = [0, 0] -> pi = [0.5, 0.5]; grad_theta log pi(a) = e_a - pi.
    theta = torch.zeros(2, requires_grad=True)
    actions = torch.tensor([0, 1, 0])
    advantages = torch.tensor([2.0, -1.0, 0.5])
    logp = torch.log_softmax(theta, -1)[actions]
    terms = subpo_policy_loss(logp, logp.detach(), advantages)
    terms["policy_loss"].backward()
    # estimate g = (1/3)[2 (0.5,-0.5) - 1 (-0.5,0.5) + 0.5 (0.5,-0.5)] = (1/3)(1.75, -1.75)
    np.testing.assert_allclose(theta.grad.numpy(), [-1.75 / 3, 1.75 / 3], rtol=1e-6)
    # ratio = 1 on the sampling policy, so the loss value is -mean(A) = -(2 - 1 + 0.5) / 3
    assert terms["policy_loss"].item() == pytest.approx(-0.5)
    assert terms["mean_ratio"].item() == pytest.approx(1.0)


def test_policy_loss_masks_phantom_rows():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.1]))
    old = torch.log(torch.tensor([0.5, 0.5, 0.1]))
    mask = torch.tensor([True, True, False])
    terms = subpo_policy_loss(logp, old, torch.tensor([1.0, 4.0, 100.0]), mask)
    # ratios [1, 0.5]; -(1*1 + 0.5*4) / 2 = -1.5 (the masked row's 100 is ignored)
    assert terms["policy_loss"].item() == pytest.approx(-1.5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gamma": 0.99}, "gamma = lambda_ = 1"),
        ({"lambda_": 0.95}, "gamma = lambda_ = 1"),
        ({"batch_mode": "truncate_episodes"}, "complete_episodes"),
        ({"pg_steps": 0}, "pg_steps"),
        ({"policy_lr": 0.0}, "policy_lr"),
    ],
)
def test_config_rejects_bad_options(changes, message):
    config = SubPOConfig().environment("CoverageGrid-v0")
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_threshold_is_far_above_a_random_policy():
    # The random policy's coverage, measured on the check's task: mean about 18 cells of 64.
    env = CoverageGridEnv()
    rng = np.random.default_rng(0)
    covered = []
    for episode in range(300):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, done, _, info = env.step(int(rng.integers(4)))
        covered.append(info["coverage"])
    assert 16.0 < np.mean(covered) < 21.0
    assert RULE.learning_check.threshold > np.mean(covered) + 3 * np.std(covered)
