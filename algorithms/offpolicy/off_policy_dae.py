"""P191: Pan & Schölkopf 2024, "Skill or Luck? Return Decomposition via Advantage Functions" (ICLR): Off-policy
Direct Advantage Estimation on replayed windows of the behaviour policy.

The decomposition (the paper's two-step view: the agent picks a_t, then "nature" picks s_{t+1}): along ANY trajectory

    sum_{t<n} gamma^t r_t + gamma^n V(s_n) - V(s_0) = sum_{t<n} gamma^t (A(s_t, a_t) + gamma B(s_t, a_t, s_{t+1}))
    skill  A(s, a)     = Q(s, a) - V(s),                         constraint  sum_a pi(a|s) A(s, a) = 0
    luck   B(s, a, s') = (r + gamma V(s') - Q(s, a)) / gamma,    constraint  E_{s'~p(.|s,a)} B(s, a, s') = 0

so the pi-centred A of the TARGET policy is learnt from behaviour data with no importance ratio and no trace cut:

    L(A, B, V) = E_{windows ~ replay}[ ( sum_{t<m} gamma^t (r_t - A_t - gamma B_t) + gamma^m (1 - d) V^-(s_m) - V(s_0) )^2 ]

(m <= L real steps of the window, d = the window ended the episode, V^- the target copy of V). Dropping B (the
"uncorrected" DAE, `luck_correction=False`) is the ablation the paper shows to be biased off-policy in stochastic
environments.

Parameterisation (choices the paper leaves to the implementation, ours):
- skill: A(s, a) = f(s, a) - max_a' f(s, a'): pi-centred for the greedy target policy pi(s) = argmax_a f(s, a)
  (policy iteration: A is the advantage of pi and pi is greedy in it); behaviour: epsilon-greedy in f, epsilon
  1 -> 0.04 over 8k steps as the dqn rule.
- luck: the paper approximates p(s'|s,a) with a generative model; ours is a conditional VAE with a K-way
  categorical latent (K = `luck_latents` = 4), summed exactly over z: encoder q(z|s, a, s', r, d), prior
  p(z|s, a), decoder mean of (s', r, d) given (s, a, z), loss sum_z q(z) 1/2 ||dec(s, a, z) - (s', r, d)||^2 +
  KL(q || p) (the KL drives p(.|s,a) to the average posterior over s', which is what centres B), and a head
  g(s, a, z):   B(s, a, s') = sum_z (q(z|s, a, s', r, d) - p(z|s, a)) g(s, a, z)   (q and p enter without gradient,
  so only g learns from the DAE loss; E_{s'} B = 0 whenever E_{s'} q(.|s,a,s') = p(.|s,a)).
- windows of L = `window` = 8 steps from the Redis replay, one per env step; loss on each window's first state; the
  model loss on every real step; all nets (f, V, encoder, prior, decoder, g: 128-128 ReLU MLPs) share one Adam.

The data path is the engine's: EnvRunners write windows (obs, action, reward, terminated, mask) into Redis, the
learner samples them at `samples_per_insert`. On deterministic CartPole-v1 (the learning check) the luck term should
vanish (every s' is determined by (s, a)); the stochastic case is checked by hand in tests/test_off_policy_dae.py.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import check_positive_ints, set_provided
from algorithms.common.traces import discounted_window_sum, window_terminated
from algorithms.offpolicy.base import OFFPOLICY_OPTIONS, OffPolicyAlgorithmMixin, OffPolicyConfigMixin, OffPolicyLearnerMixin
from algorithms.offpolicy.deterministic import _mlp
from algorithms.options import Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule

MASK = "mask"


def greedy_centred_advantage(f: torch.Tensor) -> torch.Tensor:
    """A(s, .) = f(s, .) - max_a f(s, a): zero at the greedy action, so sum_a pi(a|s) A(s, a) = 0 for greedy pi."""
    return f - f.max(dim=-1, keepdim=True).values


def centred_luck(posterior: torch.Tensor, prior: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B = sum_z (q(z) - p(z)) g(z) over the last axis; q and p carry no gradient."""
    return ((posterior.detach() - prior.detach()) * g).sum(dim=-1)


