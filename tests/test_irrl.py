"""P178 IRRL: the reward functions and the discriminator loss by hand, the internal reward in the learner's
pipeline (it must reach the advantages), and the glimpse task."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing

from algorithms.onpolicy.irrl import LABEL, TRAJECTORY, IRRLConfig, discriminator_loss, internal_reward
from algorithms.registry import build_config, get_rule
from envs.glimpse_classification import ENV_ID, GlimpseClassification
from rlfleet.errors import UserError


def test_reward_functions_by_hand():
    q = torch.tensor([0.1, 0.25, 0.7])  # q(y | tau); K = 4 -> p(y) = .25
    torch.testing.assert_close(internal_reward(q, 4, "clipped_linear"), torch.tensor([0.0, 0.0, 0.45]))
    torch.testing.assert_close(internal_reward(q, 4, "linear"), torch.tensor([-0.15, 0.0, 0.45]))
    torch.testing.assert_close(internal_reward(q, 4, "log"), torch.tensor([math.log(0.4), 0.0, math.log(2.8)]))
    torch.testing.assert_close(internal_reward(q, 4, "clipped_log"), torch.tensor([0.0, 0.0, math.log(2.8)]))
    # The point of the linear form: bounded below where the log reward explodes for a confidently wrong q.
    assert internal_reward(torch.tensor([1e-6]), 4, "linear").item() > -0.25
    assert internal_reward(torch.tensor([1e-6]), 4, "log").item() < -10
    with pytest.raises(ValueError, match="unknown reward kind"):
        internal_reward(q, 4, "accuracy")


def test_discriminator_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # -log q(y): row 0 q(0) = 1/2 -> ln 2; row 1 q(1) = 1/4 -> ln 4; mean (ln 2 + ln 4) / 2
    terms = discriminator_loss(logits, torch.tensor([0, 1]))
    assert terms["disc_loss"].item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-5)
    assert terms["disc_accuracy"].item() == 0.5  # row 0 right (argmax 0), row 1 wrong


def _episode(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    episode = SingleAgentEpisode(observation_space=env.observation_space, action_space=env.action_space)
    episode.add_env_reset(observation=obs, infos={})
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        episode.add_env_step(observation=obs, action=action, reward=reward, infos=info, terminated=terminated,
                             extra_model_outputs={Columns.ACTION_LOGP: np.float32(0.0),
                                                  Columns.ACTION_DIST_INPUTS: np.zeros(5, np.float32)})
    return episode.to_numpy(), obs, info["label"]


def test_internal_reward_replaces_the_env_reward_and_reaches_the_value_targets():
    env = GlimpseClassification()
    config = IRRLConfig().environment(observation_space=env.observation_space, action_space=env.action_space)
    learner = config.build_learner()
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    episodes, finals, labels = [], [], []
    for seed, actions in ((0, [0, 3]), (1, [2, 4])):
        episode, final_obs, label = _episode(env, actions, seed)
        episodes.append(episode)
        finals.append(final_obs)
        labels.append(label)
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={},
                                       metrics=learner.metrics)[DEFAULT_MODULE_ID]
    with torch.no_grad():
        q = torch.softmax(module.discriminator(torch.as_tensor(np.array(finals))), -1)[[0, 1], labels]
    expected = torch.clamp(q - 0.25, min=0.0)  # clipped linear, K = 4
    # Rows: episode 0 = [step 0, step 1, phantom], episode 1 = [step 0, step 1, phantom].
    rewards = torch.as_tensor(batch[Columns.REWARDS])
    torch.testing.assert_close(rewards, torch.tensor([0.0, expected[0], 0.0, 0.0, expected[1], 0.0]))
    # gamma = 1, terminated: the last step's value target is its reward alone.
    targets = torch.as_tensor(batch[Postprocessing.VALUE_TARGETS])
    torch.testing.assert_close(targets[[1, 4]], expected, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(batch[LABEL]), [-1, labels[0], -1, -1, labels[1], -1])
    torch.testing.assert_close(torch.as_tensor(batch[TRAJECTORY])[[1, 4]], torch.as_tensor(np.array(finals)))


def test_glimpse_task_pointer_then_target_identifies_the_label():
    env = GlimpseClassification(noise=0.0)
    obs, _ = env.reset(seed=3)
    assert obs[0] == 1.0 and obs[3:].sum() == 0.0
    obs, reward, terminated, _, info = env.step(0)  # the pointer
    target = 1 + int(np.argmax(obs[3 + 5 : 3 + 9]))
    assert not terminated and reward == 0.0 and info == {}
    obs, reward, terminated, _, info = env.step(target)
    assert terminated and reward == 1.0
    second = obs[3 + 9 :]
    assert second[target] == 1.0 and int(np.argmax(second[5:])) == info["label"]
    # Looking at a wrong candidate instead: it shows nothing, the trajectory does not identify the label.
    env.reset(seed=3)
    env.step(0)
    obs, reward, _, _, _ = env.step(1 + target % 4)
    assert reward == 0.0 and obs[3 + 9 + 5 :].sum() == 0.0


def test_random_glimpses_rarely_identify_the_label():
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(0)
    hits = []
    for seed in range(4000):
        env.reset(seed=seed)
        env.step(int(rng.integers(5)))
        hits.append(env.step(int(rng.integers(5)))[1])
    assert abs(np.mean(hits) - (1 - (4 / 5) ** 2)) < 0.025  # 1 - (L / (1 + L))^2 with L = 4


def test_bad_options_are_rejected():
    with pytest.raises(UserError, match="irrl_reward"):
        build_config(get_rule("irrl"), ENV_ID, 0, {"irrl_reward": "accuracy"})
    with pytest.raises(UserError, match="irrl_num_classes"):
        build_config(get_rule("irrl"), ENV_ID, 0, {"irrl_num_classes": "1"})
