"""P050 PROPS: On-Policy Policy Gradient RL Without On-Policy Sampling (Corrado & Hanna 2023/2024).

Proximal Robust On-Policy Sampling. A target policy pi_theta (with critic V) is trained by PPO (P147) on the
data of the last `props_buffer_batches` iterations; the data is collected by a separate behaviour policy
pi_phi that is re-fitted every `props_num_steps` env steps so that the *aggregate* data looks like on-policy
data of pi_theta: actions pi_theta already over-sampled get less likely, under-sampled ones more likely.

Behaviour update (every m steps, on all retained data D including the batch being collected; phi <- theta
first, then Adam on minibatches for up to `props_num_epochs` epochs, stopped early once the k3 estimate of
KL(pi_theta || pi_phi) on a minibatch exceeds `props_target_kl`):

    r_phi(s, a)  = pi_phi(a|s) / pi_theta(a|s)
    L(phi)       = E_{(s,a) ~ D}[ max(r_phi, clip(r_phi, 1 - eps_P, 1 + eps_P)) ] + lambda E_s[ KL(pi_theta(.|s) || pi_phi(.|s)) ]

minimised: the paper's clipped objective max_phi E[min(-r, -clip(r))] - lambda KL (the negated importance
weight is the gradient of the negated log-likelihood of the observed actions, so observed actions lose mass;
the clip stops pushing once an action's probability has dropped by eps_P relative to pi_theta, the KL keeps
pi_phi close to pi_theta everywhere).

Target update (after each batch of `train_batch_size` steps): PPO's clipped loss on all retained data, with
pi_theta's own log-probabilities as the "old" policy (PROPS treats D as on-policy data of pi_theta, not of the
behaviour policies that collected it) and GAE advantages from the current critic.

Architecture: one RLModule holds both policies. `forward_exploration` (what EnvRunners sample with) runs the
behaviour network; `forward_inference` (evaluation, serving) and `forward_train` run the target network. Both
networks are inference weights, so every weight sync carries the current behaviour policy to the EnvRunners.
The algorithm's training step samples in chunks of m steps and runs the behaviour update on the learner
between chunks (learner_group.foreach_learner), then the PPO update once per batch. A multi-module setup
(one module per policy) would also work, but it would run two encoders on the runners and need a policy
mapping that changes with train/eval mode; one module keeps the runners' model and the checkpoint single.

Choices: hyperparameters follow the official discrete-action code (eps_P = 0.3, lr 1e-3, 16 epochs,
4 minibatches, lambda = 0.1, KL stop 0.03) with m = 64 (the official code's default 16 means 128 Ray
round trips per 2048-step batch; 64 keeps the same adaptive mechanism at a quarter of the cost) and b = 2
retained batches; PPO's own options are the ppo rule's (P147 defaults). After each PPO update the behaviour
policy is re-fitted at once to the retained data against the new pi_theta (the official code keeps its last
fit until the next m-step boundary). Episode chunks of one batch are joined back into episodes so GAE sees
whole segments (segments that cross a batch boundary bootstrap with V there, as any PPO rollout cut does).
The retained batches live in the Algorithm and are not checkpointed: after a restore the first update uses
the new batch only. Discrete actions only here (the KL term uses the categorical closed form).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, SYNCH_WORKER_WEIGHTS_TIMER, TIMERS

from algorithms.common.config_fields import check_not_recurrent, check_positive_ints, set_provided
from algorithms.common.divergences import kl_categorical
from algorithms.common.sampling import call_learners, episode_arrays, sample_env_steps, update_on_episodes
from algorithms.onpolicy.ppo import POLYAK_OPTION_NAMES, PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.options import Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule

BEHAVIOUR_OPTIMIZER = "behaviour"


def props_behaviour_loss(
    behaviour_logits: torch.Tensor,
    target_logits: torch.Tensor,
    actions: torch.Tensor,
    *,
    clip_eps: float,
    kl_coeff: float,
) -> dict[str, torch.Tensor]:
    """The PROPS behaviour objective (minimised) on a minibatch of (s, a) with categorical policies."""
    logp_b = torch.log_softmax(behaviour_logits, -1).gather(-1, actions.long().view(-1, 1)).squeeze(-1)
    logp_t = torch.log_softmax(target_logits, -1).gather(-1, actions.long().view(-1, 1)).squeeze(-1).detach()
    log_ratio = logp_b - logp_t
    ratio = log_ratio.exp()
    clipped = torch.max(ratio, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)).mean()
    kl = kl_categorical(target_logits.detach(), behaviour_logits).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()  # k3 estimate of KL(pi_theta || pi_phi) on (s, a) ~ D
        clip_fraction = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return {"total_loss": clipped + kl_coeff * kl, "clip_loss": clipped, "kl": kl, "approx_kl": approx_kl,
            "clip_fraction": clip_fraction}


class PROPSModule(DefaultPPOTorchRLModule):
    """PPO's actor-critic (the target policy) plus a behaviour copy of the actor (encoder + pi head)."""

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"props supports discrete action spaces only, got {self.action_space}")
        self.behaviour_encoder = copy.deepcopy(self.encoder.actor_encoder)
        self.behaviour_pi = copy.deepcopy(self.pi)

    def target_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.pi(self.encoder.actor_encoder(batch)[ENCODER_OUT])

    def behaviour_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.behaviour_pi(self.behaviour_encoder(batch)[ENCODER_OUT])

    def reset_behaviour(self) -> None:
        """phi <- theta."""
        self.behaviour_encoder.load_state_dict(self.encoder.actor_encoder.state_dict())
        self.behaviour_pi.load_state_dict(self.pi.state_dict())

    def behaviour_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.behaviour_encoder.parameters()) + list(self.behaviour_pi.parameters())

    @override(DefaultPPOTorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.behaviour_logits(batch)}