def off_policy_dae_loss(rewards: torch.Tensor, terminateds: torch.Tensor, mask: torch.Tensor,
                        advantages: torch.Tensor, luck: torch.Tensor, value_first: torch.Tensor,
                        value_bootstrap: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """P191's squared loss on windows: rewards/terminateds/mask/advantages (A(s_t, a_t))/luck (B_t) are [B, L],
    value_first = V(s_0), value_bootstrap = V^-(s_m) are [B]."""
    corrected, discount = discounted_window_sum(rewards - advantages - gamma * luck, mask, gamma)
    alive = 1.0 - window_terminated(terminateds, mask).to(corrected.dtype)
    residual = corrected + discount * alive * value_bootstrap.detach() - value_first
    return {"loss": (residual**2).mean(), "residual": residual.detach(), "value": value_first.detach()}


def cvae_loss(posterior_logits: torch.Tensor, prior_logits: torch.Tensor, reconstruction: torch.Tensor,
              outcome: torch.Tensor) -> torch.Tensor:
    """Per-row negative ELBO with an exact sum over K latents: reconstruction [N, K, D], outcome [N, D]."""
    posterior = posterior_logits.softmax(dim=-1)
    squared = 0.5 * ((reconstruction - outcome.unsqueeze(-2)) ** 2).sum(dim=-1)  # [N, K]
    kl = (posterior * (posterior_logits.log_softmax(-1) - prior_logits.log_softmax(-1))).sum(dim=-1)
    return (posterior * squared).sum(dim=-1) + kl


class OffPolicyDAEModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """f(s, .) for acting (all an EnvRunner holds); V, its target copy, the transition CVAE and the luck head g."""

    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"off_policy_dae needs a Discrete action space, got {self.action_space}")
        cfg = self.model_config
        hidden = list(cfg.get("fcnet_hiddens", [128, 128]))
        self.obs_dim = int(np.prod(self.observation_space.shape))
        self.num_actions = int(self.action_space.n)
        self.latents = int(cfg.get("luck_latents", 4))
        schedule = cfg.get("epsilon", [(0, 1.0), (8000, 0.04)])
        self._eps_t = np.array([p[0] for p in schedule], dtype=np.float64)
        self._eps_v = np.array([p[1] for p in schedule], dtype=np.float64)
        self.skill = _mlp([self.obs_dim, *hidden, self.num_actions], "relu")
        if not self.inference_only:
            a, k, d = self.num_actions, self.latents, self.obs_dim
            self.value = _mlp([d, *hidden, 1], "relu")
            self.encoder = _mlp([2 * d + a + 2, *hidden, k], "relu")
            self.prior = _mlp([d, *hidden, a * k], "relu")
            self.decoder = _mlp([d + a + k, *hidden, d + 2], "relu")
            self.luck = _mlp([d, *hidden, a * k], "relu")

    def epsilon(self, t: int | None) -> float:
        return float(np.interp(0 if t is None else t, self._eps_t, self._eps_v))

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.skill(batch[Columns.OBS].flatten(1)).argmax(dim=-1)}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        greedy = self._forward_inference(batch)[Columns.ACTIONS]
        explore = torch.rand(greedy.shape, device=greedy.device) < self.epsilon(t)
        random = torch.randint(0, self.num_actions, greedy.shape, device=greedy.device)
        return {Columns.ACTIONS: torch.where(explore, random, greedy)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {}  # the learner evaluates the nets on the windows itself

    def per_action(self, net: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The K outputs of an [A * K]-headed net for the taken actions: [N, K]."""
        out = net(obs).reshape(-1, self.num_actions, self.latents)
        return out.gather(1, actions.long().view(-1, 1, 1).expand(-1, 1, self.latents)).squeeze(1)

    def transition_terms(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor,
                         rewards: torch.Tensor, terminateds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows N: CVAE loss per row and the luck B(s, a, s') per row."""
        onehot_a = nn.functional.one_hot(actions.long(), self.num_actions).float()
        outcome = torch.cat([next_obs, rewards.unsqueeze(-1), terminateds.float().unsqueeze(-1)], dim=-1)
        posterior_logits = self.encoder(torch.cat([obs, onehot_a, outcome], dim=-1))
        prior_logits = self.per_action(self.prior, obs, actions)
        eye = torch.eye(self.latents, device=obs.device)
        n = obs.shape[0]
        decoder_in = torch.cat([obs.unsqueeze(1).expand(n, self.latents, -1),
                                onehot_a.unsqueeze(1).expand(n, self.latents, -1),
                                eye.unsqueeze(0).expand(n, -1, -1)], dim=-1)
        model = cvae_loss(posterior_logits, prior_logits, self.decoder(decoder_in), outcome)
        luck = centred_luck(posterior_logits.softmax(-1), prior_logits.softmax(-1), self.per_action(self.luck, obs, actions))
        return {"model_loss": model, "luck": luck}

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["value", "encoder", "prior", "decoder", "luck", "target_value"]

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_value = make_target_network(self.value)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.value, self.target_value)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"value": self.target_value(batch[Columns.OBS].flatten(1)).squeeze(-1)}


