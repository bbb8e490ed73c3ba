"""ResFiT (P103, algorithms/offpolicy/residual_rl.py): the composed action, the frozen BC base, the BC loss."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from algorithms.common.behavior_cloning import (
    FrozenMLP,
    bc_loss,
    collect_demonstrations,
    evaluate_policy,
    fit_behavior_cloning,
    to_unit_box,
)
from algorithms.offpolicy.residual_rl import ResidualActor, pendulum_demonstrator, residual_action


def test_residual_action_adds_the_scaled_residual_and_clips():
    base, residual = torch.tensor([0.5, -0.9]), torch.tensor([0.4, -1.0])
    # [0.5 + 0.5 * 0.4, -0.9 + 0.5 * -1.0] = [0.7, -1.4] -> clipped to [0.7, -1.0]
    torch.testing.assert_close(residual_action(base, residual, 0.5), torch.tensor([0.7, -1.0]))


def _tiny_actor() -> ResidualActor:
    actor = ResidualActor(obs_dim=1, act_dim=1, hidden=[], activation="relu", base_hidden=[], scale=0.5)
    with torch.no_grad():
        actor.base.weight0.fill_(1.0), actor.base.bias0.fill_(0.0)
        actor.residual[0].weight.copy_(torch.tensor([[0.5, 0.5]])), actor.residual[0].bias.fill_(0.0)
    return actor


def test_residual_actor_by_hand():
    actor = _tiny_actor()
    obs = torch.tensor([[0.5]])
    # a_base = tanh(1 * 0.5) = 0.462117;  a_res = tanh(0.5 * 0.5 + 0.5 * 0.462117) = tanh(0.481059) = 0.447091
    # a = 0.462117 + 0.5 * 0.447091 = 0.685663
    base = math.tanh(0.5)
    expected = base + 0.5 * math.tanh(0.25 + 0.5 * base)
    assert abs(expected - 0.685663) < 1e-5
    torch.testing.assert_close(actor(obs), torch.tensor([[expected]]))


def test_actor_gradient_reaches_only_the_residual():
    actor = _tiny_actor()
    assert [name for name, _ in actor.named_parameters()] == ["residual.0.weight", "residual.0.bias"]
    assert {name for name, _ in actor.named_buffers()} == {"base.weight0", "base.bias0"}
    actor(torch.tensor([[0.5]])).sum().backward()
    # d a / d b_res = 0.5 * (1 - tanh^2(0.481059)) = 0.5 * (1 - 0.447091^2) = 0.400055
    torch.testing.assert_close(actor.residual[0].bias.grad, torch.tensor([0.400055]), atol=1e-5, rtol=0)


def test_fresh_residual_is_zero_so_the_agent_starts_as_the_base():
    actor = ResidualActor(obs_dim=3, act_dim=1, hidden=[8, 8], activation="relu", base_hidden=[4], scale=0.5)
    with torch.no_grad():
        for buffer in actor.base.buffers():
            buffer.normal_()
    obs = torch.randn(5, 3)
    torch.testing.assert_close(actor(obs), actor.base(obs))


def test_bc_loss_by_hand():
    predicted, demo = torch.tensor([[0.5, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # per-row squared errors summed: [0.25 + 0, 1 + 0] -> mean 0.625
    torch.testing.assert_close(bc_loss(predicted, demo), torch.tensor(0.625))


def test_demonstrations_are_normalised_and_bc_fits_them():
    space = gym.spaces.Box(-2.0, 2.0, (1,))
    np.testing.assert_allclose(to_unit_box(np.array([[-2.0], [1.0]]), space), [[-1.0], [0.5]])
    demos = collect_demonstrations("Pendulum-v1", pendulum_demonstrator, episodes=2, noise_std=0.0, seed=0)
    assert demos["obs"].shape == (400, 3) and demos["actions"].shape == (400, 1)
    assert np.abs(demos["actions"]).max() <= 0.5 + 1e-6  # torque limited to 1 of 2
    policy, loss = fit_behavior_cloning(demos["obs"], demos["actions"], [32], steps=300, batch_size=64, lr=3e-3,
                                        seed=0)
    with torch.no_grad():
        initial = bc_loss(torch.zeros_like(torch.as_tensor(demos["actions"])), torch.as_tensor(demos["actions"]))
    assert loss < 0.5 * float(initial)
    frozen = FrozenMLP([3, 32, 1])
    frozen.load_from(policy)
    obs = torch.as_tensor(demos["obs"][:7])
    torch.testing.assert_close(frozen(obs), policy(obs))


def _learner(overrides=None):
    from ray.rllib.core import DEFAULT_MODULE_ID

    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule("residual_rl"), "Pendulum-v1", 0, {"train_batch_size": "8", **(overrides or {})})
    env = gym.make("Pendulum-v1")
    learner = config.build_learner(env=None, spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    return learner, learner.module[DEFAULT_MODULE_ID]


def _batch():
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(0)
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch({
        Columns.OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (8, 1)).astype(np.float32),
        Columns.REWARDS: rng.normal(size=8).astype(np.float32),
        Columns.NEXT_OBS: rng.normal(size=(8, 3)).astype(np.float32),
        Columns.TERMINATEDS: np.zeros(8, dtype=bool),
    })}, env_steps=8)


def test_critic_warmup_holds_the_residual():
    learner, module = _learner({"critic_warmup_steps": "2", "bc_steps": "10", "demo_episodes": "1"})
    residual, critic = [p.clone() for p in module.pi.residual.parameters()], [p.clone() for p in module.qf.parameters()]
    for _ in range(2):  # gradient steps 1, 2: critic only (step 2 would be an actor step without the warm-up)
        learner.update(batch=_batch(), timesteps={})
    assert all(torch.equal(a, b) for a, b in zip(residual, module.pi.residual.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic, module.qf.parameters()))
    for _ in range(2):  # steps 3, 4: the 4th is a delayed actor step after the warm-up
        learner.update(batch=_batch(), timesteps={})
    assert any(not torch.equal(a, b) for a, b in zip(residual, module.pi.residual.parameters()))


def test_default_bc_base_is_imperfect_and_frozen_through_updates():
    learner, module = _learner({"critic_warmup_steps": "0"})
    # The measured baseline of the learning check: the cloned base (deterministic, 10 episodes) scores well below
    # the check's threshold of -200 (about -350 at seed 0).
    base_return = evaluate_policy("Pendulum-v1", module.pi.base, episodes=10, seed=0)
    assert base_return < -250.0
    base = {k: v.clone() for k, v in module.pi.base.state_dict().items()}
    residual = [p.clone() for p in module.pi.residual.parameters()]
    for _ in range(2):  # policy_delay 2: the second step moves the residual actor
        learner.update(batch=_batch(), timesteps={})
    for key, value in module.pi.base.state_dict().items():
        torch.testing.assert_close(value, base[key])
        torch.testing.assert_close(module.target_pi.base.state_dict()[key], base[key])
    assert any(not torch.equal(a, b) for a, b in zip(residual, module.pi.residual.parameters()))


def test_env_without_demonstrator_is_refused():
    from algorithms.registry import build_config, get_rule
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="demonstrator"):
        build_config(get_rule("residual_rl"), "CartPole-v1", 0, {})
    with pytest.raises(UserError, match="residual_scale"):
        build_config(get_rule("residual_rl"), "Pendulum-v1", 0, {"residual_scale": "0"})
