"""The off-policy data path: EnvRunner actors write their transitions into the run's Redis table themselves."""

import uuid

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from algorithms.offpolicy.base import TABLE_NAME, transition_schema, transitions_from_episodes
from algorithms.registry import build_config, get_rule
from services.replay import ReplayClient


def test_transitions_from_episode_chunks():
    done = SingleAgentEpisode(observations=[np.array([0.0]), np.array([1.0]), np.array([2.0])], actions=[0, 1],
                              rewards=[1.0, 2.0], terminated=True, len_lookback_buffer=0)
    cut = SingleAgentEpisode(observations=[np.array([5.0]), np.array([6.0])], actions=[1], rewards=[3.0],
                             truncated=True, len_lookback_buffer=0)
    batch = transitions_from_episodes([done, cut])
    np.testing.assert_array_equal(batch["obs"][:, 0], [0.0, 1.0, 5.0])
    np.testing.assert_array_equal(batch["next_obs"][:, 0], [1.0, 2.0, 6.0])
    np.testing.assert_array_equal(batch["action"], [0, 1, 1])
    np.testing.assert_array_equal(batch["reward"], [1.0, 2.0, 3.0])
    # Only the real end of an episode stops the bootstrap; a truncated chunk keeps it.
    np.testing.assert_array_equal(batch["terminated"], [False, True, False])
    schema = transition_schema(gym.spaces.Box(-1, 1, (1,)), gym.spaces.Discrete(2))
    assert schema.encode(batch)[0] == 3


def test_schema_refuses_unsupported_spaces():
    with pytest.raises(ValueError, match="Discrete or Box action"):
        transition_schema(gym.spaces.Box(-1, 1, (1,)), gym.spaces.MultiDiscrete([2, 2]))


def _algo(name: str, namespace: str | None, **options):
    rule = get_rule(name)
    overrides = {"rollout_fragment_length": "100", **({"replay_namespace": namespace} if namespace else {}),
                 **{k: str(v) for k, v in options.items()}}
    config, _ = build_config(rule, rule.learning_check.env, 0, overrides)
    return config.build_algo()


def test_env_runners_fill_their_own_namespace(ray_session):
    a_ns, b_ns = f"test-a-{uuid.uuid4().hex[:8]}", f"test-b-{uuid.uuid4().hex[:8]}"
    a = _algo("dqn", a_ns, learning_starts=50_000)  # no learning: only inserts
    b = _algo("dqn", b_ns, learning_starts=50_000)
    try:
        sizes = []
        for _ in range(2):
            result = a.train()
            sizes.append(a.replay_table.size())
            assert sizes[-1] == result["env_runners"]["num_env_steps_sampled_lifetime"]
        assert 0 < sizes[0] < sizes[1]  # grows with every iteration
        assert a.replay_table.info()["samples"] == 0
        assert b.replay_table.size() == 0  # the other run's table saw none of it
        b.train()
        assert a.replay_table.size() == sizes[-1] and b.replay_table.size() > 0
        redis = a.replay_table.redis
        assert ReplayClient(redis, a_ns).tables() == [TABLE_NAME] == ReplayClient(redis, b_ns).tables()
        # Below learning_starts the rate limiter keeps the learner off the table.
        assert a.replay_table.try_sample(64) is None
    finally:
        a.stop()
        b.stop()
    # Named namespaces outlive the run (a resumed run finds its data); drop them here.
    for ns in (a_ns, b_ns):
        ReplayClient(redis, ns).drop_table(TABLE_NAME)


def test_rate_limiter_holds_the_replay_ratio_and_auto_namespace_is_dropped(ray_session):
    algo = _algo("td3", None, learning_starts=200, random_warmup_steps=100, samples_per_insert=2.0,
                 train_batch_size=32)
    table = algo.replay_table
    try:
        for _ in range(2):
            algo.train()
        info = table.info()
        limiter = table.options.rate_limiter
        assert info["samples"] > 0
        # Reverb's invariant: inserts * spi - samples stays inside the limiter's window.
        assert limiter.min_diff <= info["inserts"] * 2.0 - info["samples"] <= limiter.max_diff
        assert table.try_sample(32) is None  # the learner drained what the ratio allows; the next insert frees more
        # EnvRunners store the module's normalised actions ([-1, 1]), not the env's [-2, 2] torques.
        actions = algo.env_runner_group.foreach_env_runner(
            lambda runner: transitions_from_episodes(runner.sample(num_timesteps=300))["action"],
            local_env_runner=False)[0]
        assert actions.shape[1:] == (1,) and np.all(np.abs(actions) <= 1.0) and np.abs(actions).max() > 0.5
        assert algo.get_module() is not None
    finally:
        algo.stop()
    assert not table.redis.keys(table.prefix + "*")  # an auto-named run cleans up after itself
