"""TD3's and DDPG's losses (algorithms/offpolicy/deterministic.py) on hand-computed batches."""

import torch

from algorithms.common.td_targets import polyak_update, smoothed_target_action
from algorithms.offpolicy.deterministic import deterministic_ac_losses

Q1, Q2 = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
REWARDS = torch.tensor([1.0, 0.5])
TERMINATEDS = torch.tensor([False, True])
NEXT_Q1, NEXT_Q2 = torch.tensor([4.0, 9.0]), torch.tensor([2.0, 1.0])


def test_td3_clipped_double_q_with_zero_smoothing_noise():
    # Smoothing noise set to zero: a~' = mu'(s') exactly.
    mu_next = torch.tensor([[0.3], [-0.7]])
    torch.testing.assert_close(smoothed_target_action(mu_next, 0.2, 0.5, noise=torch.zeros_like(mu_next)), mu_next)
    out = deterministic_ac_losses(Q1, Q2, REWARDS, TERMINATEDS, 0.5, NEXT_Q1, NEXT_Q2,
                                  q_of_policy=torch.tensor([3.0, -1.0]))
    # y = r + 0.5 (1 - d) min(Q1', Q2') = [1 + 0.5 * min(4, 2), 0.5] = [2.0, 0.5]
    torch.testing.assert_close(out["target"], torch.tensor([2.0, 0.5]))
    # J_Q = mean((1-2)^2, (2-0.5)^2) + mean((0-2)^2, (3-0.5)^2) = 1.625 + 5.125 = 6.75
    torch.testing.assert_close(out["critic"], torch.tensor(6.75))
    # J_mu = -mean(Q1(s, mu(s))) = -mean(3, -1) = -1
    torch.testing.assert_close(out["actor"], torch.tensor(-1.0))


def test_delayed_step_has_no_actor_loss():
    out = deterministic_ac_losses(Q1, Q2, REWARDS, TERMINATEDS, 0.5, NEXT_Q1, NEXT_Q2, q_of_policy=None)
    assert "actor" not in out


def test_ddpg_single_critic_target():
    out = deterministic_ac_losses(Q1, None, REWARDS, TERMINATEDS, 0.5, NEXT_Q1, None, q_of_policy=None)
    # y = [1 + 0.5 * 4, 0.5] = [3.0, 0.5]; L = mean((1-3)^2, (2-0.5)^2) = mean(4, 2.25) = 3.125
    torch.testing.assert_close(out["target"], torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(out["critic"], torch.tensor(3.125))


def test_smoothing_noise_is_clipped_then_the_action():
    mu_next = torch.tensor([0.9, -0.2])
    # eps = clip(0.2 * [3.0, -0.1], -0.5, 0.5) = [0.5, -0.02];  a~ = clip([1.4, -0.22], -1, 1) = [1.0, -0.22]
    smoothed = smoothed_target_action(mu_next, 0.2, 0.5, noise=torch.tensor([3.0, -0.1]))
    torch.testing.assert_close(smoothed, torch.tensor([1.0, -0.22]))


def test_polyak_update():
    online, target = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), online.bias.fill_(2.0), target.weight.fill_(0.0), target.bias.fill_(-2.0)
    polyak_update(online, target, 0.25)
    # 0.25 * 1 + 0.75 * 0 = 0.25;  0.25 * 2 + 0.75 * -2 = -1.0
    assert target.weight.item() == 0.25 and target.bias.item() == -1.0


def _learner_and_batch(rule_name: str):
    import gymnasium as gym
    import numpy as np
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule(rule_name), "Pendulum-v1", 0, {"train_batch_size": "8", "hidden_sizes": "8"})
    spaces = {DEFAULT_MODULE_ID: (gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (1,)))}
    learner = config.build_learner(env=None, spaces=spaces)
    rng = np.random.default_rng(0)
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch({
        Columns.OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (8, 1)).astype(np.float32),
        Columns.REWARDS: rng.normal(size=8).astype(np.float32),
        Columns.NEXT_OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.TERMINATEDS: np.zeros(8, dtype=bool),
    })}, env_steps=8)
    return learner, learner.module[DEFAULT_MODULE_ID], batch


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(before, net):
    return any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_td3_delays_actor_and_target_updates():
    learner, module, batch = _learner_and_batch("td3")  # policy_delay = 2
    pi, qf, target_pi, target_qf = (_snapshot(module.pi), _snapshot(module.qf), _snapshot(module.target_pi),
                                    _snapshot(module.target_qf))
    learner.update(batch=batch, timesteps={})  # gradient step 1: critics only
    assert _changed(qf, module.qf) and not _changed(pi, module.pi)
    assert not _changed(target_pi, module.target_pi) and not _changed(target_qf, module.target_qf)
    learner.update(batch=batch, timesteps={})  # gradient step 2: actor and targets too
    assert _changed(pi, module.pi) and _changed(target_pi, module.target_pi) and _changed(target_qf, module.target_qf)


def test_ddpg_moves_actor_and_targets_every_step():
    learner, module, batch = _learner_and_batch("ddpg")
    assert module.qf_twin is None
    pi, target_qf = _snapshot(module.pi), _snapshot(module.target_qf)
    learner.update(batch=batch, timesteps={})
    assert _changed(pi, module.pi) and _changed(target_qf, module.target_qf)
