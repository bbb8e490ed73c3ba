"""ARO-DDPG (P211, algorithms/offpolicy/aro_ddpg.py): the differential TD loss on a hand-computed batch, and the
learner moving the gain rho with the critics."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from algorithms.common.average_reward import differential_td_error
from algorithms.offpolicy.aro_ddpg import aro_ddpg_losses

Q1, Q2 = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
REWARDS = torch.tensor([1.0, 0.5])
TERMINATEDS = torch.tensor([False, True])
NEXT_Q1, NEXT_Q2 = torch.tensor([4.0, 9.0]), torch.tensor([2.0, 1.0])


def test_differential_td_error_keeps_rho_and_drops_next_value_gradients():
    rho = torch.tensor(0.5, requires_grad=True)
    next_values = torch.tensor([2.0, 1.0], requires_grad=True)
    delta = differential_td_error(Q1, REWARDS, rho, TERMINATEDS, next_values)
    # [1 - 0.5 + 2 - 1, 0.5 - 0.5 + 0 (terminated) - 2] = [1.5, -2.0]
    torch.testing.assert_close(delta, torch.tensor([1.5, -2.0]))
    delta.sum().backward()
    assert rho.grad.item() == -2.0  # d/drho sum(delta) = -2
    assert next_values.grad is None  # the bootstrap value is a constant


def test_aro_ddpg_losses_by_hand():
    rho = torch.tensor(0.5, requires_grad=True)
    out = aro_ddpg_losses(Q1, Q2, rho, REWARDS, TERMINATEDS, NEXT_Q1, NEXT_Q2, q_of_policy=torch.tensor([3.0, -1.0]))
    # next value = min(Q1', Q2') = [2, 1]; bootstrap (1 - d) = [2, 0]
    # delta1 = [1 - .5 + 2 - 1, .5 - .5 + 0 - 2] = [1.5, -2];  delta2 = [1 - .5 + 2 - 0, .5 - .5 + 0 - 3] = [2.5, -3]
    # J = 1/2 (mean(2.25, 4) + mean(6.25, 9)) = 1/2 (3.125 + 7.625) = 5.375
    torch.testing.assert_close(out["critic"], torch.tensor(5.375))
    # J_mu = -mean(min_i Q_i(s, mu(s))) = -mean(3, -1) = -1
    torch.testing.assert_close(out["actor"], torch.tensor(-1.0))
    out["critic"].backward()
    # dJ/drho = -(mean(delta1) + mean(delta2)) = -(-0.25 + -0.25) = 0.5: a positive error mean (rewards above the
    # estimated gain) pushes rho up under gradient descent
    torch.testing.assert_close(rho.grad, torch.tensor(0.5))


def test_no_actor_loss_on_delayed_step():
    out = aro_ddpg_losses(Q1, Q2, torch.tensor(0.0), REWARDS, TERMINATEDS, NEXT_Q1, NEXT_Q2, q_of_policy=None)
    assert "actor" not in out


def _learner(overrides=None):
    from ray.rllib.core import DEFAULT_MODULE_ID

    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule("aro_ddpg"), "Pendulum-v1", 0,
                             {"train_batch_size": "8", "hidden_sizes": "8", **(overrides or {})})
    spaces = {DEFAULT_MODULE_ID: (gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (1,)))}
    learner = config.build_learner(env=None, spaces=spaces)
    return learner, learner.module[DEFAULT_MODULE_ID]


def _batch(reward: float):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(0)
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch({
        Columns.OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (8, 1)).astype(np.float32),
        Columns.REWARDS: np.full(8, reward, dtype=np.float32),
        Columns.NEXT_OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.TERMINATEDS: np.zeros(8, dtype=bool),
    })}, env_steps=8)


def test_learner_trains_rho_towards_the_reward_level():
    learner, module = _learner({"critic_lr": "1e-4", "rho_lr": "0.01"})
    assert module.rho.item() == 0.0
    for _ in range(20):
        learner.update(batch=_batch(5.0), timesteps={})
    # Rewards of 5 against a gain estimate of 0 and near-zero critics: the TD error is about +5, so rho climbs
    # (Adam: about rho_lr per step).
    assert 0.1 < module.rho.item() <= 0.2 + 1e-6


def test_rho_stays_off_the_env_runner_module():
    learner, module = _learner()
    state = module.get_state(inference_only=True)
    assert "rho" not in state and "rho" in module.get_state()


def test_gamma_is_not_an_option():
    from algorithms.registry import get_rule

    assert "gamma" not in get_rule("aro_ddpg").option_names()


def test_bad_rho_lr_is_refused():
    from algorithms.registry import build_config, get_rule
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="rho_lr"):
        build_config(get_rule("aro_ddpg"), "Pendulum-v1", 0, {"rho_lr": "0"})
