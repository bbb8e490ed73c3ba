"""DQN + SPR (P133, algorithms/offpolicy/dqn_spr.py, algorithms/common/spr.py): the SPR loss and the combined loss
on hand-computed batches, the K-step sequence records, the pixel env, and the learner's target updates."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs.pixel_gridworld as pixel_grid
from algorithms.common.spr import sequence_records, spr_loss
from algorithms.offpolicy.dqn_spr import action_planes, dqn_spr_loss, sequence_schema

# B = 2 sequences, K = 2 steps, D = 2
PREDICTIONS = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])
TARGETS = torch.tensor([[[1.0, 1.0], [0.0, -1.0]], [[3.0, 4.0], [-1.0, 1.0]]])


def test_spr_loss_by_hand():
    # cosines: seq 0: [1/sqrt(2), -1];  seq 1: [1, 0]
    # all valid: -mean(1/sqrt(2) - 1, 1 + 0) = -(-0.292893 + 1) / 2 = -0.353553
    mask = torch.ones(2, 2)
    torch.testing.assert_close(spr_loss(PREDICTIONS, TARGETS, mask), torch.tensor(-(1 / math.sqrt(2) - 1 + 1) / 2))
    # step 2 of seq 0 past the episode's end: -mean(1/sqrt(2), 1) = -0.853553
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(spr_loss(PREDICTIONS, TARGETS, mask), torch.tensor(-(1 / math.sqrt(2) + 1) / 2))


def test_spr_loss_is_scale_free_and_stops_target_gradients():
    predictions = PREDICTIONS.clone().requires_grad_(True)
    targets = TARGETS.clone().requires_grad_(True)
    loss = spr_loss(predictions, targets, torch.ones(2, 2))
    torch.testing.assert_close(spr_loss(3.0 * PREDICTIONS, 0.5 * TARGETS, torch.ones(2, 2)), loss.detach())
    loss.backward()
    assert targets.grad is None and predictions.grad is not None


def test_dqn_spr_loss_by_hand():
    q = torch.tensor([[1.0, 2.0]])
    kwargs = dict(q_values=q, actions=torch.tensor([1]), rewards=torch.tensor([0.5]), terminateds=torch.tensor([False]),
                  next_q_target=torch.tensor([[3.0, 1.0]]), next_q_online=torch.tensor([[0.0, 5.0]]), gamma=0.5,
                  predictions=PREDICTIONS[:1], targets=TARGETS[:1], mask=torch.ones(1, 2))
    # double DQN: the online net picks a' = 1, the target net values it 1.0: y = 0.5 + 0.5 * 1 = 1.0
    # TD error Q(s, 1) - y = 2 - 1 = 1 -> Huber_1 = 0.5
    # SPR: -(1/sqrt(2) - 1) = 0.292893;  total = 0.5 + 2 * 0.292893 = 1.085786
    out = dqn_spr_loss(**kwargs, spr_weight=2.0)
    torch.testing.assert_close(out["dqn"], torch.tensor(0.5))
    torch.testing.assert_close(out["spr"], torch.tensor(1 - 1 / math.sqrt(2)))
    torch.testing.assert_close(out["total"], torch.tensor(0.5 + 2 * (1 - 1 / math.sqrt(2))))
    without = dqn_spr_loss(**kwargs, spr_weight=0.0)
    assert "spr" not in without
    torch.testing.assert_close(without["total"], torch.tensor(0.5))


class _Chunk:
    """The slice of RLlib's SingleAgentEpisode that sequence_records reads."""

    def __init__(self, observations, actions, rewards, terminated):
        self._obs, self._actions, self._rewards = observations, actions, rewards
        self.is_terminated = terminated

    def __len__(self):
        return len(self._actions)

    def get_observations(self):
        return self._obs

    def get_actions(self):
        return self._actions

    def get_rewards(self):
        return self._rewards


