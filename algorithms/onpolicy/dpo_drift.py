"""P161 Discovered Policy Optimisation (Lu, Kuba, Letcher, Metz, Schroeder de Witt, Foerster, NeurIPS 2022).

Mirror Learning writes PPO-like rules as "maximise E[r A] minus a drift"; LPO meta-learned the drift and DPO is
its closed form. With r = pi_theta(a|s) / pi_old(a|s) and advantage A, the discovered drift is

    f(r, A) = ReLU( (r - 1) A  - alpha * tanh((r - 1) A / alpha) )      if A >= 0
              ReLU( log(r) A   - beta  * tanh(log(r) A  / beta ) )      if A <  0

with alpha = 2, beta = 0.6, and the policy maximises (PPO's clipped objective replaced by it)

    L^DPO(theta) = E_t[ r_t A_t - f(r_t, A_t) ].

The loss is -L^DPO + c1 (V - V_targ)^2 - c2 H, minimised like PPO (P147): `num_epochs` passes of minibatch Adam
over each fresh batch, GAE advantages (P158).

Choices the paper leaves open (its experiments are Brax/MinAtar with the authors' PPO settings), and what this
module does: PPO's MuJoCo settings (as `ppo.py`) for everything but the policy objective; advantages
standardised per batch, as the paper's code (and its PPO baseline) does before the drift is applied;
no value clipping.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.losses import masked_mean, value_loss
from algorithms.onpolicy.gae import OLD_VALUES
from algorithms.onpolicy.ppo import PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.options import Option, positive
from algorithms.rule import LearningCheck, Rule


def dpo_drift(ratio: torch.Tensor, advantages: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The discovered drift f(r, A) >= 0 per sample (P161): zero near r = 1, growing once |r - 1| |A| is large."""
    positive_part = (ratio - 1.0) * advantages
    negative_part = torch.log(ratio) * advantages
    drift_pos = torch.relu(positive_part - alpha * torch.tanh(positive_part / alpha))
    drift_neg = torch.relu(negative_part - beta * torch.tanh(negative_part / beta))
    return torch.where(advantages >= 0, drift_pos, drift_neg)


def dpo_drift_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    value_targets: torch.Tensor,
    entropy: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    vf_coeff: float,
    entropy_coeff: float,
    mask: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    value_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """-E[r A - f(r, A)] + c1 L^VF - c2 H on a minibatch; returns the total and its terms (scalars)."""
    ratio = torch.exp(logp - old_logp)
    drift = dpo_drift(ratio, advantages, alpha, beta)
    objective = ratio * advantages - drift
    vf = value_loss(values, value_targets, old_values, value_clip)
    total = masked_mean(-objective + vf_coeff * vf - entropy_coeff * entropy, mask)
    return {
        "total_loss": total,
        "policy_loss": -masked_mean(objective, mask),
        "vf_loss": masked_mean(vf, mask),
        "entropy": masked_mean(entropy, mask),
        "drift": masked_mean(drift, mask),
        "approx_kl": masked_mean(((ratio - 1.0) - (logp - old_logp)).detach(), mask),
    }


class DPODriftConfig(PPORuleConfig):
    """PPO's settings with the drift's two constants (the paper's alpha = 2, beta = 0.6)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DPODrift)
        self.drift_alpha = 2.0
        self.drift_beta = 0.6

    @override(PPORuleConfig)
    def training(self, *, drift_alpha: float = NotProvided, drift_beta: float = NotProvided,
                 **kwargs) -> "DPODriftConfig":
        super().training(**kwargs)
        if drift_alpha is not NotProvided:
            self.drift_alpha = drift_alpha
        if drift_beta is not NotProvided:
            self.drift_beta = drift_beta
        return self

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.drift_alpha <= 0 or self.drift_beta <= 0:
            self._value_error(f"drift_alpha and drift_beta must be > 0, got {self.drift_alpha}, {self.drift_beta}")
        if self.use_kl_loss:
            self._value_error("dpo_drift's drift replaces PPO's trust-region terms: use_kl_loss must be False")

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return DPODriftLearner


class DPODrift(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> DPODriftConfig:
        return DPODriftConfig()


class DPODriftLearner(PPORuleLearner):
    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: DPODriftConfig, batch: dict[str, Any], fwd_out):
        module = self.module[module_id].unwrapped()
        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        terms = dpo_drift_loss(
            dist.logp(batch[Columns.ACTIONS]),
            batch[Columns.ACTION_LOGP],
            batch[Postprocessing.ADVANTAGES],
            module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS)),
            batch[Postprocessing.VALUE_TARGETS],
            dist.entropy(),
            alpha=config.drift_alpha,
            beta=config.drift_beta,
            vf_coeff=config.vf_loss_coeff,
            entropy_coeff=self.entropy_coeff_schedulers_per_module[module_id].get_current_value(),
            mask=batch.get(Columns.LOSS_MASK),
            old_values=batch.get(OLD_VALUES),
            value_clip=config.value_clip,
        )
        total = terms.pop("total_loss")
        if self.log_minibatch_metrics:  # window=1 snapshots: only the update's last minibatch is reported
            renamed = {"policy_loss": POLICY_LOSS_KEY, "vf_loss": VF_LOSS_KEY, "entropy": ENTROPY_KEY}
            self.metrics.log_dict({renamed.get(k, k): v for k, v in terms.items()}, key=module_id, window=1)
        return total


DPO_DRIFT_OPTIONS = tuple(o for o in PPO_OPTIONS if o.name not in ("clip_param", "use_kl_loss", "kl_coeff",
                                                                    "kl_target")) + (
    Option("drift_alpha", "drift scale alpha for A >= 0 (paper: 2)", positive, "> 0"),
    Option("drift_beta", "drift scale beta for A < 0 (paper: 0.6)", positive, "> 0"),
)

RULE = Rule(
    name="dpo_drift",
    family="on-policy",
    paper_ids=("P161", "P158"),
    summary="PPO with the discovered (LPO -> DPO) drift f(r, A) in place of clipping: max E[r A - f(r, A)]",
    config_class=DPODriftConfig,
    options=DPO_DRIFT_OPTIONS,
    learning_check=LearningCheck(
        "CartPole-v1", 100_000, 450.0,
        "P161: DPO matches or beats PPO; CleanRL/SB3 PPO reach ~500 on CartPole-v1 within 100k steps "
        "(the ppo rule's check)",
    ),
)
