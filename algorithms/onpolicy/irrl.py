"""P178 Internally Rewarded Reinforcement Learning (Li, Zhao, Lee, Weber, Wermter, ICML 2023).

The policy's reward is not given by the environment but by a discriminator q_phi(y | tau) trained jointly with
the policy on the trajectories the policy produces (hard attention: where to look decides what the classifier
can see). With p(y) = 1/K the label prior, the reward at the last step of a trajectory tau with label y is
(the paper's reward functions, named as in its official code):

    clipped_linear (the paper's proposal):  r = max(q_phi(y | tau) - p(y), 0)
    linear:                                 r = q_phi(y | tau) - p(y)
    clipped_log:                            r = max(log q_phi(y | tau) - log p(y), 0)
    log (mutual-information reward):        r = log q_phi(y | tau) - log p(y)

(0 at every other step). The linear reward is a first-order bound of the log one; it stays bounded when the
immature discriminator assigns y a tiny probability, so its noise is smaller, and the clip removes the
negative rewards that punish trajectories for the discriminator's errors. The discriminator minimises the
cross-entropy  L(phi) = -E_tau[log q_phi(y | tau)]  on the same batches, in the same learner step.

Policy optimiser: PPO (P147) with GAE on the internal reward (the paper's RAM experiments use REINFORCE with a
learned baseline; PPO with gamma = 1 is the same estimator family with a clipped trust region). Choices: the
discriminator is an MLP over the final observation, which holds the whole glimpse trajectory; the reward is
computed with the discriminator as it is when the batch arrives (before this batch's updates); its
cross-entropy is added to PPO's loss with weight `irrl_disc_coeff` (disjoint parameters, one Adam).
Task: `GlimpseClassification-v0` (envs/glimpse_classification.py), a two-glimpse pointer/target attention task
whose env reward is only reported (the learner overwrites it with the internal reward).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from torch import nn

import envs.glimpse_classification  # noqa: F401  (registers GlimpseClassification-v0 wherever the config is unpickled)
from algorithms.common.config_fields import check_not_recurrent, set_provided
from algorithms.onpolicy.ppo import PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.options import Option
from algorithms.rule import LearningCheck, Rule

REWARD_KINDS = ("clipped_linear", "linear", "clipped_log", "log")
LABEL = "irrl_label"  # y at the last real step of a finished episode, -1 elsewhere
TRAJECTORY = "irrl_trajectory"  # the discriminator's input (the final observation) at that step, 0 elsewhere


def internal_reward(prob_true: torch.Tensor, num_classes: int, kind: str) -> torch.Tensor:
    """The paper's reward r(q_phi(y | tau)) with the uniform prior p(y) = 1 / num_classes."""
    prior = 1.0 / num_classes
    if kind == "clipped_linear":
        return torch.clamp(prob_true - prior, min=0.0)
    if kind == "linear":
        return prob_true - prior
    log_ratio = torch.log(prob_true) - math.log(prior)
    if kind == "clipped_log":
        return torch.clamp(log_ratio, min=0.0)
    if kind == "log":
        return log_ratio
    raise ValueError(f"unknown reward kind {kind!r}; valid: {', '.join(REWARD_KINDS)}")


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy -mean log q_phi(y | tau) and the accuracy of argmax q_phi."""
    return {"disc_loss": nn.functional.cross_entropy(logits, labels.long()),
            "disc_accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


class IRRLModule(DefaultPPOTorchRLModule):
    """PPO's actor-critic plus the discriminator q_phi(y | tau) (learner-only)."""

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        obs_dim = int(np.prod(self.observation_space.shape))
        hidden = list(self.model_config.get("fcnet_hiddens") or [64, 64])
        layers: list[nn.Module] = []
        width = obs_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, int(self.model_config["irrl_num_classes"])))
        self.discriminator = nn.Sequential(*layers)

    @override(DefaultPPOTorchRLModule)
    def get_non_inference_attributes(self) -> list[str]:
        return super().get_non_inference_attributes() + ["discriminator"]