class TargetPolicyLogProbs(ConnectorV2):
    """Learner connector piece: ACTION_LOGP and ACTION_DIST_INPUTS of the batch become the target policy's.

    The EnvRunners recorded the behaviour policy's; PPO's ratio in PROPS is taken against pi_theta itself.
    """

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        for module_id, module_batch in batch.items():
            module = rl_module[module_id]
            if not isinstance(module, PROPSModule):
                continue
            with torch.no_grad():
                logits = module.target_logits(module_batch)
                actions = torch.as_tensor(module_batch[Columns.ACTIONS], device=logits.device).long()
                logp = torch.log_softmax(logits, -1).gather(-1, actions.view(-1, 1)).squeeze(-1)
            module_batch[Columns.ACTION_DIST_INPUTS] = logits
            module_batch[Columns.ACTION_LOGP] = logp
        return batch


class PROPSConfig(PPORuleConfig):
    """PPO's defaults (P147) plus PROPS's behaviour-update options (official discrete-action code)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PROPS)
        self.props_num_steps = 64  # m: env steps between behaviour updates
        self.props_buffer_batches = 2  # b: batches of data retained for both updates
        self.props_lr = 1e-3
        self.props_num_epochs = 16
        self.props_num_minibatches = 4
        self.props_clip = 0.3  # eps_PROPS
        self.props_kl_coeff = 0.1  # lambda
        self.props_target_kl = 0.03  # delta_PROPS: early stop of the behaviour update
        # Each chunk is one EnvRunner `sample` call: their episode lengths count, not a rollout fragment.
        self.rollout_fragment_length = "auto"

    @override(PPORuleConfig)
    def training(self, *, props_num_steps: int = NotProvided, props_buffer_batches: int = NotProvided,
                 props_lr: float = NotProvided, props_num_epochs: int = NotProvided,
                 props_num_minibatches: int = NotProvided, props_clip: float = NotProvided,
                 props_kl_coeff: float = NotProvided, props_target_kl: float | None = NotProvided,
                 **kwargs) -> "PROPSConfig":
        super().training(**kwargs)
        set_provided(self, props_num_steps=props_num_steps, props_buffer_batches=props_buffer_batches,
                     props_lr=props_lr, props_num_epochs=props_num_epochs, props_num_minibatches=props_num_minibatches,
                     props_clip=props_clip, props_kl_coeff=props_kl_coeff, props_target_kl=props_target_kl)
        return self

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "props_num_steps", "props_buffer_batches", "props_num_epochs", "props_num_minibatches")
        if self.props_num_steps > self.total_train_batch_size:
            self._value_error(f"props_num_steps ({self.props_num_steps}) must not exceed the train batch size "
                              f"({self.total_train_batch_size})")
        if self.props_lr <= 0 or self.props_clip <= 0:
            self._value_error("props_lr and props_clip must be > 0")
        if self.props_kl_coeff < 0:
            self._value_error(f"props_kl_coeff must be >= 0, got {self.props_kl_coeff}")
        if self.props_target_kl is not None and self.props_target_kl <= 0:
            self._value_error(f"props_target_kl must be > 0 or None, got {self.props_target_kl}")
        if self.model_config.get("vf_share_layers"):
            self._value_error("props copies the actor network for its behaviour policy: vf_share_layers=False")
        check_not_recurrent(self, "props")

    @override(PPORuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PROPSModule)

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return PROPSLearner


class PROPSLearner(PPORuleLearner):
    """PPO on the target policy; `behaviour_update` fits the behaviour policy (own Adam) between chunks."""

    @override(PPORuleLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None:
            self._learner_connector.append(TargetPolicyLogProbs())

    @override(PPORuleLearner)
    def configure_optimizers_for_module(self, module_id: str, config: PROPSConfig = None) -> None:
        module = self._module[module_id].unwrapped()
        behaviour = module.behaviour_parameters()
        behaviour_ids = {id(p) for p in behaviour}
        target = [p for p in module.parameters() if id(p) not in behaviour_ids]
        fused = bool(getattr(config, "fused_adam", False))
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.Adam(target, fused=fused),
                                params=target, lr_or_lr_schedule=config.lr)
        self.register_optimizer(module_id=module_id, optimizer_name=BEHAVIOUR_OPTIMIZER,
                                optimizer=torch.optim.Adam(behaviour, fused=fused), params=behaviour,
                                lr_or_lr_schedule=config.props_lr)

    def behaviour_update(self, obs: np.ndarray, actions: np.ndarray, module_id: str = DEFAULT_MODULE_ID) -> dict:
        """phi <- theta, then minimise the PROPS loss on (obs, actions) with early stopping on the KL."""
        config: PROPSConfig = self.config.get_config_for_module(module_id)
        module: PROPSModule = self.module[module_id].unwrapped()
        optimizer = self.get_optimizer(module_id, BEHAVIOUR_OPTIMIZER)
        params = module.behaviour_parameters()
        module.reset_behaviour()
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self._device)
        actions_t = torch.as_tensor(actions, device=self._device)
        with torch.no_grad():
            target_logits = module.target_logits({Columns.OBS: obs_t})
        n = len(obs_t)
        minibatch = max(n // config.props_num_minibatches, 1)
        stats: dict[str, torch.Tensor] = {}
        steps = 0
        stop = False
        for _ in range(config.props_num_epochs):
            for rows in torch.randperm(n, device=self._device).split(minibatch):
                stats = props_behaviour_loss(module.behaviour_logits({Columns.OBS: obs_t[rows]}), target_logits[rows],
                                             actions_t[rows], clip_eps=config.props_clip, kl_coeff=config.props_kl_coeff)
                optimizer.zero_grad(set_to_none=True)
                stats["total_loss"].backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                steps += 1
                # The KL measured before this step's change (the official code's order): stop once it is too far.
                stop = config.props_target_kl is not None and stats["approx_kl"].item() > config.props_target_kl
                if stop:
                    break
            if stop:
                break
        result = {f"behaviour_{k}": float(v.detach()) for k, v in stats.items()} | {"behaviour_steps": float(steps)}
        self.metrics.log_dict(result, key=module_id, window=1)
        return result


def _episode_data(episodes: list) -> tuple[np.ndarray, np.ndarray]:
    """(observations, actions) of every step of the given episode chunks."""
    arrays = episode_arrays(episodes)
    return arrays["obs"], arrays["actions"]


def join_chunks(chunks: list) -> list:
    """Successive chunks of one episode (same id, in sampling order) joined into one episode each."""
    joined: dict[str, Any] = {}
    for chunk in chunks:
        if chunk.id_ in joined and not joined[chunk.id_].is_done:
            joined[chunk.id_].concat_episode(chunk)
        else:
            joined[chunk.id_] = chunk
    return list(joined.values())


class PROPS(PPORule):
    """Sample in chunks of m steps with the behaviour policy, re-fit it between chunks, PPO once per batch."""

    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> PROPSConfig:
        return PROPSConfig()

    @override(PPORule)
    def setup(self, config) -> None:
        super().setup(config)
        # Batches kept for the next updates besides the one being sampled (b - 1 of them).
        self._retained: deque[list] = deque(maxlen=self.config.props_buffer_batches - 1)

    @override(PPORule)
    def training_step(self) -> None:
        config: PROPSConfig = self.config
        batch_size = config.total_train_batch_size
        retained_before = [e for batch in self._retained for e in batch]
        chunks, runner_metrics, sampled = [], [], 0
        while sampled < batch_size:
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                episodes, metrics = sample_env_steps(self, min(config.props_num_steps, batch_size - sampled))
            chunks += episodes
            runner_metrics += metrics
            sampled += sum(len(e) for e in episodes)
            if sampled >= batch_size:
                break  # the batch is complete: the target update comes next, then a behaviour update for it
            obs, actions = _episode_data(retained_before + chunks)
            call_learners(self.learner_group, lambda learner: learner.behaviour_update(obs, actions))
            with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
                self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                                   inference_only=True)
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        batch = join_chunks(chunks)

        # RLlib's learner connectors extend episodes in place (the phantom bootstrap step): give it copies.
        update_on_episodes(self, copy.deepcopy(retained_before + batch))
        self._retained.append(batch)
        # The new target policy: fit the behaviour policy to the data kept for the next update (with b = 1
        # there is none, and sampling starts on-policy: phi <- theta).
        retained = [e for kept in self._retained for e in kept]
        if retained:
            obs, actions = _episode_data(retained)
            call_learners(self.learner_group, lambda learner: learner.behaviour_update(obs, actions))
        else:
            call_learners(
                self.learner_group, lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped().reset_behaviour())
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

# Its own optimizers: the Polyak step (plain SGD on every optimizer) is not offered.
PROPS_OPTIONS = tuple(o for o in PPO_OPTIONS if o.name not in POLYAK_OPTION_NAMES) + (
    Option("props_num_steps", "m: env steps between behaviour-policy updates", positive, ">= 1"),
    Option("props_buffer_batches", "b: batches of data retained (current one included)", positive, ">= 1"),
    Option("props_lr", "behaviour-policy Adam step size", positive, "> 0"),
    Option("props_num_epochs", "behaviour-update epochs (before early stopping)", positive, ">= 1"),
    Option("props_num_minibatches", "behaviour-update minibatches per epoch", positive, ">= 1"),
    Option("props_clip", "eps_PROPS: clip range of the behaviour ratio", positive, "> 0"),
    Option("props_kl_coeff", "lambda: weight of KL(pi_theta || pi_phi)", non_negative, ">= 0"),
    Option("props_target_kl", "delta_PROPS: stop the behaviour update past this KL (none = off)",
           lambda x: x is None or x > 0, "> 0 or none"),
)

RULE = Rule(
    name="props",
    family="on-policy",
    paper_ids=("P050",),
    summary="behaviour policy re-fitted every m steps to oversample under-sampled actions; PPO on the last b batches",
    config_class=PROPSConfig,
    options=PROPS_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 450.0,
                                 "PROPS claims better data efficiency than PPO on CartPole-v1; CleanRL/SB3 PPO "
                                 "reach ~500 within 100k steps (the ppo rule's check)"),
    smoke_overrides={"props_num_steps": 128, "props_num_epochs": 2},
)
