"""P127 Farebrother et al. 2024, "Stop Regressing: Training Value Functions via Classification for Scalable Deep
RL": DQN whose Q-network outputs, for every action, logits over m value bins and is trained with a cross-entropy
instead of a regression loss (`value_loss`: HL-Gauss, the paper's recommendation, or two-hot).

On replayed (s, a, r, s', d), with p(s, a) = softmax(l(s, a)) over bin centres z (algorithms/common/
value_classification.py for the support, the target distributions and the cross-entropy):

    Q(s, a)  = sum_i p_i(s, a) z_i                                                   (acting and bootstrapping)
    y        = r + gamma (1 - d) max_a' Q(s', a'; theta^-)                          (double DQN with `double_q`)
    L        = mean_B [ - sum_i q_i(y) log p_i(s, a; theta) ]
    q_i(y)   = HL-Gauss: Phi((e_{i+1} - y) / sigma) - Phi((e_i - y) / sigma), normalised, sigma = 0.75 w;
               two-hot: the two centres around y, linearly weighted

The scalar target is the expected value of the target network's distribution (the paper's TD target), clipped into
[value_min, value_max] before the projection.

Choices the paper leaves open or that differ for a small task, ours: the support [-10, 110] with 120 bins (bin width
w = 1, sigma = 0.75) covers CartPole's discounted returns (at most 1 / (1 - 0.99) = 100) with a margin; the network
is the `dqn` rule's 256-256 ReLU MLP whose last layer has num_actions x num_bins outputs (RLlib's distributional
DQN head, configured with the bin centres as its atoms), and every other hyperparameter is the `dqn` rule's
(RL-Zoo's tuned CartPole DQN) so the check compares the loss alone. Only the value loss changes: no C51
distributional backup, no n-step returns.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.dqn.dqn_learner import QF_LOGITS, QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from algorithms.common.td_targets import q_learning_target
from algorithms.common.value_classification import (
    SIGMA_RATIO,
    SUPPORT_OPTIONS,
    ValueSupportConfigMixin,
    classification_value_loss,
)
from algorithms.offpolicy.base import DISCOUNTS, PRIORITY_WEIGHTS
from algorithms.offpolicy.dqn import RULE as DQN_RULE
from algorithms.offpolicy.dqn import DQNRule, DQNRuleConfig, DQNRuleLearner
from algorithms.rule import LearningCheck, Rule


def hl_gauss_dqn_loss(logits: torch.Tensor, q_values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                      terminateds: torch.Tensor, next_q_target: torch.Tensor, gamma: float | torch.Tensor,
                      value_min: float, value_max: float, kind: str = "hl_gauss", sigma_ratio: float = SIGMA_RATIO,
                      next_q_online: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cross-entropy of the taken action's bin logits (logits [B, A, m]) against the projected TD target.
    `gamma` may be n-step records' [B] discounts; `weights` [B] prioritised replay's importance weights."""
    index = actions.long()
    taken_logits = logits.gather(1, index.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)
    q_taken = q_values.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    target = q_learning_target(rewards, terminateds, gamma, next_q_target, next_q_online)
    per_sample = classification_value_loss(taken_logits, target, value_min, value_max, kind, sigma_ratio)
    loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
    return {"loss": loss, "td_error": (q_taken - target).detach(), "q_taken": q_taken.detach(), "target": target}


class DQNHLGaussConfig(ValueSupportConfigMixin, DQNRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DQNHLGauss)
        self._init_value_support()

    @property
    @override(DQNRuleConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # RLlib's distributional head puts num_atoms equally spaced atoms from v_min to v_max: the bin centres.
        # (config.num_atoms stays 1: RLlib's C51 loss and the dqn rule's scalar check read it, not the module.)
        half_width = 0.5 * (self.value_max - self.value_min) / self.num_bins
        return super()._model_config_auto_includes | {
            "num_atoms": self.num_bins, "v_min": self.value_min + half_width, "v_max": self.value_max - half_width,
        }

    @override(DQNRuleConfig)
    def get_default_learner_class(self):
        return DQNHLGaussLearner


class DQNHLGaussLearner(DQNRuleLearner):
    reads_replay_columns = True  # n-step discounts and priority weights reach the loss

    @override(DQNRuleLearner)
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        q_values = fwd_out[QF_PREDS]
        # With double Q, RLlib's module runs s and s' through the online net in one pass and returns both halves'
        # logits: the first B rows are Q(s, .).
        logits = fwd_out[QF_LOGITS][: q_values.shape[0]]
        return hl_gauss_dqn_loss(
            logits, q_values, batch[Columns.ACTIONS], batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
            fwd_out[QF_TARGET_NEXT_PREDS], batch[DISCOUNTS] if DISCOUNTS in batch else config.gamma,
            config.value_min, config.value_max, kind=config.value_loss, sigma_ratio=config.sigma_ratio,
            next_q_online=fwd_out[QF_NEXT_PREDS] if config.double_q else None, weights=batch.get(PRIORITY_WEIGHTS),
        )


class DQNHLGauss(DQNRule):
    @classmethod
    @override(DQNRule)
    def get_default_config(cls) -> DQNHLGaussConfig:
        return DQNHLGaussConfig()


RULE = Rule(
    name="dqn_hl_gauss",
    family="off-policy",
    paper_ids=("P127",),
    summary="DQN with a categorical Q head trained by cross-entropy on HL-Gauss (or two-hot) targets, Redis replay",
    config_class=DQNHLGaussConfig,
    options=tuple(o for o in DQN_RULE.options if o.name != "huber_delta") + SUPPORT_OPTIONS,
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="P127 claims HL-Gauss matches or beats regression DQN; the dqn rule's check (RL-Baselines3-Zoo DQN "
               "CartPole-v1, 5e4 steps, benchmark mean return 500 on greedy episodes) and CartPole-v1's "
               "reward_threshold 475, scored like it on 10 greedy evaluation episodes",
    ),
    smoke_overrides=DQN_RULE.smoke_overrides,
)
