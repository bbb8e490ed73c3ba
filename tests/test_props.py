"""P050 PROPS: the behaviour-policy objective by hand, the two-policy module, the behaviour update's effect."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from algorithms.onpolicy.props import (
    PROPSConfig,
    PROPSModule,
    TargetPolicyLogProbs,
    _episode_data,
    join_chunks,
    props_behaviour_loss,
)
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

OBS_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)
MODEL = {"fcnet_hiddens": [8], "fcnet_activation": "tanh", "vf_share_layers": False}


def _module(inference_only=False):
    return RLModuleSpec(module_class=PROPSModule, observation_space=OBS_SPACE, action_space=gym.spaces.Discrete(2),
                        model_config=MODEL, inference_only=inference_only).build()


def test_behaviour_loss_by_hand():
    # One state twice, pi_theta = [.5, .5], pi_phi = [.25, .75]; observed actions 0 and 1.
    target = torch.zeros(2, 2)
    behaviour = torch.log(torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    terms = props_behaviour_loss(behaviour, target, torch.tensor([0, 1]), clip_eps=0.3, kl_coeff=0.1)
    # ratios: .25/.5 = .5 and .75/.5 = 1.5; clipped to [.7, 1.3]: .7 and 1.3; max(r, clip r) = .7 and 1.5; mean 1.1
    assert terms["clip_loss"].item() == pytest.approx(1.1)
    # KL(pi_theta || pi_phi) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    kl = 0.5 * math.log(4 / 3)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert terms["total_loss"].item() == pytest.approx(1.1 + 0.1 * kl, rel=1e-5)
    # k3: (r - 1) - ln r = (-.5 + ln 2) and (.5 - ln 1.5); their mean
    assert terms["approx_kl"].item() == pytest.approx(((-0.5 + math.log(2)) + (0.5 - math.log(1.5))) / 2, rel=1e-5)
    assert terms["clip_fraction"].item() == 1.0  # |r - 1| = .5 > .3 for both


def test_behaviour_gradient_lowers_observed_actions_until_the_clip():
    # At phi = theta the loss gradient lowers the probability of the observed action (the KL gradient is 0 there).
    logits = torch.zeros(1, 2, requires_grad=True)
    props_behaviour_loss(logits, torch.zeros(1, 2), torch.tensor([0]), clip_eps=0.3, kl_coeff=0.1)["total_loss"].backward()
    assert logits.grad[0, 0] > 0 > logits.grad[0, 1]  # gradient descent moves mass from action 0 to action 1
    # Once pi_phi(0) / pi_theta(0) = .5 < 1 - eps, the clipped term is flat: only the KL pulls back towards theta.
    logits = torch.log(torch.tensor([[0.25, 0.75]])).requires_grad_()
    props_behaviour_loss(logits, torch.zeros(1, 2), torch.tensor([0]), clip_eps=0.3, kl_coeff=0.0)["total_loss"].backward()
    torch.testing.assert_close(logits.grad, torch.zeros(1, 2))


def test_module_samples_with_the_behaviour_policy_and_evaluates_with_the_target():
    torch.manual_seed(0)
    module = _module()
    with torch.no_grad():
        module.behaviour_pi.net.mlp[-1].bias.add_(torch.tensor([5.0, -5.0]))
    batch = {Columns.OBS: torch.zeros(3, 2)}
    explore = module.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS]
    infer = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(explore, module.behaviour_logits(batch))
    torch.testing.assert_close(infer, module.target_logits(batch))
    assert not torch.allclose(explore, infer)
    module.reset_behaviour()
    torch.testing.assert_close(module.behaviour_logits(batch), module.target_logits(batch))


def test_env_runners_receive_both_policies_but_not_the_critic():
    state = _module().get_state(inference_only=True)
    assert any(k.startswith("behaviour_") for k in state) and not any(k.startswith("vf") for k in state)
    _module(inference_only=True).set_state(state)


def test_target_log_probs_replace_the_behaviour_ones():
    module = _module()
    obs = torch.randn(4, 2)
    actions = torch.tensor([0, 1, 1, 0])
    batch = {DEFAULT_MODULE_ID: {Columns.OBS: obs, Columns.ACTIONS: actions, Columns.ACTION_LOGP: torch.zeros(4)}}
    TargetPolicyLogProbs()(rl_module={DEFAULT_MODULE_ID: module}, batch=batch, episodes=[])
    expected = torch.log_softmax(module.target_logits({Columns.OBS: obs}), -1)[torch.arange(4), actions]
    torch.testing.assert_close(batch[DEFAULT_MODULE_ID][Columns.ACTION_LOGP], expected.detach())


def _episode(n, start=0):
    episode = SingleAgentEpisode(observation_space=OBS_SPACE, action_space=gym.spaces.Discrete(2))
    episode.add_env_reset(observation=np.full(2, start, np.float32))
    for t in range(n):
        episode.add_env_step(observation=np.full(2, start + t + 1, np.float32), action=t % 2, reward=1.0)
    return episode


def test_chunks_of_one_episode_are_joined():
    first = _episode(3)
    second = first.cut()
    for t in range(2):
        second.add_env_step(observation=np.full(2, 4 + t, np.float32), action=1, reward=1.0)
    other = _episode(1, start=10)
    joined = join_chunks([first.to_numpy(), other.to_numpy(), second.to_numpy()])
    assert sorted(len(e) for e in joined) == [1, 5]
    obs, actions = _episode_data(joined)
    assert len(obs) == len(actions) == 6
    long = next(e for e in joined if len(e) == 5)
    np.testing.assert_array_equal(np.asarray(long.get_observations())[:, 0], [0, 1, 2, 3, 4, 5])


def test_behaviour_update_makes_over_sampled_actions_less_likely():
    # The data over-samples action 0 in every state: the behaviour policy must now prefer action 1 relative to
    # pi_theta, and stay close to it (early stop on the KL).
    config = PROPSConfig().environment(observation_space=OBS_SPACE, action_space=gym.spaces.Discrete(2))
    config.rl_module(model_config=MODEL)
    learner = config.build_learner()
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    obs = np.random.default_rng(0).uniform(-1, 1, (256, 2)).astype(np.float32)
    actions = np.zeros(256, dtype=np.int64)
    stats = learner.behaviour_update(obs, actions)
    batch = {Columns.OBS: torch.as_tensor(obs)}
    with torch.no_grad():
        p_target = torch.softmax(module.target_logits(batch), -1)[:, 0]
        p_behaviour = torch.softmax(module.behaviour_logits(batch), -1)[:, 0]
    assert bool((p_behaviour < p_target).all())
    assert stats["behaviour_approx_kl"] < 0.2 and stats["behaviour_steps"] >= 1


def test_bad_options_are_rejected():
    with pytest.raises(UserError, match="props_clip"):
        build_config(get_rule("props"), "CartPole-v1", 0, {"props_clip": "0"})
    with pytest.raises(UserError, match="props_num_steps"):
        build_config(get_rule("props"), "CartPole-v1", 0, {"props_num_steps": "4096", "train_batch_size": "2048"})
    with pytest.raises(UserError, match="vf_share_layers"):
        build_config(get_rule("props"), "CartPole-v1", 0, {"vf_share_layers": "true"})
