"""RIPT (P229): leave-one-out advantages by hand, the RLOO connector, the SparseReach task, the Ray path."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing

from algorithms.common.rloo import grouped_rloo_advantages, is_informative_group, rloo_advantages
from algorithms.common.rloo_connector import RLOOConnector
from algorithms.registry import build_config, get_rule
from envs.sparse_reach import ENV_ID, context_cells


def test_leave_one_out_advantages_by_hand():
    # R = [1, 0, 0, 1], K = 4: the mean of the *other* three returns
    #   i=0: (0+0+1)/3 = 1/3 -> A = 1 - 1/3 = 2/3      i=1: (1+0+1)/3 = 2/3 -> A = 0 - 2/3 = -2/3
    #   i=2: -2/3 (same as i=1)                         i=3: 2/3 (same as i=0)
    np.testing.assert_allclose(rloo_advantages(np.array([1.0, 0.0, 0.0, 1.0])), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # One success in 8: A = 1 - 0 = 1 for it, 0 - 1/7 for each failure; they sum to 0.
    adv = rloo_advantages(np.array([0.0, 0, 0, 1, 0, 0, 0, 0]))
    np.testing.assert_allclose(adv, [-1 / 7] * 3 + [1.0] + [-1 / 7] * 4)
    assert adv.sum() == pytest.approx(0.0)
    assert rloo_advantages(np.array([1.0])).tolist() == [0.0]  # no other rollout, no baseline, no signal


def test_groups_are_baselined_separately():
    # context "a": [1, 0] -> [1 - 0, 0 - 1] = [1, -1]; context "b": [1, 1] -> [0, 0] (no signal)
    adv = grouped_rloo_advantages([1.0, 1.0, 0.0, 1.0], ["a", "b", "a", "b"])
    np.testing.assert_allclose(adv, [1.0, 0.0, -1.0, 0.0])


def test_dynamic_sampling_keeps_only_groups_with_signal():
    assert is_informative_group([0, 1, 0, 0])
    assert not is_informative_group([1, 1, 1, 1])  # all success
    assert not is_informative_group([0, 0, 0])  # all failure
    assert not is_informative_group([1])  # K < 2


class _Module:
    def is_stateful(self):
        return False


def _episode(context, rewards):
    n = len(rewards)
    return SingleAgentEpisode(
        observations=[np.zeros(4, np.float32)] * (n + 1), actions=[0] * n, rewards=list(rewards),
        infos=[{"context": context}] + [{}] * n, terminated=True, len_lookback_buffer=0,
    )


def test_connector_puts_each_episodes_advantage_on_its_rows():
    # Context 7: returns 1 and 0 -> A = +1, -1 ; context 9: returns 0, 0, 1 -> A = -1/2, -1/2, 1
    episodes = [_episode(7, [0, 0, 1]), _episode(9, [0, 0]), _episode(7, [0, 0]), _episode(9, [0]),
                _episode(9, [0, 1])]
    rewards = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.float32)  # rows in episode order
    batch = {"default_policy": {Columns.REWARDS: rewards}}
    out = RLOOConnector()(rl_module={"default_policy": _Module()}, batch=batch, episodes=episodes)
    expected = [1, 1, 1, -0.5, -0.5, -1, -1, -0.5, 1, 1]
    torch.testing.assert_close(out["default_policy"][Postprocessing.ADVANTAGES], torch.tensor(expected))
    torch.testing.assert_close(out["default_policy"][Postprocessing.VALUE_TARGETS],
                               torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.float32))


def test_sparse_reach_contexts_fix_the_initial_state_and_success_is_binary():
    env = gym.make(ENV_ID)
    env.unwrapped.set_context(42)
    first, info = env.reset(seed=1)
    again, info2 = env.reset(seed=2)  # a different reset seed, the same pinned context
    np.testing.assert_array_equal(first, again)
    assert info["context"] == info2["context"] == 42
    start, goal = context_cells(42, 7)
    # Walk straight to the goal: x first, then y. Reward 0 on the way, 1 and termination on arrival.
    moves = ([3] if goal[0] > start[0] else [2]) * abs(goal[0] - start[0])
    moves += ([0] if goal[1] > start[1] else [1]) * abs(goal[1] - start[1])
    for i, action in enumerate(moves):
        _, reward, terminated, truncated, _ = env.step(action)
        last = i == len(moves) - 1
        assert (reward, terminated, truncated) == ((1.0, True, False) if last else (0.0, False, False))
    # Never reaching the goal: truncated after max_steps with return 0.
    env.reset(options={"context": 42})
    away = 2 if goal[0] > start[0] else 3
    steps = 0
    while True:
        _, reward, terminated, truncated, _ = env.step(away)
        steps += 1
        assert reward == 0.0 and not terminated
        if truncated:
            break
    assert steps == env.unwrapped.max_steps


def test_bad_options_are_rejected():
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="rollouts_per_context"):
        build_config(get_rule("ript"), ENV_ID, 0, {"rollouts_per_context": "1"})
    with pytest.raises(UserError, match="max_context_attempts"):
        build_config(get_rule("ript"), ENV_ID, 0, {"contexts_per_batch": "8", "max_context_attempts": "4"})


def test_rollouts_share_their_context_and_only_signal_is_trained(ray_session):
    from algorithms.onpolicy.ript import rollout_contexts

    options = {"num_env_runners": "0", "contexts_per_batch": "3", "rollouts_per_context": "4",
               "max_context_attempts": "12", "minibatch_size": "32"}
    algo = build_config(get_rule("ript"), ENV_ID, 0, options)[0].build_algo()
    try:
        groups, _ = rollout_contexts(algo.env_runner_group.local_env_runner, [5, 9], 4)
        assert [len(g) for g in groups] == [4, 4]
        for context, group in zip([5, 9], groups):
            assert all(episode.get_infos(0)["context"] == context for episode in group)
            assert all(episode.is_done for episode in group)
            starts = [episode.get_observations(0) for episode in group]
            assert all(np.array_equal(starts[0], s) for s in starts)
        result = algo.train()
        ript = result["ript"]
        assert 1 <= ript["contexts_kept"] <= 3 and ript["contexts_kept"] <= ript["contexts_tried"] <= 12
        learner = algo.learner_group._learner
        names = [type(c).__name__ for c in learner._learner_connector.connectors]
        assert "RLOOConnector" in names and "GAEConnector" not in names
    finally:
        algo.stop()


@pytest.mark.parametrize("rule_name, env_id", [("ppo", "CartPole-v1"), ("ript", ENV_ID)])
def test_rloo_is_a_selectable_advantage_estimator(rule_name, env_id):
    # Any on-policy rule can swap GAE for the leave-one-out piece; RIPT uses it by default.
    overrides = {"advantage_estimator": "rloo"} if rule_name == "ppo" else {}
    config, _ = build_config(get_rule(rule_name), env_id, 0, overrides)
    learner = config.build_learner(env=gym.make(env_id))
    names = [type(piece).__name__ for piece in learner._learner_connector.connectors]
    assert "RLOOConnector" in names and "GAEConnector" not in names and "GeneralAdvantageEstimation" not in names