def test_sequence_records_by_hand():
    obs = np.arange(4, dtype=np.uint8).reshape(4, 1)  # o_0..o_3 of a 3-step terminated episode
    records = sequence_records([_Chunk(obs, np.array([2, 0, 3]), np.array([0.1, 0.2, 1.0]), True)], horizon=2)
    np.testing.assert_array_equal(records["obs"][..., 0], [[0, 1, 2], [1, 2, 3], [2, 3, 0]])
    np.testing.assert_array_equal(records["valid"], [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(records["action"], [[2, 0], [0, 3], [3, 0]])
    np.testing.assert_allclose(records["reward"], [[0.1, 0.2], [0.2, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(records["terminated"], [[0, 0], [0, 1], [1, 0]])
    # a chunk cut by the EnvRunner (not terminated): no termination flag, the same padding
    records = sequence_records([_Chunk(obs[:3], np.array([1, 1]), np.array([0.0, 0.0]), False)], horizon=2)
    np.testing.assert_array_equal(records["terminated"], np.zeros((2, 2)))
    np.testing.assert_array_equal(records["valid"], [[1, 1, 1], [1, 1, 0]])


def test_sequence_schema_round_trip():
    env = gym.make(pixel_grid.ENV_ID)
    schema = sequence_schema(env.observation_space, env.action_space, 5)
    obs, _ = env.reset(seed=0)
    batch = {"obs": np.stack([obs] * 6)[None], "action": np.zeros((1, 5), np.int64),
             "reward": np.zeros((1, 5), np.float32), "terminated": np.zeros((1, 5), bool),
             "valid": np.ones((1, 6), bool)}
    n, data = schema.encode(batch)
    assert n == 1 and len(data) == 6 * 24 * 24 + 5 * 8 + 5 * 4 + 5 + 6  # uint8 frames: 1 byte a pixel
    np.testing.assert_array_equal(schema.decode(data, 1)["obs"], batch["obs"])
    with pytest.raises(ValueError, match="uint8"):
        sequence_schema(gym.spaces.Box(0, 1, (3,)), env.action_space, 5)


def test_action_planes():
    planes = action_planes(torch.tensor([2, 0]), 3, 2, 2)
    assert planes.shape == (2, 3, 2, 2)
    assert planes[0, 2].eq(1).all() and planes[0, :2].eq(0).all() and planes[1, 0].eq(1).all()


def test_pixel_grid_draws_the_state_and_pays_on_the_goal():
    env = pixel_grid.PixelGridGoal(size=3, cell_pixels=2)
    env.reset(seed=0)
    env._agent, env._goal = np.array([0, 0]), np.array([0, 1])
    image = env.render_cells()
    assert image.shape == (1, 6, 6) and image.dtype == np.uint8
    assert (image[0, :2, :2] == 255).all() and (image[0, :2, 2:4] == 128).all() and image[0, 2:].sum() == 0
    _, reward, terminated, _, _ = env.step(2)  # left into the wall: stays, pays the step cost
    assert reward == pytest.approx(-0.02) and not terminated
    _, reward, terminated, _, _ = env.step(3)  # right onto the goal
    assert reward == 1.0 and terminated
    assert gym.make(pixel_grid.ENV_ID).spec.max_episode_steps == 50


def _learner(overrides):
    from ray.rllib.core import DEFAULT_MODULE_ID

    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule("dqn_spr"), pixel_grid.ENV_ID, 0, {"train_batch_size": "4", **overrides})
    env = gym.make(pixel_grid.ENV_ID)
    learner = config.build_learner(env=None, spaces={DEFAULT_MODULE_ID: (env.observation_space, env.action_space)})
    return learner, learner.module[DEFAULT_MODULE_ID]


def _batch():
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    rng = np.random.default_rng(0)
    data = {"obs": rng.integers(0, 256, (4, 6, 1, 24, 24)).astype(np.uint8), "action": rng.integers(0, 4, (4, 5)),
            "reward": rng.normal(size=(4, 5)).astype(np.float32), "terminated": np.zeros((4, 5), bool),
            "valid": np.ones((4, 6), bool)}
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=4)


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_spr_trains_the_transition_model_and_moves_the_ema_target():
    learner, module = _learner({"spr_momentum": "0.9"})
    transition, encoder, ema = _params(module.transition), _params(module.encoder), _params(module.ema_encoder)
    learner.update(batch=_batch(), timesteps={})
    assert any(not torch.equal(a, b) for a, b in zip(transition, module.transition.parameters()))
    # EMA: theta_m <- 0.9 theta_m + 0.1 theta (theta_m started equal to the initial theta)
    for before, old_online, online, target in zip(ema, encoder, module.encoder.parameters(),
                                                  module.ema_encoder.parameters()):
        torch.testing.assert_close(target, 0.9 * before + 0.1 * online.detach())
    assert not all(torch.equal(a, b) for a, b in zip(encoder, module.encoder.parameters()))


def test_without_spr_the_auxiliary_nets_stay_put():
    learner, module = _learner({"spr_weight": "0"})
    transition, ema = _params(module.transition), _params(module.ema_encoder)
    learner.update(batch=_batch(), timesteps={})
    assert all(torch.equal(a, b) for a, b in zip(transition, module.transition.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, module.ema_encoder.parameters()))


def test_env_runner_module_has_no_auxiliary_nets():
    _, module = _learner({})
    keys = module.get_state(inference_only=True).keys()
    assert all(k.startswith(("encoder.", "q_head.")) for k in keys)


def test_bad_spr_options_are_refused():
    from algorithms.registry import build_config, get_rule
    from rlfleet.errors import UserError

    for name, value in (("spr_momentum", "1"), ("spr_horizon", "0"), ("spr_weight", "-1")):
        with pytest.raises(UserError, match=name):
            build_config(get_rule("dqn_spr"), pixel_grid.ENV_ID, 0, {name: value})
