"""The replay's sequence records, n-step DQN targets and prioritised replay (algorithms/offpolicy/base.py, dqn.py),
against a real Redis (the embedded server of tests/conftest_replay.py) and through Ray."""

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from ray.rllib.core.columns import Columns

from algorithms.common.sequences import BEHAVIOUR_LOGP, chunk_windows, sequence_schema
from algorithms.offpolicy.base import (
    DISCOUNTS,
    REPLAY_INDEX,
    OffPolicyAlgorithmMixin,
    OffPolicyLearnerMixin,
    nstep_columns,
)
from algorithms.offpolicy.dqn import DQNRuleConfig, DQNRuleLearner, dqn_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError
from services.replay import ReplayClient, Sampler

# One chunk of 3 steps that ends the episode: observations 0, 1, 2, 3 (1-d), windows of L = 2.
OBS = np.array([[0.0], [1.0], [2.0], [3.0]])
ACTIONS = np.array([0, 1, 0])
REWARDS = np.array([1.0, 2.0, 3.0])
LOGP = np.log([0.5, 0.25, 0.5])


def _windows():
    return chunk_windows(OBS, ACTIONS, REWARDS, True, 2, LOGP)


def test_chunk_windows_by_hand():
    w = _windows()
    # window t holds s_t, s_t+1, s_t+2; the last one has one real step and repeats s_3 as padding.
    np.testing.assert_array_equal(w["obs"][:, :, 0], [[0, 1, 2], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(w["action"], [[0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(w["reward"], [[1, 2], [2, 3], [3, 0]])
    np.testing.assert_array_equal(w["terminated"], [[False, False], [False, True], [True, False]])
    np.testing.assert_array_equal(w["mask"], [[True, True], [True, True], [True, False]])
    np.testing.assert_allclose(w[BEHAVIOUR_LOGP], np.log([[0.5, 0.25], [0.25, 0.5], [0.5, 1.0]]))
    schema = sequence_schema(gym.spaces.Box(-5, 5, (1,)), gym.spaces.Discrete(2), 2, behaviour_logp=True)
    n, data = schema.encode(w)
    assert n == 3 and schema.decode(data, n)["mask"].tolist() == w["mask"].tolist()


def test_chunk_cut_by_the_runner_keeps_its_bootstrap():
    w = chunk_windows(OBS, ACTIONS, REWARDS, False, 2)  # the episode goes on in the next sample() call
    np.testing.assert_array_equal(w["terminated"], np.zeros((3, 2), bool))
    assert BEHAVIOUR_LOGP not in w


def test_nstep_columns_by_hand():
    cols = nstep_columns(_windows(), gamma=0.5)
    # R_0 = 1 + 0.5 * 2 = 2, bootstrap from s_2 with 0.25; R_1 = 2 + 0.5 * 3 = 3.5 (terminated);
    # R_2 = 3, one step, terminated, discount 0.5.
    np.testing.assert_allclose(cols[Columns.REWARDS], [2.0, 3.5, 3.0])
    np.testing.assert_allclose(cols[Columns.NEXT_OBS][:, 0], [2.0, 3.0, 3.0])
    np.testing.assert_array_equal(cols[Columns.TERMINATEDS], [False, True, True])
    np.testing.assert_allclose(cols[DISCOUNTS], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(cols[Columns.OBS][:, 0], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(cols[Columns.ACTIONS], [0, 1, 0])


def test_nstep_dqn_loss_with_importance_weights():
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    out = dqn_loss(q, torch.tensor([1, 0]), torch.tensor([2.0, 3.5]), torch.tensor([False, True]),
                   torch.tensor([[3.0, 1.0], [10.0, 10.0]]), torch.tensor([0.25, 0.25]),
                   weights=torch.tensor([1.0, 0.5]))
    # y = [2 + 0.25 * max(3, 1), 3.5 (terminated)] = [2.75, 3.5]; td = [2 - 2.75, 0.5 - 3.5] = [-0.75, -3]
    torch.testing.assert_close(out["target"], torch.tensor([2.75, 3.5]))
    torch.testing.assert_close(out["td_error"], torch.tensor([-0.75, -3.0]))
    # Huber: [0.5 * 0.5625, 3 - 0.5] = [0.28125, 2.5]; weighted mean (0.28125 + 0.5 * 2.5) / 2 = 0.765625
    torch.testing.assert_close(out["loss"], torch.tensor(0.765625))


def test_learner_records_and_pops_td_errors():
    learner = OffPolicyLearnerMixin.__new__(OffPolicyLearnerMixin)
    learner._td_records = []
    learner.record_td_errors({REPLAY_INDEX: torch.tensor([2, 0])}, torch.tensor([-0.5, 1.5]))
    learner.record_td_errors({}, torch.tensor([9.0]))  # no index column (uniform replay): nothing recorded
    learner.record_td_errors({REPLAY_INDEX: np.array([1])}, torch.tensor([-2.0]))
    index, td = learner.pop_td_errors()
    np.testing.assert_array_equal(index, [2, 0, 1])
    np.testing.assert_allclose(td, [0.5, 1.5, 2.0])
    assert len(learner.pop_td_errors()[0]) == 0


def test_priorities_from_td_errors_reach_redis(rclient, namespace):  # noqa: F811
    schema = sequence_schema(gym.spaces.Box(-5, 5, (1,)), gym.spaces.Discrete(2), 2)
    table = ReplayClient(rclient, namespace).create_table("t", schema, max_size=8,
                                                          sampler=Sampler.prioritized(alpha=1.0, beta=1.0), seed=0)
    w = {k: v for k, v in _windows().items() if k != BEHAVIOUR_LOGP}
    table.insert({k: np.concatenate([v, v[:1]]) for k, v in w.items()})  # keys 0..3
    sample = table.sample(4)

    class FakeLearner:
        def pop_td_errors(self):  # rows 0..3 of the sample, |TD| = 1, 1, 1, 7 (eps 0.5 added by the driver)
            return np.array([0, 1, 2, 3]), np.array([1.0, 1.0, 1.0, 7.0])

    group = SimpleNamespace(foreach_learner=lambda fn: [SimpleNamespace(get=lambda: fn(FakeLearner()))])
    algo = SimpleNamespace(replay_table=table, learner_group=group,
                           config=SimpleNamespace(prioritized_replay_eps=0.5))
    OffPolicyAlgorithmMixin._update_priorities(algo, sample.keys)
    leaves = np.frombuffer(rclient.getrange(table.prefix + "tree", 0, 4 * 8 - 1), dtype="<f8")
    expected = np.ones(4)  # inserted with the table's max priority (1); keys not sampled keep it
    for key, td in zip(sample.keys, [1.5, 1.5, 1.5, 7.5]):
        expected[key] = td  # alpha = 1: the leaf is the priority (a key sampled twice keeps its last value)
    assert not np.allclose(expected, 1.0)
    np.testing.assert_allclose(leaves, expected)
    # Importance weights: w_i = (N P(i))^-1 / max_j w_j with P(i) = leaf_i / total.
    s = table.sample(64)
    probs = expected[s.keys] / expected.sum()
    np.testing.assert_allclose(s.probabilities, probs)
    raw = 1.0 / (4 * probs)
    np.testing.assert_allclose(s.weights, raw / raw.max())


def test_options_are_checked():
    with pytest.raises(UserError, match="n_step"):
        build_config(get_rule("dqn"), "CartPole-v1", 0, {"n_step": "0"})
    with pytest.raises(UserError, match="prioritized_replay_beta"):
        build_config(get_rule("dqn"), "CartPole-v1", 0, {"prioritized_replay_beta": "1.5"})
    config, options = build_config(get_rule("dqn"), "CartPole-v1", 0, {"n_step": "3", "prioritized_replay": "true"})
    assert config.sequence_length() == 3 and config.replay_sampler().kind == "prioritized"
    # Defaults keep one-step transitions and uniform sampling.
    default, _ = build_config(get_rule("dqn"), "CartPole-v1", 0)
    assert default.sequence_length() == 0 and default.replay_sampler().kind == "uniform"


def test_a_loss_hook_that_ignores_replay_columns_refuses_them():
    class OtherLoss(DQNRuleLearner):
        def q_loss_terms(self, config, batch, fwd_out):
            raise NotImplementedError

    class OtherConfig(DQNRuleConfig):
        def get_default_learner_class(self):
            return OtherLoss

    config = OtherConfig().environment("CartPole-v1").training(n_step=3)
    with pytest.raises(ValueError, match="n_step > 1 is not implemented"):
        config.validate()
    config = OtherConfig().environment("CartPole-v1").training(prioritized_replay=True)
    with pytest.raises(ValueError, match="prioritized_replay is not implemented"):
        config.validate()


def test_nstep_prioritized_dqn_through_ray(ray_session):
    overrides = {"learning_starts": "64", "rollout_fragment_length": "128", "samples_per_insert": "1.0",
                 "n_step": "3", "prioritized_replay": "true"}
    config, _ = build_config(get_rule("dqn"), "CartPole-v1", 0, overrides)
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        table = algo.replay_table
        assert table.schema.names == ("obs", "action", "reward", "terminated", "mask")
        info = table.info()
        assert info["priority_updates"] > 0 and info["max_priority"] != 1.0
        assert np.isfinite(result["learners"]["default_policy"]["qf_loss"])
    finally:
        algo.stop()


def test_rbis_windows_carry_behaviour_probabilities(ray_session):
    config, _ = build_config(get_rule("dqn_rbis"), "CartPole-v1", 0, {"learning_starts": "5000",
                                                                        "rollout_fragment_length": "200"})
    algo = config.build_algo()
    try:
        algo.train()
        table = algo.replay_table
        # Below learning_starts the limiter refuses samples: read the first 32 records of the ring directly.
        raw = table.redis.getrange(table.prefix + "data:0", 0, 32 * table.schema.record_size - 1)
        data = table.schema.decode(raw, 32)
        # epsilon is still about 1 (1 -> 0.04 over 8k steps): mu(a|s) = eps / 2 or 1 - eps / 2, both near 0.5.
        mu = np.exp(data[BEHAVIOUR_LOGP][data["mask"]])
        assert np.all((mu > 0.48) & (mu < 0.52))
    finally:
        algo.stop()
