"""P272 prior_baseline: V = w V_prior + V_phi and the gradient of the learned w by hand, the prior from a real DQN / PPO checkpoint, bad options."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from algorithms.common.advantages import gae_advantages
from algorithms.common.prior_value import PriorValue
from algorithms.onpolicy.prior_baseline import combined_value
from algorithms.registry import build_config, get_rule
from cluster.train import train
from rlfleet.errors import UserError


def test_combined_value_and_its_advantages_by_hand():
    new = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    prior = torch.tensor([10.0, 8.0, 4.0], requires_grad=True)
    v = combined_value(new, prior, 0.5)
    # 0.5 * [10, 8, 4] + [0.5, -1, 2] = [5.5, 3.0, 4.0]
    torch.testing.assert_close(v, torch.tensor([5.5, 3.0, 4.0]))
    v.sum().backward()
    assert prior.grad is None and torch.equal(new.grad, torch.ones(3))  # only V_phi learns
    # One 3-step episode ending in termination, rewards 1, gamma 0.9, lambda 1: A_t = G_t - V(s_t)
    # G = [1 + 0.9 + 0.81, 1 + 0.9, 1] = [2.71, 1.9, 1.0] -> A = [2.71 - 5.5, 1.9 - 3.0, 1.0 - 4.0]
    adv = gae_advantages(np.ones(3, np.float32), v.detach().numpy(), 0.0, gamma=0.9, lambda_=1.0)
    np.testing.assert_allclose(adv, [2.71 - 5.5, 1.9 - 3.0, -3.0], rtol=1e-5)


def test_learned_prior_weight_gets_the_value_loss_gradient_by_hand():
    w = torch.nn.Parameter(torch.tensor(1.0))
    new = torch.tensor([1.0, -1.0], requires_grad=True)
    prior = torch.tensor([10.0, 4.0])
    targets = torch.tensor([5.0, 2.0])
    v = combined_value(new, prior, w)  # [1 * 10 + 1, 1 * 4 - 1] = [11, 3]
    loss = ((v - targets) ** 2).mean()  # errors [6, 1]: (36 + 1) / 2 = 18.5
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(18.5))
    # dL/dw = mean(2 * error * V_prior) = (2 * 6 * 10 + 2 * 1 * 4) / 2 = 64; dL/dV_phi = error = [6, 1]
    torch.testing.assert_close(w.grad, torch.tensor(64.0))
    torch.testing.assert_close(new.grad, torch.tensor([6.0, 1.0]))


@pytest.fixture(scope="module")
def dqn_prior(ray_session, tmp_path_factory):
    rule = get_rule("dqn")
    return train("dqn", "CartPole-v1", stop_steps=1, seed=0, runs_dir=tmp_path_factory.mktemp("prior"),
                 progress=False, overrides={k: str(v) for k, v in rule.smoke_overrides.items()}).run_dir


def test_prior_value_of_a_dqn_checkpoint_is_its_max_q(dqn_prior):
    prior = PriorValue(dqn_prior)
    assert prior.kind == "q_max"
    obs = torch.tensor(np.stack([gym.make("CartPole-v1").reset(seed=s)[0] for s in range(4)]))
    q = prior.policy.module.compute_q_values({Columns.OBS: obs})["qf_preds"]
    torch.testing.assert_close(prior(obs), q.max(dim=-1).values)


def test_prior_value_of_a_ppo_checkpoint_is_its_critic(ppo_cartpole_checkpoint):
    prior = PriorValue(ppo_cartpole_checkpoint)
    obs = torch.zeros(2, 4)
    assert prior.kind == "critic"
    torch.testing.assert_close(prior(obs), prior.policy.module.compute_values({Columns.OBS: obs}))


def test_the_first_baseline_is_the_prior(dqn_prior):
    config, _ = build_config(get_rule("prior_baseline"), "CartPole-v1", 0,
                             {"prior_checkpoint": str(dqn_prior), "prior_weight": "2"})
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    obs = torch.randn(5, 4) * 0.1
    expected = 2.0 * PriorValue(dqn_prior)(obs)  # V_phi's output layer starts at zero
    torch.testing.assert_close(module.compute_values({Columns.OBS: obs}), expected)
    assert module.prior_weight.requires_grad  # w is learned by default ...
    assert any(p is module.prior_weight for p in learner.get_parameters(module))  # ... by the learner's optimizer
    config, _ = build_config(get_rule("prior_baseline"), "CartPole-v1", 0,
                             {"prior_checkpoint": str(dqn_prior), "learn_prior_weight": "false"})
    fixed = config.build_learner(env=gym.make("CartPole-v1")).module["default_policy"]
    assert not fixed.prior_weight.requires_grad and float(fixed.prior_weight) == 1.0


def test_bad_options_are_refused(tmp_path):
    rule = get_rule("prior_baseline")
    with pytest.raises(UserError, match="needs prior_checkpoint"):
        build_config(rule, "CartPole-v1", 0, {})
    with pytest.raises(UserError, match="does not exist|no checkpoint"):
        build_config(rule, "CartPole-v1", 0, {"prior_checkpoint": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="unknown option 'observation_filter'"):
        build_config(rule, "CartPole-v1", 0, {"observation_filter": "MeanStdFilter"})
