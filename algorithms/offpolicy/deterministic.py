"""Deterministic-actor actor-critic pieces DDPG (P171) and TD3 share: the RLModule (actor mu, one or two critics,
their target copies), the learner (critic and actor steps, delayed actor and target updates) and the losses.

RLlib's new API stack has neither DDPG nor TD3. Actions live in the normalised space [-1, 1]^k (the EnvRunner's
`normalize_actions` maps them to the env's bounds); the actor ends in tanh. Exploration adds N(0, sigma^2) noise to
mu(s) and clips to [-1, 1] (TD3's Gaussian noise; P171 used an Ornstein-Uhlenbeck process, see ddpg.py); the first
`random_warmup_steps` env steps of each EnvRunner act uniformly at random, as TD3 and SB3 do.

    y        = r + gamma (1 - d) min_{i in critics} Q_target_i(s', a~'),   a~' = mu_target(s') [+ clipped noise]
    J_Q      = sum_{i in critics} mean_B (Q_i(s, a) - y)^2
    J_mu     = -mean_B Q_1(s, mu(s))          (gradient reaches only the actor)
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

from algorithms.common.td_targets import clipped_double_q_target, smoothed_target_action
from algorithms.offpolicy.base import OffPolicyAlgorithmMixin, OffPolicyConfigMixin, OffPolicyLearnerMixin

CRITIC_OPTIMIZER, ACTOR_OPTIMIZER = "qf", "policy"


def deterministic_ac_losses(q1: torch.Tensor, q2: torch.Tensor | None, rewards: torch.Tensor,
                            terminateds: torch.Tensor, gamma: float, next_q1: torch.Tensor,
                            next_q2: torch.Tensor | None, q_of_policy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Critic loss (one critic, or TD3's clipped pair) and actor loss -mean Q_1(s, mu(s)) (None: no actor step)."""
    target = clipped_double_q_target(rewards, terminateds, gamma, next_q1, next_q1 if next_q2 is None else next_q2)
    critic = ((q1 - target) ** 2).mean()
    if q2 is not None:
        critic = critic + ((q2 - target) ** 2).mean()
    out = {"critic": critic, "target": target}
    if q_of_policy is not None:
        out["actor"] = -q_of_policy.mean()
    return out


def _mlp(sizes: list[int], activation: str, out_activation: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class DeterministicActorCriticModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """mu(s) in [-1, 1]^k and critics Q_i(s, a); EnvRunners hold only mu (inference_only)."""

    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(f"a deterministic actor needs a Box action space, got {self.action_space}")
        cfg = self.model_config
        hidden = list(cfg.get("fcnet_hiddens", [256, 256]))
        activation = cfg.get("fcnet_activation", "relu")
        obs_dim = int(np.prod(self.observation_space.shape))
        self.act_dim = int(np.prod(self.action_space.shape))
        self.pi = _mlp([obs_dim, *hidden, self.act_dim], activation, nn.Tanh())
        self.exploration_noise = float(cfg.get("exploration_noise", 0.1))
        self.random_warmup_steps = int(cfg.get("random_warmup_steps", 0))
        self.twin_q = bool(cfg.get("twin_q", True))
        if not self.inference_only:
            self.qf = _mlp([obs_dim + self.act_dim, *hidden, 1], activation)
            self.qf_twin = _mlp([obs_dim + self.act_dim, *hidden, 1], activation) if self.twin_q else None

    def q(self, net: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([obs.flatten(1), actions.flatten(1)], dim=-1)).squeeze(-1)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.pi(batch[Columns.OBS].flatten(1))}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        mu = self.pi(batch[Columns.OBS].flatten(1))
        if t is not None and t < self.random_warmup_steps:
            return {Columns.ACTIONS: torch.rand_like(mu) * 2.0 - 1.0}
        return {Columns.ACTIONS: torch.clamp(mu + self.exploration_noise * torch.randn_like(mu), -1.0, 1.0)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {}  # the learner evaluates the nets it needs (which depends on the step: critic only, or actor too)

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["qf", "qf_twin", "target_pi", "target_qf", "target_qf_twin"]

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_pi = make_target_network(self.pi)
        self.target_qf = make_target_network(self.qf)
        self.target_qf_twin = make_target_network(self.qf_twin) if self.twin_q else None

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.pi, self.target_pi), (self.qf, self.target_qf)]
        if self.twin_q:
            pairs.append((self.qf_twin, self.target_qf_twin))
        return pairs

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {Columns.ACTIONS: self.target_pi(batch[Columns.OBS].flatten(1))}


def module_spec(config) -> RLModuleSpec:
    return RLModuleSpec(module_class=DeterministicActorCriticModule, model_config=config.model_config)