class OffPolicyDAELearner(OffPolicyLearnerMixin, TorchLearner):
    def build(self) -> None:
        super().build()
        for module_id in self.module.keys():
            self.module[module_id].unwrapped().make_target_networks()

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        window, actions = batch[Columns.OBS].float(), batch[Columns.ACTIONS]
        mask, rewards, terminateds = batch[MASK].bool(), batch[Columns.REWARDS].float(), batch[Columns.TERMINATEDS]
        size, length = actions.shape
        obs, next_obs = window[:, :length].reshape(size * length, -1), window[:, 1:].reshape(size * length, -1)
        flat_actions = actions.reshape(-1)
        advantages = greedy_centred_advantage(module.skill(obs)).gather(-1, flat_actions.long().unsqueeze(-1))
        advantages = advantages.reshape(size, length)
        valid = mask.reshape(-1)
        if config.luck_correction:
            terms = module.transition_terms(obs, flat_actions, next_obs, rewards.reshape(-1), terminateds.reshape(-1))
            luck = terms["luck"].reshape(size, length)
            model_loss = terms["model_loss"][valid].mean()
        else:
            luck, model_loss = torch.zeros_like(advantages), torch.zeros((), device=advantages.device)
        bootstrap_index = mask.long().sum(dim=-1)
        with torch.no_grad():
            bootstrap_obs = window[torch.arange(size, device=window.device), bootstrap_index]
            value_bootstrap = module.forward_target({Columns.OBS: bootstrap_obs})["value"]
        value_first = module.value(window[:, 0]).squeeze(-1)
        dae = off_policy_dae_loss(rewards, terminateds, mask, advantages, luck, value_first, value_bootstrap,
                                  config.gamma)
        loss = dae["loss"] + config.model_loss_coeff * model_loss
        self.metrics.log_dict({
            VF_LOSS_KEY: dae["loss"], POLICY_LOSS_KEY: dae["loss"], "model_loss": model_loss,
            "value_mean": dae["value"].mean(), "luck_abs_mean": luck.detach().abs()[mask].mean(),
            "advantage_mean": advantages.detach()[mask].mean(),
        }, key=module_id, window=1)
        return loss


class OffPolicyDAEConfig(OffPolicyConfigMixin, AlgorithmConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OffPolicyDAE)
        self._init_offpolicy()
        self.lr = 1e-3
        self.gamma = 0.99
        self.window = 8
        self.luck_correction = True
        self.luck_latents = 4
        self.model_loss_coeff = 1.0
        self.epsilon = [(0, 1.0), (8000, 0.04)]
        self.train_batch_size_per_learner = 64
        self.rollout_fragment_length = 256
        self.samples_per_insert = 8.0  # 32 gradient steps x 64 per 256 env steps
        self.num_steps_sampled_before_learning_starts = 1000
        self.replay_capacity = 100_000
        self.target_update_interval = 64
        self.tau = 1.0
        self.grad_clip = 10.0
        self.grad_clip_by = "global_norm"
        self.min_sample_timesteps_per_iteration = 0
        self.min_time_s_per_iteration = 0
        self._model_config = {"fcnet_hiddens": [128, 128]}

    def training(self, *, window: int = NotProvided, luck_correction: bool = NotProvided,
                 luck_latents: int = NotProvided, model_loss_coeff: float = NotProvided, tau: float = NotProvided,
                 num_steps_sampled_before_learning_starts: int = NotProvided, **kwargs) -> "OffPolicyDAEConfig":
        super().training(**kwargs)
        set_provided(self, window=window, luck_correction=luck_correction, luck_latents=luck_latents,
                     model_loss_coeff=model_loss_coeff, tau=tau,
                     num_steps_sampled_before_learning_starts=num_steps_sampled_before_learning_starts)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"luck_latents": self.luck_latents, "epsilon": self.epsilon}

    def validate(self) -> None:
        super().validate()
        self._validate_offpolicy()
        check_positive_ints(self, "window", "luck_latents")
        if self.model_loss_coeff < 0:
            self._value_error(f"model_loss_coeff must be >= 0, got {self.model_loss_coeff}")
        if not self.lr or self.lr <= 0:
            self._value_error(f"lr must be > 0, got {self.lr}")

    def sequence_length(self) -> int:
        return self.window

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=OffPolicyDAEModule, model_config=self.model_config)

    def get_default_learner_class(self):
        return OffPolicyDAELearner


class OffPolicyDAE(OffPolicyAlgorithmMixin, Algorithm):
    def _replay_columns(self, data):
        return {Columns.OBS: data["obs"], Columns.ACTIONS: data["action"], Columns.REWARDS: data["reward"],
                Columns.TERMINATEDS: data["terminated"], MASK: data["mask"]}


RULE = Rule(
    name="off_policy_dae",
    family="off-policy",
    paper_ids=("P191",),
    summary="Off-policy DAE (P191): skill/luck return decomposition, pi-centred advantages from replayed windows "
            "without importance sampling, luck from a categorical CVAE",
    config_class=OffPolicyDAEConfig,
    options=OFFPOLICY_OPTIONS + (
        Option("lr", "Adam step size", positive, "> 0"),
        Option("window", "steps per replayed window (the n of the n-step DAE loss)",
               lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
        Option("luck_correction", "learn the luck term B (false: uncorrected DAE, the paper's ablation)"),
        Option("luck_latents", "categories K of the transition model's latent",
               lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
        Option("model_loss_coeff", "weight of the transition model's loss", non_negative, ">= 0"),
    ),
    learning_check=LearningCheck(
        env="CartPole-v1", steps=100_000, threshold=475.0,
        source="the dqn rule's check (RL-Baselines3-Zoo DQN CartPole-v1, CartPole-v1's reward_threshold 475): P191 "
               "reports Off-policy DAE at least as sample-efficient as the replay baselines it compares with; budget "
               "100k = the zoo's 50k to learn + 50k for the window of the score (the mean of the last 100 training "
               "episodes)",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0, "window": 4},
)
