"""DQN + SPR: P133, Schwarzer, Anand, Goel, Hjelm, Courville & Bachman 2021, "Data-Efficient Reinforcement Learning
with Self-Predictive Representations" (ICLR), the self-predictive auxiliary loss on a DQN learner from pixels.

Networks: a conv encoder f (online) and its EMA copy f_m; a Q head whose first linear layer g is also SPR's
projection (the paper's DQN/Rainbow choice), with its EMA copy g_m; a predictor q (linear); a conv transition model
h(z, a) on the encoder's feature map with the action as one-hot planes. On a replayed sequence
(o_0, a_0, r_0, d_0, ..., a_{K-1}, o_K):

    L_DQN = Huber_1(Q(o_0, a_0) - y),   y = r_0 + gamma (1 - d_0) Q_tgt(o_1, argmax_a Q(o_1, a))   (double DQN, n = 1)
    z^_0 = f(o_0),   z^_k = h(z^_{k-1}, a_{k-1}),   y^_k = q(g(z^_k)),   y~_k = g_m(f_m(o_k))      (k = 1..K)
    L_SPR = -sum_{k=1..K} mean_B m_k cos(y^_k, y~_k)         (m_k = 0 past the episode's end: common/spr.py)
    L     = L_DQN + lambda L_SPR;   theta_m <- tau theta_m + (1 - tau) theta after every gradient step (f, g)
    Q_tgt <- Q every `target_update_interval` gradient steps (hard copy, tau_dqn = 1)

`spr_weight` (lambda) = 0 is the same learner without SPR (the baseline of the learning check).

Replay: the K-step sequences come from the Redis replay like every off-policy rule's data, but as their own table
(`sequences`, made here; base.py's transition table is not used): each EnvRunner turns its episode chunks into one
record per env step holding o_t..o_{t+K} (uint8 pixels, no float copies), a_t..a_{t+K-1}, rewards, termination
flags and the validity mask, and inserts them itself; the learner samples records uniformly with the table's rate
limiter (samples per insert), exactly as base.py's loop does for transitions. A record stores K + 1 frames (the
price of sampling sequences in one Redis call); sequences crossing the end of an EnvRunner's chunk are masked
there (their continuation is in the next chunk), which drops a few late SPR targets per chunk.

Measured so far (seed 0, this learner in an in-process loop with the same hyperparameters, 100-episode mean
returns at 4k / 8k / 12k env steps): without SPR -0.14 / -0.21 / 0.22; with SPR lambda 2: -0.25 / -0.63 / (run
stopped at 8k); lambda 0.1: -0.27 / -0.60 / -0.19. SPR did not help on this task at this budget (one seed each). A
suspect: the DQN loss here is tiny (rewards of -0.02 and 1) while lambda sum_k cos reaches -lambda K, so the
auxiliary gradient dominates the shared encoder (the paper's Rainbow agent has a cross-entropy loss of order 1 on
clipped Atari rewards); lambda 0.1 was still behind. The learning check below is the measured baseline, not lowered
to pass: it does not pass yet.

Paper values kept: K = 5, lambda = 2, tau = 0.99 (the no-augmentation setting), first Q-head layer as projection,
linear predictor, cosine similarity. Choices the paper leaves open or that differ for a 30x30 one-channel task,
ours: plain double DQN with one-step targets (the paper's agent is Rainbow: distributional, dueling, noisy nets,
10-step returns, priorities), no data augmentation (random shifts would move the grid's cells), no latent
renormalisation or batch norm in the transition model, a 2-layer conv encoder (16 4x4/2, 32 3x3/2) and a 128-unit
Q head, Adam 5e-4, batch 32, one gradient step every 4 env steps (the paper: 2 per step; CPU budget), target copy
every 250 gradient steps, epsilon 1 -> 0.05 over the first 5k env steps.
"""

from __future__ import annotations

import math
import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)
from torch import nn

import envs.pixel_gridworld  # noqa: F401  (registers PixelGridGoal-v0 wherever the config is unpickled)
from algorithms.common.config_fields import set_provided
from algorithms.common.spr import sequence_records, spr_loss
from algorithms.common.td_targets import polyak_update
from algorithms.offpolicy.base import (
    OFFPOLICY_OPTIONS,
    OffPolicyAlgorithmMixin,
    OffPolicyConfigMixin,
    OffPolicyLearnerMixin,
    ReplayTarget,
)
from algorithms.offpolicy.dqn import dqn_loss
from algorithms.options import Option, non_negative, positive, unit_interval
from algorithms.rule import LearningCheck, Rule
from services.replay import Field, ReplayClient, Sampler, Schema
from services.replay.connection import REDIS_URL_ENV, embedded_server, redis_from_env

SEQUENCE_TABLE = "sequences"


