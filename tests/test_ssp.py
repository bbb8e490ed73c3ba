"""Stochastic stateful policies (P184): the extended MDP, the joint log-likelihood by hand, the joint PPO ratio."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchCategorical, TorchDiagGaussian, TorchMultiDistribution,
)

import envs.masked_cartpole
import envs.stateful_policy
from algorithms.onpolicy.ppo import ppo_loss
from algorithms.onpolicy.ssp import RULE, SSPConfig, stateful_log_probs

LOG_2PI = math.log(2 * math.pi)


def test_masked_cartpole_keeps_position_and_angle_only():
    env = gym.make(envs.masked_cartpole.ENV_ID)
    obs, _ = env.reset(seed=0)
    state = env.unwrapped.state
    assert obs.shape == (2,)
    np.testing.assert_allclose(obs, [state[0], state[2]], rtol=1e-6)
    obs, reward, *_ = env.step(1)
    np.testing.assert_allclose(obs, [env.unwrapped.state[0], env.unwrapped.state[2]], rtol=1e-6)
    assert reward == 1.0


def test_extended_mdp_carries_the_internal_state():
    env = gym.make(envs.stateful_policy.ENV_ID, base_env=envs.masked_cartpole.ENV_ID, state_dim=3)
    assert env.action_space == gym.spaces.Tuple((gym.spaces.Discrete(2), env.unwrapped.state_space))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5,) and np.all(obs[2:] == 0.0)  # z_0 = 0
    obs, reward, *_ = env.step((1, np.array([0.5, -2.0, 0.25], np.float32)))
    np.testing.assert_allclose(obs[2:], [0.5, -1.0, 0.25])  # z_1 is the sampled z', clipped to [-1, 1]
    assert reward == 1.0
    np.testing.assert_allclose(obs[:2], [env.unwrapped.base.unwrapped.state[0], env.unwrapped.base.unwrapped.state[2]],
                               rtol=1e-6)


def test_box_base_action_is_extended_with_the_state():
    env = gym.make(envs.stateful_policy.ENV_ID, base_env="Pendulum-v1", state_dim=2)
    assert env.action_space.shape == (3,)
    np.testing.assert_allclose(env.action_space.low, [-2.0, -1.0, -1.0])
    env.reset(seed=0)
    base, z = env.unwrapped.split_action(np.array([1.5, 0.1, -0.2], np.float32))
    np.testing.assert_allclose(base, [1.5]) and np.testing.assert_allclose(z, [0.1, -0.2])


def test_joint_log_likelihood_by_hand_discrete_base():
    # pi_a: logits [0, ln 3] -> p = [0.25, 0.75]; pi_z: N(mean [0.5, -0.5], std [1, 0.5]).
    logits = torch.tensor([[0.0, math.log(3.0), 0.5, -0.5, 0.0, math.log(0.5)]])
    dist = TorchMultiDistribution.from_logits(logits, child_distribution_cls_struct=(TorchCategorical, TorchDiagGaussian),
                                              input_lens=[2, 4])
    actions = (torch.tensor([1]), torch.tensor([[0.5, 0.0]]))
    logp_a, logp_z = stateful_log_probs(dist, actions, state_dim=2)
    # log pi_a(1) = ln 0.75
    assert logp_a.item() == pytest.approx(math.log(0.75))
    # log N(0.5; 0.5, 1) = -ln(2 pi)/2;  log N(0; -0.5, 0.5) = -ln 0.5 - ln(2 pi)/2 - (0.5/0.5)^2 / 2
    assert logp_z.item() == pytest.approx(-LOG_2PI / 2 + (math.log(2.0) - LOG_2PI / 2 - 0.5), rel=1e-6)
    # ... and their sum is the extended action's log-likelihood RLlib's PPO loss uses.
    assert (logp_a + logp_z).item() == pytest.approx(dist.logp(actions).item(), rel=1e-6)


def test_joint_log_likelihood_box_base_splits_the_gaussian():
    # One base action dim, two state dims: mean [0, 1, -1], std 1 -> per-dim log-densities at [1, 1, 0].
    dist = TorchDiagGaussian.from_logits(torch.tensor([[0.0, 1.0, -1.0, 0.0, 0.0, 0.0]]))
    logp_a, logp_z = stateful_log_probs(dist, torch.tensor([[1.0, 1.0, 0.0]]), state_dim=2)
    assert logp_a.item() == pytest.approx(-LOG_2PI / 2 - 0.5)  # (1 - 0)^2 / 2
    assert logp_z.item() == pytest.approx(2 * (-LOG_2PI / 2) - 0.5)  # 0 and (0 - (-1))^2 / 2


def test_stateful_gradient_flows_into_both_factors_through_the_joint_ratio():
    # The PPO step of the rule uses the joint ratio r = pi_a pi_z / (pi_a_old pi_z_old).
    logits = torch.tensor([[0.0, math.log(3.0), 0.5, -0.5, 0.0, math.log(0.5)]], requires_grad=True)
    dist = TorchMultiDistribution.from_logits(logits, child_distribution_cls_struct=(TorchCategorical, TorchDiagGaussian),
                                              input_lens=[2, 4])
    actions = (torch.tensor([1]), torch.tensor([[0.5, 0.0]]))
    logp_a, logp_z = stateful_log_probs(dist, actions, state_dim=2)
    joint = logp_a + logp_z
    old = joint.detach() - math.log(1.5)  # the sampling policy was 1.5x less likely: r = 1.5
    terms = ppo_loss(joint, old, torch.tensor([2.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                     clip_eps=0.2, vf_coeff=0.0, entropy_coeff=0.0)
    # min(1.5 * 2, clip(1.5, 0.8, 1.2) * 2) = 2.4: clipped, so no gradient
    assert terms["total_loss"].item() == pytest.approx(-2.4)
    old_inside = joint.detach() - math.log(1.1)  # r = 1.1 inside the clip range: gradient -A r grad log pi
    terms = ppo_loss(joint, old_inside, torch.tensor([2.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                     clip_eps=0.2, vf_coeff=0.0, entropy_coeff=0.0)
    terms["total_loss"].backward()
    grad = logits.grad[0].numpy()
    # d/dlogits of log pi_a(1): e_1 - p = [-0.25, 0.25]; d/dmean of log N(z'; mean, std): (z' - mean) / std^2
    # = [0, 0.5 / 0.25 = 2]; d/dlog_std: ((z' - mean)/std)^2 - 1 = [-1, 0]. Each times -A r = -2.2.
    np.testing.assert_allclose(grad, -2.2 * np.array([-0.25, 0.25, 0.0, 2.0, -1.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_config_wraps_the_env_and_checks_state_dim():
    config = SSPConfig().environment(envs.masked_cartpole.ENV_ID).training(state_dim=6)
    config.validate()
    assert config.env == envs.stateful_policy.ENV_ID
    assert config.env_config == {"base_env": envs.masked_cartpole.ENV_ID, "state_dim": 6}
    bad = SSPConfig().environment(envs.masked_cartpole.ENV_ID)
    bad.state_dim = 0
    with pytest.raises(ValueError, match="state_dim"):
        bad.validate()
    assert RULE.learning_check.env == envs.masked_cartpole.ENV_ID


def test_module_maps_the_extended_observation_to_the_joint_distribution():
    config = SSPConfig().environment(envs.masked_cartpole.ENV_ID).training(state_dim=3)
    config.validate()
    env = gym.make(envs.stateful_policy.ENV_ID, **config.env_config)
    spec = config.get_rl_module_spec(env=env)
    module = spec.build()
    out = module.forward_train({Columns.OBS: torch.zeros(4, 5)})
    dist = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    sample = dist.sample()
    logp_a, logp_z = stateful_log_probs(dist, sample, state_dim=3)
    torch.testing.assert_close(logp_a + logp_z, dist.logp(sample))


def test_kernel_std_starts_at_state_init_std():
    config = SSPConfig().environment(envs.masked_cartpole.ENV_ID).training(state_dim=3, state_init_std=0.2)
    config.validate()
    env = gym.make(envs.stateful_policy.ENV_ID, **config.env_config)
    module = config.get_rl_module_spec(env=env).build()
    inputs = module.forward_train({Columns.OBS: torch.randn(4, 5)})[Columns.ACTION_DIST_INPUTS]
    # Tuple inputs: [2 logits, 3 z means, 3 z log-stds]; every z std is 0.2 whatever the input.
    torch.testing.assert_close(inputs[:, -3:].exp(), torch.full((4, 3), 0.2))
    assert not torch.allclose(inputs[0, :5], inputs[1, :5])  # the rest of the head is left as RLlib builds it