class DeterministicActorCriticLearner(OffPolicyLearnerMixin, TorchLearner):
    """Critic step every gradient step; actor (and target) step every `policy_delay`-th one (1 for DDPG)."""

    def build(self) -> None:
        super().build()
        for module_id in self.module.keys():
            self.module[module_id].unwrapped().make_target_networks()

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id]
        critic_params = self.get_parameters(module.qf) + (self.get_parameters(module.qf_twin) if module.twin_q else [])
        self.register_optimizer(module_id=module_id, optimizer_name=CRITIC_OPTIMIZER,
                                optimizer=torch.optim.Adam(critic_params), params=critic_params,
                                lr_or_lr_schedule=config.critic_lr)
        actor_params = self.get_parameters(module.pi)
        self.register_optimizer(module_id=module_id, optimizer_name=ACTOR_OPTIMIZER,
                                optimizer=torch.optim.Adam(actor_params), params=actor_params,
                                lr_or_lr_schedule=config.actor_lr)

    def _policy_step(self) -> bool:
        # OffPolicyLearnerMixin counts finished steps; this one is number _gradient_steps + 1.
        return (self._gradient_steps + 1) % self.config.policy_delay == 0

    def _target_step(self, gradient_steps: int) -> bool:
        return gradient_steps % self.config.policy_delay == 0  # TD3: targets move with the actor

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        obs, actions = batch[Columns.OBS], batch[Columns.ACTIONS]
        next_obs = batch[Columns.NEXT_OBS]
        with torch.no_grad():
            next_actions = module.forward_target({Columns.OBS: next_obs})[Columns.ACTIONS]
            if config.target_noise > 0:
                next_actions = smoothed_target_action(next_actions, config.target_noise, config.target_noise_clip)
            next_q1 = module.q(module.target_qf, next_obs, next_actions)
            next_q2 = module.q(module.target_qf_twin, next_obs, next_actions) if module.twin_q else None
        q1 = module.q(module.qf, obs, actions)
        q2 = module.q(module.qf_twin, obs, actions) if module.twin_q else None
        q_of_policy = module.q(module.qf, obs, module.pi(obs.flatten(1))) if self._policy_step() else None
        losses = deterministic_ac_losses(q1, q2, batch[Columns.REWARDS], batch[Columns.TERMINATEDS], config.gamma,
                                         next_q1, next_q2, q_of_policy)
        self._pending = (module_id, losses)
        logged = {VF_LOSS_KEY: losses["critic"], "qf_mean": q1.mean().detach()}
        if "actor" in losses:
            logged[POLICY_LOSS_KEY] = losses["actor"]
        self.metrics.log_dict(logged, key=module_id, window=1)
        return losses["critic"] + losses.get("actor", 0.0)

    @override(TorchLearner)
    def compute_gradients(self, loss_per_module, **kwargs):
        """Critic gradients from J_Q; actor gradients from J_mu w.r.t. the actor's parameters only (the critic
        must not follow the actor's objective). On a delayed step the actor has no gradient and is not moved."""
        module_id, losses = self._pending
        module = self.module[module_id].unwrapped()
        for _, optimizer in self.get_optimizers_for_module(module_id):
            optimizer.zero_grad(set_to_none=True)
        losses["critic"].backward()
        if "actor" in losses:
            actor_params = list(module.pi.parameters())
            for param, grad in zip(actor_params, torch.autograd.grad(losses["actor"], actor_params)):
                param.grad = grad
        return {self.get_param_ref(p): p.grad for p in self.module[module_id].parameters() if p.grad is not None}


class DeterministicACConfig(OffPolicyConfigMixin, AlgorithmConfig):
    """Options of DDPG and TD3 (defaults: TD3, Fujimoto et al. 2018, with RL-Baselines3-Zoo's Pendulum settings)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self._init_offpolicy()
        self.actor_lr = self.critic_lr = 1e-3
        self.lr = None  # two optimizers with their own step sizes
        self.gamma = 0.98
        self.tau = 0.005
        self.twin_q = True
        self.policy_delay = 2
        self.target_noise = 0.2
        self.target_noise_clip = 0.5
        self.exploration_noise = 0.1
        # One gradient step on 128 transitions every second env step after 1k random steps (SB3's zoo: one on 256
        # every step after 10k): a quarter of the compute, which the shared 2-core machine needs for the check.
        self.train_batch_size_per_learner = 128
        self.rollout_fragment_length = 64
        self.samples_per_insert = 64.0
        self.num_steps_sampled_before_learning_starts = 1000
        self.random_warmup_steps = 1000
        self.replay_capacity = 200_000
        self.n_step = 1
        self.min_sample_timesteps_per_iteration = 500
        self.min_time_s_per_iteration = 0
        self._model_config = {"fcnet_hiddens": [400, 300], "fcnet_activation": "relu"}

    def training(self, *, actor_lr: float = NotProvided, critic_lr: float = NotProvided, twin_q: bool = NotProvided,
                 policy_delay: int = NotProvided, target_noise: float = NotProvided,
                 target_noise_clip: float = NotProvided, exploration_noise: float = NotProvided,
                 random_warmup_steps: int = NotProvided, num_steps_sampled_before_learning_starts: int = NotProvided,
                 tau: float = NotProvided, **kwargs) -> "DeterministicACConfig":
        super().training(**kwargs)
        for name, value in dict(actor_lr=actor_lr, critic_lr=critic_lr, twin_q=twin_q, policy_delay=policy_delay,
                                target_noise=target_noise, target_noise_clip=target_noise_clip,
                                exploration_noise=exploration_noise, random_warmup_steps=random_warmup_steps,
                                num_steps_sampled_before_learning_starts=num_steps_sampled_before_learning_starts,
                                tau=tau).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "twin_q": self.twin_q, "exploration_noise": self.exploration_noise,
            "random_warmup_steps": self.random_warmup_steps,
        }

    def validate(self) -> None:
        super().validate()
        self._validate_offpolicy()
        if self.actor_lr <= 0 or self.critic_lr <= 0:
            self._value_error(f"actor_lr and critic_lr must be > 0, got {self.actor_lr}, {self.critic_lr}")
        if self.policy_delay < 1:
            self._value_error(f"policy_delay must be >= 1, got {self.policy_delay}")
        for name in ("target_noise", "target_noise_clip", "exploration_noise", "random_warmup_steps"):
            if getattr(self, name) < 0:
                self._value_error(f"{name} must be >= 0, got {getattr(self, name)}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return module_spec(self)

    def get_default_learner_class(self):
        return DeterministicActorCriticLearner


class DeterministicACAlgorithm(OffPolicyAlgorithmMixin, Algorithm):
    pass