def sequence_schema(observation_space: gym.Space, action_space: gym.Space, horizon: int) -> Schema:
    """K + 1 uint8 frames, K discrete actions / rewards / terminations, K + 1 validity flags per record."""
    if not isinstance(observation_space, gym.spaces.Box) or observation_space.dtype != np.uint8:
        raise ValueError(f"dqn_spr learns from uint8 images, got the observation space {observation_space}")
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"dqn_spr needs a Discrete action space, got {action_space}")
    return Schema([
        Field("obs", "uint8", (horizon + 1, *observation_space.shape)), Field("action", "int64", (horizon,)),
        Field("reward", "float32", (horizon,), finite=True), Field("terminated", "bool", (horizon,)),
        Field("valid", "bool", (horizon + 1,)),
    ])


def collect_sequences_into_replay(runner: Any, target: ReplayTarget, num_steps: int, horizon: int) -> dict[str, Any]:
    """Runs inside an EnvRunner: sample, insert one K-step sequence record per env step, return the metrics."""
    records = sequence_records(runner.sample(num_timesteps=num_steps), horizon)
    inserted = len(records["reward"]) if records else 0
    if inserted:
        target.open(runner).insert(records, timeout=target.timeout_s)
    return {"inserted": inserted, "metrics": runner.get_metrics()}


def action_planes(actions: torch.Tensor, num_actions: int, height: int, width: int) -> torch.Tensor:
    """[B] actions -> [B, A, H, W] one-hot planes (the transition model's action input)."""
    one_hot = F.one_hot(actions.long(), num_actions).float()
    return one_hot[:, :, None, None].expand(-1, -1, height, width)


def dqn_spr_loss(q_values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, terminateds: torch.Tensor,
                 next_q_target: torch.Tensor, next_q_online: torch.Tensor | None, gamma: float,
                 predictions: torch.Tensor | None, targets: torch.Tensor | None, mask: torch.Tensor | None,
                 spr_weight: float) -> dict[str, torch.Tensor]:
    """L_DQN on the first step of each sequence plus lambda L_SPR (predictions/targets [B, K, D], mask [B, K])."""
    terms = dqn_loss(q_values, actions, rewards, terminateds, next_q_target, gamma, next_q_online=next_q_online)
    total = terms["loss"]
    out = {"dqn": terms["loss"], "q_taken": terms["q_taken"]}
    if spr_weight > 0:
        out["spr"] = spr_loss(predictions, targets, mask)
        total = total + spr_weight * out["spr"]
    out["total"] = total
    return out


class SPRQModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Conv encoder + Q head (what EnvRunners hold); learner side: transition model, predictor, target copies."""

    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"dqn_spr needs a Discrete action space, got {self.action_space}")
        cfg = self.model_config
        channels = self.observation_space.shape[0]
        self.num_actions = int(self.action_space.n)
        hidden = int(cfg.get("q_hidden", 128))
        self.encoder = nn.Sequential(nn.Conv2d(channels, 16, 4, stride=2), nn.ReLU(),
                                     nn.Conv2d(16, 32, 3, stride=2), nn.ReLU())
        with torch.no_grad():
            self.latent_shape = tuple(self.encoder(torch.zeros(1, *self.observation_space.shape)).shape[1:])
        flat = int(np.prod(self.latent_shape))
        # q_head[:2] (flatten + first linear) is SPR's projection g.
        self.q_head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, self.num_actions))
        self.epsilon_initial = float(cfg.get("epsilon_initial", 1.0))
        self.epsilon_final = float(cfg.get("epsilon_final", 0.05))
        self.epsilon_timesteps = int(cfg.get("epsilon_timesteps", 5000))
        if not self.inference_only:
            c = self.latent_shape[0]
            self.transition = nn.Sequential(nn.Conv2d(c + self.num_actions, 32, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(32, c, 3, padding=1), nn.ReLU())
            self.predictor = nn.Linear(hidden, hidden)

    def encode(self, obs: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        return (encoder or self.encoder)(obs.float() / 255.0)

    def project(self, latent: torch.Tensor, q_head: nn.Module | None = None) -> torch.Tensor:
        return (q_head or self.q_head)[:2](latent)

    def step_latent(self, latent: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        planes = action_planes(actions, self.num_actions, latent.shape[-2], latent.shape[-1])
        return self.transition(torch.cat([latent, planes], dim=1))

    def epsilon(self, t: int) -> float:
        fraction = min(1.0, max(0, t) / max(1, self.epsilon_timesteps))
        return self.epsilon_initial + fraction * (self.epsilon_final - self.epsilon_initial)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: self.q_head(self.encode(batch[Columns.OBS])).argmax(dim=-1)}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        greedy = self._forward_inference(batch)[Columns.ACTIONS]
        random = torch.randint_like(greedy, self.num_actions)
        explore = torch.rand(greedy.shape) < self.epsilon(int(t or 0))
        return {Columns.ACTIONS: torch.where(explore, random, greedy)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {}  # the learner runs the sequence computation itself

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["transition", "predictor", "target_encoder", "target_q_head", "ema_encoder", "ema_q_head"]

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        self.target_encoder = make_target_network(self.encoder)  # DQN's target (hard copies)
        self.target_q_head = make_target_network(self.q_head)
        self.ema_encoder = make_target_network(self.encoder)  # SPR's EMA target (every step)
        self.ema_q_head = make_target_network(self.q_head)

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.q_head, self.target_q_head)]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.ema_encoder), (self.q_head, self.ema_q_head)]

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"q_target": self.target_q_head(self.encode(batch[Columns.OBS], self.target_encoder))}


class DQNSPRLearner(OffPolicyLearnerMixin, TorchLearner):
    def build(self) -> None:
        super().build()
        for module_id in self.module.keys():
            self.module[module_id].unwrapped().make_target_networks()

    @override(TorchLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id]
        params = [p for net in (module.encoder, module.q_head, module.transition, module.predictor)
                  for p in self.get_parameters(net)]
        self.register_optimizer(module_id=module_id, optimizer_name="default", optimizer=torch.optim.Adam(params),
                                params=params, lr_or_lr_schedule=config.lr)

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        obs, actions = batch["obs"], batch["action"]  # [B, K + 1, C, H, W] uint8, [B, K]
        horizon = actions.shape[1]
        latent = module.encode(obs[:, 0])
        q_values = module.q_head(latent)
        with torch.no_grad():
            next_q_target = module.forward_target({Columns.OBS: obs[:, 1]})["q_target"]
            next_q_online = module.q_head(module.encode(obs[:, 1])) if config.double_q else None
        predictions = targets = mask = None
        if config.spr_weight > 0:
            steps = []
            for k in range(horizon):
                latent = module.step_latent(latent, actions[:, k])
                steps.append(module.predictor(module.project(latent)))
            predictions = torch.stack(steps, dim=1)
            with torch.no_grad():
                future = obs[:, 1:].flatten(0, 1)
                targets = module.project(module.encode(future, module.ema_encoder), module.ema_q_head)
                targets = targets.view(obs.shape[0], horizon, -1)
            mask = batch["valid"][:, 1:]
        terms = dqn_spr_loss(q_values, actions[:, 0], batch["reward"][:, 0], batch["terminated"][:, 0],
                             next_q_target, next_q_online, config.gamma, predictions, targets, mask, config.spr_weight)
        logged = {VF_LOSS_KEY: terms["dqn"], POLICY_LOSS_KEY: terms["dqn"], "qf_mean": terms["q_taken"].mean(),
                  "total_loss": terms["total"]}
        if "spr" in terms:
            logged["spr_loss"] = terms["spr"]
        self.metrics.log_dict(logged, key=module_id, window=1)
        return terms["total"]

    def apply_gradients(self, gradients_dict) -> None:
        super().apply_gradients(gradients_dict)  # optimizer step, DQN target copy on its interval
        if self.config.spr_weight > 0:
            for module_id in self.module.keys():
                for online, ema in self.module[module_id].unwrapped().ema_pairs():
                    polyak_update(online, ema, 1.0 - self.config.spr_momentum)


class DQNSPRConfig(OffPolicyConfigMixin, AlgorithmConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DQNSPR)
        self._init_offpolicy()
        self.lr = 5e-4
        self.gamma = 0.99
        self.train_batch_size_per_learner = 32
        self.rollout_fragment_length = 64
        self.samples_per_insert = 8.0  # one gradient step of 32 every 4 env steps (DQN's train frequency)
        self.num_steps_sampled_before_learning_starts = 1000
        self.replay_capacity = 50_000
        self.target_update_interval = 250
        self.tau = 1.0
        self.double_q = True
        self.spr_weight = 2.0
        self.spr_horizon = 5
        self.spr_momentum = 0.99
        self.epsilon_initial, self.epsilon_final, self.epsilon_timesteps = 1.0, 0.05, 5000
        self.q_hidden = 128
        self.min_sample_timesteps_per_iteration = 0
        self.min_time_s_per_iteration = 0

    def training(self, *, double_q: bool = NotProvided, spr_weight: float = NotProvided,
                 spr_horizon: int = NotProvided, spr_momentum: float = NotProvided,
                 epsilon_final: float = NotProvided, epsilon_timesteps: int = NotProvided,
                 **kwargs) -> "DQNSPRConfig":
        super().training(**kwargs)
        set_provided(self, double_q=double_q, spr_weight=spr_weight, spr_horizon=spr_horizon,
                     spr_momentum=spr_momentum, epsilon_final=epsilon_final, epsilon_timesteps=epsilon_timesteps)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "epsilon_initial": self.epsilon_initial, "epsilon_final": self.epsilon_final,
            "epsilon_timesteps": self.epsilon_timesteps, "q_hidden": self.q_hidden,
        }

    def validate(self) -> None:
        super().validate()
        self._validate_offpolicy()
        if not self.lr > 0:
            self._value_error(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.spr_weight) and self.spr_weight >= 0):
            self._value_error(f"spr_weight must be a finite number >= 0, got {self.spr_weight}")
        if not isinstance(self.spr_horizon, int) or self.spr_horizon < 1:
            self._value_error(f"spr_horizon must be an integer >= 1, got {self.spr_horizon}")
        if not 0 <= self.spr_momentum < 1:
            self._value_error(f"spr_momentum must be in [0, 1), got {self.spr_momentum}")
        if not 0 <= self.epsilon_final <= 1 or self.epsilon_timesteps < 1:
            self._value_error(f"epsilon_final must be in [0, 1] and epsilon_timesteps >= 1, got "
                              f"{self.epsilon_final}, {self.epsilon_timesteps}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=SPRQModule, model_config=self.model_config)

    def get_default_learner_class(self):
        return DQNSPRLearner


class DQNSPR(OffPolicyAlgorithmMixin, Algorithm):
    """base.py's replay loop with a sequence table in place of the transition table."""

    @classmethod
    def get_default_config(cls) -> DQNSPRConfig:
        return DQNSPRConfig()

    def setup(self, config) -> None:
        super().setup(config)  # the run's namespace (and base.py's transition table, unused here: dropped)
        self.replay_table.drop()
        config = self.config
        namespace = self.replay_target.namespace
        schema = sequence_schema(*self._env_spaces(), config.spr_horizon)
        self.replay_table = ReplayClient(redis_from_env(), namespace).create_table(
            SEQUENCE_TABLE, schema, max_size=config.replay_capacity, sampler=Sampler.uniform(),
            rate_limiter=config.rate_limiter(), seed=config.seed,
        )
        url = os.environ.get(REDIS_URL_ENV) or embedded_server().url
        self.replay_target = ReplayTarget(url, namespace, SEQUENCE_TABLE, float(config.replay_timeout_s))

    def training_step(self) -> None:
        config = self.config
        target, steps, horizon = self.replay_target, config.rollout_fragment_length, config.spr_horizon
        group = self.env_runner_group
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            results = group.foreach_env_runner(
                lambda runner: collect_sequences_into_replay(runner, target, steps, horizon),
                local_env_runner=group.num_remote_workers() == 0, timeout_seconds=config.sample_timeout_s,
            )
        self.metrics.aggregate([r["metrics"] for r in results], key=ENV_RUNNER_RESULTS)
        self.metrics.log_value("replay_inserted", sum(r["inserted"] for r in results), reduce="sum")
        batch_size = config.train_batch_size_per_learner
        num_minibatches = self._samples_allowed() // batch_size
        if num_minibatches < 1:
            return
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
            data = self.replay_table.sample(num_minibatches * batch_size, timeout=config.replay_timeout_s).data
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=len(data["reward"]))
        self._update_learners(batch, batch_size, num_minibatches)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group, policies=[DEFAULT_MODULE_ID], inference_only=True,
            )


