"""Poppy (P206): the winner-only loss on a hand-computed batch, the columns it is fed, the population env/module."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian, TorchMultiCategorical
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.postprocessing.episodes import add_one_ts_to_episodes_and_truncate

import envs.knapsack
import envs.population
from algorithms.onpolicy.poppy import (
    POPPY_INSTANCE_WEIGHT, POPPY_MEMBER_ACTED, POPPY_MEMBER_RETURNS, RULE, PoppyColumns, PoppyConfig,
    PopulationModule, poppy_loss, shared_baseline_loss,
)
from envs.knapsack import KnapsackEnv, greedy_value, optimal_value


def test_poppy_loss_by_hand():
    # Two instances, K = 3 members. Rows 0, 1 (+ phantom 2) are instance A, row 3 (+ phantom 4) is instance B.
    # A: member returns [1.0, 3.0, 2.5] -> k* = 1, margin 3.0 - 2.5 = 0.5. B: [2.0, 0.0, 1.0] -> k* = 0, margin 1.0.
    member_logp = torch.tensor(
        [[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], [-9.0, -9.0, -9.0], [-0.7, -0.8, -0.9], [-9.0, -9.0, -9.0]],
        requires_grad=True,
    )
    returns = torch.tensor([[1.0, 3.0, 2.5]] * 3 + [[2.0, 0.0, 1.0]] * 2)
    acted = torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3])  # phantom rows never act
    weight = torch.full((5,), 0.5)  # N = 2 instances
    terms = poppy_loss(member_logp, returns, acted, weight)
    # loss = -(1/2) [0.5 (-0.2 - 0.5) + 1.0 (-0.7)] = -(1/2)(-0.35 - 0.7) = 0.525
    assert terms["policy_loss"].item() == pytest.approx(0.525)
    terms["policy_loss"].backward()
    expected = np.zeros((5, 3))
    expected[0, 1] = expected[1, 1] = -0.25  # -(1/2) * 0.5: only the winner's log-probs get a gradient
    expected[3, 0] = -0.5
    np.testing.assert_allclose(member_logp.grad.numpy(), expected)
    np.testing.assert_allclose(terms["winner_margin"].numpy(), [0.5, 0.5, 0.5, 1.0, 1.0])


def test_poppy_loss_skips_rows_where_the_winner_had_finished_and_ties():
    member_logp = torch.tensor([[-0.1, -0.2], [-0.3, -0.4]], requires_grad=True)
    returns = torch.tensor([[5.0, 2.0], [5.0, 2.0]])
    acted = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # the winner (member 0) was done at row 1
    terms = poppy_loss(member_logp, returns, acted, torch.ones(2))
    assert terms["policy_loss"].item() == pytest.approx(3.0 * 0.1)  # -(5 - 2) * (-0.1), row 0 only
    tied = poppy_loss(member_logp, torch.tensor([[2.0, 2.0], [2.0, 2.0]]), torch.ones(2, 2), torch.ones(2))
    assert tied["policy_loss"].item() == 0.0  # a tie at the top: no update


def test_shared_baseline_loss_by_hand():
    # One instance, K = 2 attempts of the same policy: returns [3, 1], mean 2 -> advantages [1, -1].
    member_logp = torch.tensor([[-0.5, -1.0], [-0.25, -2.0], [-9.0, -9.0]], requires_grad=True)
    returns = torch.tensor([[3.0, 1.0]] * 3)
    acted = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    terms = shared_baseline_loss(member_logp, returns, acted, torch.ones(3))
    # -(1/(1*2)) [1 (-0.5 - 0.25) - 1 (-1.0 - 2.0)] = -(1/2)(2.25) = -1.125
    assert terms["policy_loss"].item() == pytest.approx(-1.125)
    terms["policy_loss"].backward()
    np.testing.assert_allclose(member_logp.grad.numpy(), [[-0.5, 0.5], [-0.5, 0.5], [0.0, 0.0]])


def _episode(infos, rewards, obs_dim):
    episode = SingleAgentEpisode()
    episode.add_env_reset(observation=np.zeros(obs_dim, np.float32), infos=infos[0])
    for t, reward in enumerate(rewards):
        episode.add_env_step(observation=np.zeros(obs_dim, np.float32), action=np.zeros(2, np.int64),
                             reward=reward, infos=infos[t + 1], terminated=t == len(rewards) - 1)
    return episode


def test_columns_come_from_the_final_member_returns_and_active_flags():
    # Instance A: 3 steps; member 1 stops acting after step 0 and member 0 wins 2.0 vs 1.5.
    a_infos = [
        {"member_returns": np.zeros(2), "member_active": np.array([True, True])},
        {"member_returns": np.array([0.5, 1.5]), "member_active": np.array([True, True])},
        {"member_returns": np.array([1.0, 1.5]), "member_active": np.array([True, False])},
        {"member_returns": np.array([2.0, 1.5]), "member_active": np.array([True, False])},
    ]
    # Instance B: 2 steps; member 1 wins 3.0 vs 1.0 and acted in both steps.
    b_infos = [
        {"member_returns": np.zeros(2), "member_active": np.array([True, True])},
        {"member_returns": np.array([1.0, 1.0]), "member_active": np.array([True, True])},
        {"member_returns": np.array([1.0, 3.0]), "member_active": np.array([True, True])},
    ]
    episodes = [_episode(a_infos, [1.5, 0.0, 0.5], 4), _episode(b_infos, [1.0, 2.0], 4)]
    add_one_ts_to_episodes_and_truncate(episodes)  # as the learner pipeline does: one phantom row each
    batch = {"default_policy": {Columns.OBS: torch.zeros(7, 4)}}
    out = PoppyColumns()(rl_module=None, batch=batch, episodes=episodes)["default_policy"]
    np.testing.assert_allclose(out[POPPY_MEMBER_RETURNS].numpy(), [[2.0, 1.5]] * 4 + [[1.0, 3.0]] * 3)
    np.testing.assert_allclose(out[POPPY_MEMBER_ACTED].numpy(),
                               [[1, 1], [1, 0], [1, 0], [0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(out[POPPY_INSTANCE_WEIGHT].numpy(), [0.5] * 7)


def test_population_env_gives_every_member_the_same_instance():
    env = gym.make(envs.population.ENV_ID, base_env=envs.knapsack.ENV_ID, population_size=3)
    obs, info = env.reset(seed=0)
    d = env.unwrapped.member_observation_space.shape[0]
    members = obs.reshape(3, d)
    np.testing.assert_array_equal(members[0], members[1])
    np.testing.assert_array_equal(members[0], members[2])
    total = 0.0
    done = False
    while not done:
        obs, reward, done, _, info = env.step(np.array([1, 0, 1]))
        total += reward
    returns = info["member_returns"]
    assert returns[1] == 0.0  # always skipping packs nothing
    assert returns[0] == returns[2] > 0  # same instance, same actions, same value
    assert total == pytest.approx(returns.max())  # the episode return is the population's best
    second, _ = env.reset(seed=0)
    assert not np.array_equal(second, obs) and not np.array_equal(second[:d], members[0])  # the stream goes on


def test_population_env_freezes_members_that_finished():
    env = gym.make(envs.population.ENV_ID, base_env="CartPole-v1", population_size=2)
    env.reset(seed=3)
    actives = []
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([0, 1] if len(actives) % 2 else [0, 0]))
        actives.append(info["member_active"].copy())
    actives = np.array(actives)
    # Member 0 always pushes left and falls first; member 1 alternates and lasts longer.
    first_done = int(np.argmin(actives[:, 0]))
    assert first_done > 0 and not actives[first_done:, 0].any() and actives[:, 1].all()
    assert info["member_returns"][0] == first_done and info["member_returns"][1] == len(actives)


@pytest.mark.parametrize("discrete", [True, False])
def test_member_log_probs_split_the_joint_log_prob(discrete):
    k = 3
    obs_space = gym.spaces.Box(-1.0, 1.0, (k * 5,), np.float32)
    act_space = gym.spaces.MultiDiscrete([2] * k) if discrete else gym.spaces.Box(-1.0, 1.0, (k * 2,), np.float32)
    module = PopulationModule(observation_space=obs_space, action_space=act_space,
                              model_config={"population_size": k, "fcnet_hiddens": [8]})
    obs = torch.randn(4, k * 5)
    inputs = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    dist = module.get_train_action_dist_cls().from_logits(inputs)
    actions = dist.sample()
    per_member = module.member_log_probs(inputs, actions)
    assert per_member.shape == (4, k)
    torch.testing.assert_close(per_member.sum(-1), dist.logp(actions))
    # Member k's log-prob only depends on member k's observation: the heads are separate policies.
    moved = obs.clone()
    moved[:, 5:10] += 1.0
    per_member_moved = module.member_log_probs(module.forward_train({Columns.OBS: moved})[Columns.ACTION_DIST_INPUTS],
                                               actions)
    torch.testing.assert_close(per_member_moved[:, [0, 2]], per_member[:, [0, 2]])
    assert not torch.allclose(per_member_moved[:, 1], per_member[:, 1])
    assert isinstance(dist, TorchMultiCategorical if discrete else TorchDiagGaussian)


def test_phase_one_ties_the_heads_and_untie_clones_head_zero():
    k = 3
    module = PopulationModule(observation_space=gym.spaces.Box(-1.0, 1.0, (k * 4,), np.float32),
                              action_space=gym.spaces.MultiDiscrete([2] * k),
                              model_config={"population_size": k, "fcnet_hiddens": [8]})
    members = torch.randn(1, 4).repeat(1, k)  # every member sees the same observation
    tied = module.member_outputs(members)
    torch.testing.assert_close(tied[:, 1], tied[:, 0])  # phase 1: one policy
    with torch.no_grad():
        module.head_weight[1] += 1.0  # a head that phase 1 never used
    module.untie()
    assert float(module.tied) == 0.0 and "tied" in module.state_dict()
    untied = module.member_outputs(members)
    torch.testing.assert_close(untied, tied)  # the clones start where the pre-trained policy was


def test_config_wraps_the_env_and_checks_options():
    config = PoppyConfig().environment("Knapsack10-v0").training(population_size=5)
    config.validate()
    assert config.env == envs.population.ENV_ID
    assert config.env_config == {"base_env": "Knapsack10-v0", "population_size": 5}
    assert config.wrapped_base_env == "Knapsack10-v0"
    assert config.model_config["population_size"] == 5
    for changes, message in [({"population_size": 1}, "population_size"), ({"num_epochs": 3}, "num_epochs"),
                             ({"batch_mode": "truncate_episodes"}, "complete_episodes")]:
        bad = PoppyConfig().environment("Knapsack10-v0")
        for key, value in changes.items():
            setattr(bad, key, value)
        with pytest.raises(ValueError, match=message):
            bad.validate()


def test_knapsack_rewards_and_references():
    env = KnapsackEnv(num_items=3, capacity=1.0)
    env.reset(seed=0)
    env.weights, env.values = np.array([0.6, 0.5, 0.3]), np.array([0.9, 0.8, 0.2])
    _, r0, _, _, _ = env.step(1)  # packs item 0 (0.6 <= 1.0)
    _, r1, _, _, _ = env.step(1)  # item 1 no longer fits (0.5 > 0.4): nothing packed
    _, r2, done, _, _ = env.step(1)  # item 2 fits (0.3 <= 0.4)
    assert (r0, r1, r2, done) == (0.9, 0.0, 0.2, True)
    # best subset {0, 2} = 1.1 ({1, 2} = 1.0; {0, 1} is too heavy); greedy by ratio: 1.6 (item 1), 1.5, 0.67 -> {1, 2}
    assert optimal_value(env.weights, env.values, 1.0) == pytest.approx(1.1)
    assert greedy_value(env.weights, env.values, 1.0) == pytest.approx(1.0)


def test_threshold_is_within_five_percent_of_the_optimum():
    rng = np.random.default_rng(0)
    instances = [(rng.random(10), rng.random(10)) for _ in range(1000)]
    optimum = np.mean([optimal_value(w, v, 2.5) for w, v in instances])
    greedy = np.mean([greedy_value(w, v, 2.5) for w, v in instances])
    assert 3.7 < optimum < 3.85 and greedy < optimum
    assert 0.94 * optimum <= RULE.learning_check.threshold < greedy  # about 95% of the optimum, below greedy
