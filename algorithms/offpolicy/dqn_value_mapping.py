"""Orchestrated Value Mapping: P233, Fatemi & Tavakoli 2022, "Orchestrated Value Mapping for Reinforcement
Learning" (ICLR), as the paper's deep instantiation (LogLinDQN, Sec. 5) on the DQN of `dqn.py` and its Redis replay.

The reward is split into channels, r = sum_j lambda_j r_j (polar: lambda = (1, -1), r_1 = min(1, max(r, 0)),
r_2 = min(1, max(-r, 0))). The network has one head per channel that outputs the mapped values Q~_j(s, .); the
channel values are Q_j = f_j^-1(Q~_j) and the agent acts on their orchestration Q = sum_j lambda_j Q_j
(algorithms/common/value_mapping.py has the maps). On a replayed (s, a, r, s', d), for every channel j:

    a'        = argmax_a' sum_j lambda_j f^-1(Q~_j(s', a'; theta^-))           (greedy in the combined target Q)
    U_j       = r_j + gamma (1 - d) clip(f^-1(Q~_j(s', a'; theta^-)), 0, 1 / (1 - gamma))
    q_j       = clip(f^-1(Q~_j(s, a; theta)), 0, 1 / (1 - gamma))                 (held fixed: part of the target)
    U~_j      = f( max(eps, q_j + beta_reg (U_j - q_j)) )          (the paper's update, eq. 8: average in the
                                                                   regular space with step beta_reg, then map)
    L         = mean_B sum_j Huber_1(Q~_j(s, a; theta) - U~_j)       (the mapping-space step, size beta_f = lr)

Paper values (Atari): log-linear map with c = 0.5, d = 0, eps = 0.01687, beta_reg = 0.1 (alpha / beta_f =
0.00025 / 0.0025), gamma 0.96, Huber loss, RMSProp. Open choices, ours, for a CartPole-v1 check: everything not
about the mapping (Adam 2.3e-3, 256-256 ReLU torso shared by the channel heads, replay, epsilon schedule, target
copy every 128 steps, gamma 0.99) is `dqn.py`'s RL-Baselines3-Zoo setting; beta_reg = 1 by default (the plain
mapped target U~_j = f(max(eps, U_j)); the paper's convergence proof allows any beta_reg in (0, 1], and 0.1
slowed the Q-values' growth to CartPole's values near 1 / (1 - gamma) = 100 too much for a 50k-step budget: it
is an option). CartPole's rewards are all +1, so only the positive channel carries reward and the negative one
learns the constant 0 (clipped at eps): the check shows the mapped learner works, not the benefit of orchestration.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.common.td_targets import huber
from algorithms.common.value_mapping import (
    DECOMPOSITIONS,
    MAPPINGS,
    channel_weights,
    decompose_reward,
    forward_map,
    inverse_map,
    orchestrate,
)
from algorithms.offpolicy.base import OFFPOLICY_OPTIONS
from algorithms.offpolicy.dqn import DQNRule, DQNRuleConfig, DQNRuleLearner
from algorithms.options import Option, positive
from algorithms.rule import LearningCheck, Rule

Q_TILDE = "q_tilde"  # [B, C, A] mapped channel values of the replayed observations
Q_TARGET_NEXT_CHANNELS = "q_target_next_channels"  # [B, C, A] target channel values f^-1(Q~_j(s', .; theta^-))


def value_mapping_loss(q_tilde: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                       terminateds: torch.Tensor, next_q_target_channels: torch.Tensor, gamma: float,
                       decomposition: str = "polar", mapping: str = "loglin", c: float = 0.5, d: float = 0.0,
                       beta_reg: float = 1.0, log_eps: float = 0.01687,
                       huber_delta: float = 1.0) -> dict[str, torch.Tensor]:
    """The mapped TD loss above. `q_tilde`: Q~_j(s, .) [B, C, A] with gradient; `next_q_target_channels`: the
    target net's channel values f^-1(Q~_j(s', .)) in the regular space [B, C, A]."""
    lambdas = channel_weights(decomposition)
    if q_tilde.shape[1] != len(lambdas):
        raise ValueError(f"{decomposition} has {len(lambdas)} channels, the network {q_tilde.shape[1]}")
    v_max = 1.0 / (1.0 - gamma)
    channel_rewards = decompose_reward(rewards, decomposition)  # [B, C]
    weights = torch.tensor(lambdas, dtype=next_q_target_channels.dtype).view(1, -1, 1)
    with torch.no_grad():
        next_action = (weights * next_q_target_channels).sum(dim=1).argmax(dim=-1)  # [B]
        index = next_action.view(-1, 1, 1).expand(-1, q_tilde.shape[1], 1)
        next_values = torch.clamp(next_q_target_channels.gather(-1, index).squeeze(-1), 0.0, v_max)
        bootstrap = channel_rewards + gamma * (1.0 - terminateds.float()).unsqueeze(-1) * next_values
    taken = actions.long().view(-1, 1, 1).expand(-1, q_tilde.shape[1], 1)
    q_tilde_taken = q_tilde.gather(-1, taken).squeeze(-1)  # [B, C]
    with torch.no_grad():
        q_taken = torch.clamp(inverse_map(q_tilde_taken, mapping, c, d), 0.0, v_max)
        averaged = q_taken + beta_reg * (bootstrap - q_taken)
        if mapping != "identity":
            averaged = torch.clamp(averaged, min=log_eps)  # log(x <= 0) is undefined
        target_tilde = forward_map(averaged, mapping, c, d)
    td_error = q_tilde_taken - target_tilde
    return {"loss": huber(td_error, huber_delta).sum(dim=-1).mean(), "td_error": td_error.detach(),
            "target_tilde": target_tilde, "bootstrap": bootstrap, "q_taken": q_taken}


class ValueMappingDQNModule(DefaultDQNTorchRLModule):
    """DQN module whose head outputs C x A mapped values; acting and the target argmax use Q = sum_j lambda_j Q_j."""

    @override(DefaultDQNTorchRLModule)
    def setup(self) -> None:
        super().setup()
        cfg = self.model_config
        self.mapping = (cfg["value_mapping"], float(cfg["mapping_c"]), float(cfg["mapping_d"]))
        self.lambdas = channel_weights(cfg["reward_decomposition"])
        # One output per (channel, action); the torso (encoder) is shared by the channels.
        self.af = self.catalog._get_head_config(output_layer_dim=len(self.lambdas) * self.action_space.n).build(
            framework=self.framework)

    def _mapped_values(self, batch: dict[str, Any], encoder, head) -> torch.Tensor:
        features = encoder(batch)[ENCODER_OUT]
        return head(features).view(-1, len(self.lambdas), self.action_space.n)

    @override(DefaultDQNTorchRLModule)
    def _qf_forward_helper(self, batch, encoder, head) -> dict[str, torch.Tensor]:
        q_tilde = self._mapped_values(batch, encoder, head)
        q_channels, q = orchestrate(q_tilde, self.lambdas, *self.mapping)
        return {QF_PREDS: q, Q_TILDE: q_tilde, "q_channels": q_channels}

    @override(DefaultDQNTorchRLModule)
    def _forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        outs = self.compute_q_values({Columns.OBS: batch[Columns.OBS]})
        target = self.forward_target({Columns.OBS: batch[Columns.NEXT_OBS]})
        return {QF_PREDS: outs[QF_PREDS], Q_TILDE: outs[Q_TILDE], QF_TARGET_NEXT_PREDS: target[QF_PREDS],
                Q_TARGET_NEXT_CHANNELS: target["q_channels"]}


class ValueMappingConfig(DQNRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or ValueMappingDQN)
        self.reward_decomposition = "polar"
        self.value_mapping = "loglin"
        self.mapping_c = 0.5
        self.mapping_d = 0.0
        self.beta_reg = 1.0
        self.log_eps = 0.01687

    @override(DQNRuleConfig)
    def training(self, *, reward_decomposition: str = NotProvided, value_mapping: str = NotProvided,
                 mapping_c: float = NotProvided, mapping_d: float = NotProvided, beta_reg: float = NotProvided,
                 log_eps: float = NotProvided, **kwargs) -> "ValueMappingConfig":
        super().training(**kwargs)
        set_provided(self, reward_decomposition=reward_decomposition, value_mapping=value_mapping,
                     mapping_c=mapping_c, mapping_d=mapping_d, beta_reg=beta_reg, log_eps=log_eps)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # The EnvRunners' modules need the maps too: they act on the orchestrated Q.
        return super()._model_config_auto_includes | {
            "reward_decomposition": self.reward_decomposition, "value_mapping": self.value_mapping,
            "mapping_c": self.mapping_c, "mapping_d": self.mapping_d,
        }

    @override(DQNRuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.reward_decomposition not in DECOMPOSITIONS:
            self._value_error(f"reward_decomposition must be one of {', '.join(DECOMPOSITIONS)}, "
                              f"got {self.reward_decomposition!r}")
        if self.value_mapping not in MAPPINGS:
            self._value_error(f"value_mapping must be one of {', '.join(MAPPINGS)}, got {self.value_mapping!r}")
        if not 0 < self.beta_reg <= 1:
            self._value_error(f"beta_reg must be in (0, 1], got {self.beta_reg}")
        if self.mapping_c <= 0 or self.log_eps <= 0:
            self._value_error(f"mapping_c and log_eps must be > 0, got {self.mapping_c}, {self.log_eps}")
        if not self.gamma < 1:
            self._value_error(f"value mapping clips values to [0, 1 / (1 - gamma)]: gamma must be < 1, got "
                              f"{self.gamma}")
        if self.double_q or self.dueling:
            self._value_error("dqn_value_mapping picks a' by the orchestrated target Q (no double_q) and has "
                              "plain channel heads (no dueling)")

    @override(DQNRuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=ValueMappingDQNModule, model_config=self.model_config)

    @override(DQNRuleConfig)
    def get_default_learner_class(self):
        return ValueMappingLearner


if not hasattr(DQNRuleLearner, "q_loss_terms"):  # without the hook the plain DQN loss would run silently
    raise ImportError("dqn_value_mapping needs DQNRuleLearner.q_loss_terms (algorithms/offpolicy/dqn.py)")


class ValueMappingLearner(DQNRuleLearner):
    # dqn.py's loss hook: overriding it (without `reads_replay_columns`) makes the config refuse n_step > 1 and
    # prioritized replay, which this loss does not implement.
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        terms = value_mapping_loss(
            fwd_out[Q_TILDE], batch[Columns.ACTIONS], batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
            fwd_out[Q_TARGET_NEXT_CHANNELS], config.gamma, config.reward_decomposition, config.value_mapping,
            config.mapping_c, config.mapping_d, config.beta_reg, config.log_eps, config.huber_delta,
        )
        q_taken = fwd_out[QF_PREDS].gather(-1, batch[Columns.ACTIONS].long().unsqueeze(-1)).squeeze(-1)
        return {"loss": terms["loss"], "q_taken": q_taken.detach(), "td_error": terms["td_error"].sum(dim=-1)}


class ValueMappingDQN(DQNRule):
    @classmethod
    @override(DQNRule)
    def get_default_config(cls) -> ValueMappingConfig:
        return ValueMappingConfig()


RULE = Rule(
    name="dqn_value_mapping",
    family="off-policy",
    paper_ids=("P233",),
    summary="Orchestrated value mapping (LogLinDQN): reward channels, each channel's Q learned in a log-linear "
            "mapped space, acting on their weighted sum; Redis replay",
    config_class=ValueMappingConfig,
    options=OFFPOLICY_OPTIONS + (
        Option("lr", "Adam step size (beta_f, the mapping-space step)", positive, "> 0"),
        Option("reward_decomposition", "reward channels: polar (positive / negative) or single",
               lambda x: x in DECOMPOSITIONS, "polar or single"),
        Option("value_mapping", "mapping of every channel: loglin, log or identity",
               lambda x: x in MAPPINGS, "loglin, log or identity"),
        Option("mapping_c", "c of the log(-linear) map", positive, "> 0"),
        Option("mapping_d", "d of the log(-linear) map"),
        Option("beta_reg", "regular-space averaging step of the target (eq. 8)", lambda x: 0 < x <= 1, "in (0, 1]"),
        Option("huber_delta", "Huber threshold of the mapped TD error", positive, "> 0"),
    ),
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="the dqn rule's check (RL-Baselines3-Zoo DQN CartPole-v1, 5e4 steps, CartPole-v1's reward_threshold "
               "475, 10 greedy evaluation episodes); P233 reports LogLinDQN at least matching DQN (Atari)",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0},
)
