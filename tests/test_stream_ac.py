"""P162 AVG (rule stream_ac): return-based TD scaling, the two per-transition losses and one update, by hand."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from algorithms.onpolicy.stream_ac import (
    EPISODE_END,
    NEXT_OBS,
    ReturnScaler,
    SquashedGaussian,
    StreamACConfig,
    avg_losses,
    episodes_to_stream,
    penultimate_normalize,
)
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError


def test_return_scaler_by_hand():
    scaler = ReturnScaler()
    scaler.push(1.0, 0.9, episode_end=False)
    # Var[r] = 0, Var[gamma_t] = 0, no return yet: the variance floor 1e-4 <= 0.01, so no scaling.
    assert scaler.sigma == 1.0
    scaler.push(3.0, 0.9, episode_end=True)
    # r_ent = [1, 3]: mean 2, population variance 1. gamma_t = [0.9, 0]: variance 0.2025. G = 4, E[G^2] = 16.
    # sigma = sqrt(1 + 0.2025 * 16) = sqrt(4.24).
    assert scaler.sigma == pytest.approx(math.sqrt(4.24))
    assert scaler.episode_return == 0.0  # the next episode's return starts afresh
    copy = ReturnScaler()
    copy.load(scaler.state())
    assert copy.sigma == scaler.sigma


def test_losses_by_hand():
    one = torch.tensor([1.0])
    terms = avg_losses(one, torch.tensor([2.0]), torch.tensor([-1.0]), 0.5, False, torch.tensor([1.5]),
                       torch.tensor([-0.5]), gamma=0.9, alpha=0.1, sigma=2.0)
    # target = 0.5 + 0.9 (2 - 0.1 * (-1)) = 2.39; delta = (2.39 - 1) / 2 = 0.695; loss 0.483025.
    assert float(terms["td_error"]) == pytest.approx(0.695)
    assert float(terms["critic_loss"]) == pytest.approx(0.483025)
    # policy: alpha log pi(a~) - Q(s, a~) = 0.1 (-0.5) - 1.5 = -1.55.
    assert float(terms["policy_loss"]) == pytest.approx(-1.55)
    ended = avg_losses(one, torch.tensor([2.0]), torch.tensor([-1.0]), 0.5, True, torch.tensor([1.5]),
                       torch.tensor([-0.5]), gamma=0.9, alpha=0.1, sigma=2.0)
    assert float(ended["critic_loss"]) == pytest.approx(0.0625)  # no bootstrap: ((0.5 - 1) / 2)^2


def test_penultimate_normalisation_and_deterministic_action():
    torch.testing.assert_close(penultimate_normalize(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    dist = SquashedGaussian.from_logits(torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(dist.to_deterministic().sample(), torch.tanh(torch.tensor([[2.0]])))


def test_episode_chunks_become_a_time_ordered_stream():
    first = SingleAgentEpisode(observations=[np.array([0.0]), np.array([1.0]), np.array([2.0])],
                               actions=[np.array([0.1]), np.array([0.2])], rewards=[1.0, 2.0],
                               extra_model_outputs={Columns.ACTION_LOGP: [-0.1, -0.2]}, terminated=True,
                               len_lookback_buffer=0)
    second = SingleAgentEpisode(observations=[np.array([5.0]), np.array([6.0])], actions=[np.array([0.3])],
                                rewards=[3.0], extra_model_outputs={Columns.ACTION_LOGP: [-0.3]},
                                len_lookback_buffer=0)
    stream = episodes_to_stream([first, second])
    np.testing.assert_allclose(stream[Columns.OBS][:, 0], [0.0, 1.0, 5.0])
    np.testing.assert_allclose(stream[NEXT_OBS][:, 0], [1.0, 2.0, 6.0])
    np.testing.assert_allclose(stream[Columns.REWARDS], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(stream[Columns.ACTION_LOGP], [-0.1, -0.2, -0.3], rtol=1e-6)
    assert stream[Columns.TERMINATEDS].tolist() == [False, True, False]
    assert stream[EPISODE_END].tolist() == [False, True, False]  # the second chunk goes on next time


def test_one_transition_is_one_adam_step_of_each_loss():
    config = StreamACConfig().environment("Pendulum-v1")
    learner = config.build_learner(env=gym.make("Pendulum-v1"))
    module = learner.module["default_policy"]
    dist_cls = module.get_train_action_dist_cls()
    s, s_next, a = torch.tensor([[0.1, -0.2, 0.3]]), torch.tensor([[0.2, -0.1, 0.0]]), torch.tensor([[0.4]])
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    # The same losses built by hand, with the learner's random draws (same seed, same order of draws).
    torch.manual_seed(7)
    with torch.no_grad():
        a_next, logp_next = dist_cls.from_logits(module.action_dist_inputs(s_next)).sample_and_logp()
        q_next = module.q_value(s_next, a_next)
    a_new, logp_new = dist_cls.from_logits(module.action_dist_inputs(s)).rsample_and_logp()
    terms = avg_losses(module.q_value(s, a), q_next, logp_next, -1.0, False, module.q_value(s, a_new), logp_new,
                       gamma=config.gamma, alpha=config.alpha, sigma=1.0)  # first transition: sigma = 1
    actor = [n for n, _ in module.named_parameters() if n.startswith(("actor.", "pi."))]
    critic = [n for n, _ in module.named_parameters() if n.startswith(("critic.", "q."))]
    params = dict(module.named_parameters())
    actor_grads = torch.autograd.grad(terms["policy_loss"], [params[n] for n in actor])
    critic_grads = torch.autograd.grad(terms["critic_loss"], [params[n] for n in critic])

    batch = {Columns.OBS: s, NEXT_OBS: s_next, Columns.ACTIONS: a, Columns.REWARDS: torch.tensor([-1.0]),
             Columns.TERMINATEDS: torch.tensor([False]), EPISODE_END: torch.tensor([False]),
             Columns.ACTION_LOGP: torch.tensor([-0.9])}
    torch.manual_seed(7)
    learner._uncompiled_update({"default_policy": batch})
    # Adam's first step with beta1 = 0: lr * g / (|g| + eps) = lr * sign(g) wherever g is not ~0.
    for names, grads, lr in ((actor, actor_grads, config.actor_lr), (critic, critic_grads, config.critic_lr)):
        for name, g in zip(names, grads):
            step = params[name].detach() - before[name]
            expected = -lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-6)


def test_bad_options_are_refused():
    rule = get_rule("stream_ac")
    with pytest.raises(UserError, match="adam_beta1 must be in"):
        build_config(rule, "Pendulum-v1", 0, {"adam_beta1": "1"})
    with pytest.raises(UserError, match="one EnvRunner with one env"):
        build_config(rule, "Pendulum-v1", 0, {"num_env_runners": "2"})