RULE = Rule(
    name="dqn_spr",
    family="off-policy",
    paper_ids=("P133",),
    summary="DQN from pixels + SPR: K-step latent prediction by a transition model, cosine loss against an EMA "
            "target encoder, K-step sequences from a Redis replay table",
    config_class=DQNSPRConfig,
    options=tuple(o for o in OFFPOLICY_OPTIONS if o.name != "hidden_sizes") + (
        Option("lr", "Adam step size", positive, "> 0"),
        Option("double_q", "double DQN target"),
        Option("spr_weight", "lambda: weight of the SPR loss (0 = plain DQN, the baseline)", non_negative, ">= 0"),
        Option("spr_horizon", "K: latent prediction steps", positive, ">= 1"),
        Option("spr_momentum", "tau: EMA momentum of SPR's target encoder and projection",
               lambda x: 0 <= x < 1, "in [0, 1)"),
        Option("epsilon_final", "final epsilon of the epsilon-greedy schedule", unit_interval, "in [0, 1]"),
        Option("epsilon_timesteps", "env steps over which epsilon decays linearly", positive, ">= 1"),
    ),
    learning_check=LearningCheck(
        env=envs.pixel_gridworld.ENV_ID, steps=12_000, threshold=0.22,
        source="measured baseline: this learner with spr_weight=0 (plain double DQN), seed 0, reached a 100-episode "
               "mean of 0.22 at 12k env steps (random policy about 0.1, optimum about 0.93); P133's claim is data "
               "efficiency, so with SPR the same budget must reach at least the baseline's return",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 64, "samples_per_insert": 1.0,
                     "train_batch_size": 32},
)