class InternalReward(ConnectorV2):
    """Learner connector piece before the advantage step: REWARDS <- the discriminator's reward at each finished
    episode's last step (0 elsewhere); LABEL and TRAJECTORY columns for the discriminator's own loss."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, num_classes: int, kind: str,
                 **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.num_classes = num_classes
        self.kind = kind

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        segments: dict = {}
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            label = next((info["label"] for info in reversed(list(episode.get_infos())) if "label" in info), None)
            segments.setdefault(episode.module_id, []).append((len(episode), episode.is_terminated, label))
        for module_id, module_batch in batch.items():
            module = rl_module[module_id]
            obs = torch.as_tensor(module_batch[Columns.OBS])
            rows, phantoms, labels = [], [], []
            start = 0
            for length_with_phantom, terminated, label in segments.get(module_id) or segments.get(None, []):
                phantom = start + length_with_phantom - 1
                if terminated and label is not None and phantom > start:
                    rows.append(phantom - 1)
                    phantoms.append(phantom)
                    labels.append(int(label))
                start += length_with_phantom
            rewards = torch.zeros(len(obs), dtype=torch.float32, device=obs.device)
            label_column = torch.full((len(obs),), -1, dtype=torch.long, device=obs.device)
            trajectories = torch.zeros(obs.shape, dtype=torch.float32, device=obs.device)
            if rows:
                rows_t, labels_t = torch.as_tensor(rows, device=obs.device), torch.as_tensor(labels, device=obs.device)
                trajectories[rows_t] = obs[torch.as_tensor(phantoms, device=obs.device)].float()
                with torch.no_grad():
                    probs = torch.softmax(module.discriminator(trajectories[rows_t]), -1)
                rewards[rows_t] = internal_reward(probs.gather(-1, labels_t.view(-1, 1)).squeeze(-1),
                                                  self.num_classes, self.kind)
                label_column[rows_t] = labels_t
            module_batch[Columns.REWARDS] = rewards
            module_batch[LABEL] = label_column
            module_batch[TRAJECTORY] = trajectories
        return batch


class IRRLConfig(PPORuleConfig):
    """PPO (P147) on the internal reward; episodic, so gamma = 1."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or IRRL)
        self.irrl_reward = "clipped_linear"
        self.irrl_num_classes = 4
        self.irrl_disc_coeff = 1.0
        self.gamma = 1.0
        self.lambda_ = 0.95
        self.train_batch_size_per_learner = 1024
        self.entropy_coeff = 0.01

    @property
    @override(PPORuleConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"irrl_num_classes": self.irrl_num_classes}

    @override(PPORuleConfig)
    def training(self, *, irrl_reward: str = NotProvided, irrl_num_classes: int = NotProvided,
                 irrl_disc_coeff: float = NotProvided, **kwargs) -> "IRRLConfig":
        super().training(**kwargs)
        set_provided(self, irrl_reward=irrl_reward, irrl_num_classes=irrl_num_classes, irrl_disc_coeff=irrl_disc_coeff)
        return self

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.irrl_reward not in REWARD_KINDS:
            self._value_error(f"irrl_reward={self.irrl_reward!r} is unknown; valid: {', '.join(REWARD_KINDS)}")
        if not isinstance(self.irrl_num_classes, int) or self.irrl_num_classes < 2:
            self._value_error(f"irrl_num_classes must be an integer >= 2, got {self.irrl_num_classes!r}")
        if self.irrl_disc_coeff <= 0:
            self._value_error(f"irrl_disc_coeff must be > 0 (the discriminator must learn), got {self.irrl_disc_coeff}")
        check_not_recurrent(self, "irrl")

    @override(PPORuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=IRRLModule)

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return IRRLLearner


class IRRL(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> IRRLConfig:
        return IRRLConfig()


class IRRLLearner(PPORuleLearner):
    """PPO's loss on the internal reward plus the discriminator's cross-entropy, in one update."""

    @override(PPORuleLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None:
            advantage_piece = type(self._learner_connector.connectors[-1]).__name__
            self._learner_connector.insert_before(
                advantage_piece, InternalReward(num_classes=self.config.irrl_num_classes, kind=self.config.irrl_reward))

    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: IRRLConfig, batch: dict[str, Any], fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        labels = batch[LABEL]
        finished = labels >= 0
        if not bool(finished.any()):
            return total
        module = self.module[module_id].unwrapped()
        terms = discriminator_loss(module.discriminator(batch[TRAJECTORY][finished]), labels[finished])
        if self.log_minibatch_metrics:
            self.metrics.log_dict({k: v.detach() for k, v in terms.items()}, key=module_id, window=1)
        return total + config.irrl_disc_coeff * terms["disc_loss"]


IRRL_OPTIONS = PPO_OPTIONS + (
    Option("irrl_reward", f"reward of q(y|tau): {', '.join(REWARD_KINDS)}", lambda x: x in REWARD_KINDS,
           f"one of {', '.join(REWARD_KINDS)}"),
    Option("irrl_num_classes", "K: labels the discriminator tells apart (p(y) = 1/K)", lambda x: x >= 2, ">= 2"),
    Option("irrl_disc_coeff", "weight of the discriminator's cross-entropy", lambda x: x > 0, "> 0"),
)

RULE = Rule(
    name="irrl",
    family="on-policy",
    paper_ids=("P178",),
    summary="reward = clipped linear function of a jointly trained discriminator q(y|tau); PPO on it",
    config_class=IRRLConfig,
    options=IRRL_OPTIONS,
    learning_check=LearningCheck(
        "GlimpseClassification-v0", 150_000, 0.9,
        "fraction of episodes whose glimpses find the label: 1.0 for the pointer-following policy, 0.5 at best "
        "for any policy ignoring what it saw, 0.36 at random, so 0.9 needs learned, observation-dependent "
        "attention; P178 reports the clipped linear reward solving hard-attention digit recognition"),
    smoke_overrides={},
)
