"""P147 Proximal Policy Optimization (Schulman et al. 2017), the clipped-surrogate variant.

Per minibatch, with r_t(theta) = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t) and advantages A_t (GAE, P158):

    L^CLIP(theta) = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]                  (eq. 7)
    L^VF(theta)   = E_t[ (V_theta(s_t) - V_t^targ)^2 ]
    loss          = -L^CLIP + c1 L^VF - c2 E_t[ H(pi_theta(.|s_t)) ]                       (eq. 9, negated)

`num_epochs` passes of minibatch Adam over each batch of `train_batch_size` fresh steps. Options beyond
the paper: `value_clip` (clip V around its old prediction) and `use_kl_loss` (the paper's adaptive KL
penalty, section 4, added to the clipped loss with coefficient beta adapted towards `kl_target`).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

from algorithms.common.divergences import mean_kl
from algorithms.common.losses import clipped_surrogate, masked_mean, value_loss
from algorithms.common.optimizers import GRADIENT_RULE_OPTIONS, GradientRuleConfigMixin, GradientRuleMixin
from algorithms.onpolicy.base import OnPolicyAlgorithm, OnPolicyConfig, OnPolicyLearner
from algorithms.onpolicy.gae import OLD_VALUES
from algorithms.options import ONPOLICY_OPTIONS, Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    value_targets: torch.Tensor,
    entropy: torch.Tensor,
    *,
    clip_eps: float,
    vf_coeff: float,
    entropy_coeff: float,
    mask: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    value_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """The P147 eq. 9 loss on a minibatch; returns the total and its terms (all scalars)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = clipped_surrogate(ratio, advantages, clip_eps)
    vf = value_loss(values, value_targets, old_values, value_clip)
    total = masked_mean(-surrogate + vf_coeff * vf - entropy_coeff * entropy, mask)
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_eps).float()
        approx_kl = (ratio - 1.0) - (logp - old_logp)  # k3 estimator of KL(old || new), always >= 0
    return {
        "total_loss": total,
        "policy_loss": -masked_mean(surrogate, mask),
        "vf_loss": masked_mean(vf, mask),
        "entropy": masked_mean(entropy, mask),
        "clip_fraction": masked_mean(clipped, mask),
        "approx_kl": masked_mean(approx_kl, mask),
    }


class PPORuleConfig(GradientRuleConfigMixin, OnPolicyConfig):
    """PPO's options; defaults are the paper's MuJoCo settings (Table 3), the same as Stable-Baselines3's.

    The gradient rules of `algorithms/common/optimizers.py` (P243 / P232 clipping, P234's Polyak step) come with
    it, so every rule built on PPO's learner can select them (`--set grad_clip_by=norm`, `step_size_rule=polyak`).
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PPORule)
        self.lr = 3e-4
        self.train_batch_size_per_learner = 2048
        self.minibatch_size = 64
        self.num_epochs = 10
        self.gamma = 0.99
        self.lambda_ = 0.95
        self.clip_param = 0.2
        self.vf_loss_coeff = 0.5
        self.entropy_coeff = 0.0
        self.grad_clip = 0.5
        self.num_gpus_per_learner = 0.0  # a float, so `--set num_gpus_per_learner=0.5` (a shared GPU) parses

    @override(OnPolicyConfig)
    def get_default_learner_class(self):
        return PPORuleLearner


class PPORule(OnPolicyAlgorithm):
    @classmethod
    @override(OnPolicyAlgorithm)
    def get_default_config(cls) -> PPORuleConfig:
        return PPORuleConfig()


class PPORuleLearner(GradientRuleMixin, OnPolicyLearner):
    @override(OnPolicyLearner)
    def compute_loss_for_module(self, *, module_id: str, config: PPORuleConfig, batch: dict[str, Any], fwd_out):
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        new_dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        terms = ppo_loss(
            new_dist.logp(batch[Columns.ACTIONS]),
            batch[Columns.ACTION_LOGP],
            batch[Postprocessing.ADVANTAGES],
            values,
            batch[Postprocessing.VALUE_TARGETS],
            new_dist.entropy(),
            clip_eps=config.clip_param,
            vf_coeff=config.vf_loss_coeff,
            entropy_coeff=self.entropy_coeff_schedulers_per_module[module_id].get_current_value(),
            mask=mask,
            old_values=batch.get(OLD_VALUES),
            value_clip=config.value_clip,
        )
        total = terms.pop("total_loss")
        if config.use_kl_loss:
            old_dist = module.get_exploration_action_dist_cls().from_logits(batch[Columns.ACTION_DIST_INPUTS])
            kl = mean_kl(old_dist, new_dist, mask)
            total = total + self.curr_kl_coeffs_per_module[module_id] * kl
            terms["mean_kl_loss"] = kl  # read by PPOLearner to adapt beta towards kl_target
        if not self.log_minibatch_metrics:  # window=1 snapshots: only the update's last minibatch is reported
            return total
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: terms["policy_loss"],
                VF_LOSS_KEY: terms["vf_loss"],
                ENTROPY_KEY: terms["entropy"],
                **{k: v for k, v in terms.items() if k not in ("policy_loss", "vf_loss", "entropy")},
            },
            key=module_id,
            window=1,
        )
        return total


PPO_OPTIONS = ONPOLICY_OPTIONS + (
    Option("num_epochs", "SGD passes over each batch", positive, ">= 1"),
    Option("minibatch_size", "SGD minibatch size", positive, ">= 1"),
    Option("clip_param", "surrogate clip range epsilon", positive, "> 0"),
    Option("vf_loss_coeff", "value-loss coefficient c1", lambda x: x >= 0, ">= 0"),
    Option("entropy_coeff", "entropy-bonus coefficient c2", lambda x: x >= 0, ">= 0"),
    Option("value_clip", "clip V around its old prediction (none = off)", lambda x: x is None or x > 0, "> 0 or none"),
    Option("use_kl_loss", "add the adaptive KL penalty (P147 section 4)"),
    Option("kl_coeff", "initial KL-penalty coefficient beta", lambda x: x >= 0, ">= 0"),
    Option("kl_target", "KL target d_targ for the adaptive penalty", positive, "> 0"),
    # First-order minibatch updates average over learners, so PPO's learner scales out (rlfleet submit).
    Option("num_learners", "learner actors (0 = learn in the driver process)", non_negative, ">= 0"),
    Option("num_gpus_per_learner", "GPUs per learner actor (fractions share a GPU)", non_negative, ">= 0"),
) + GRADIENT_RULE_OPTIONS

# What a rule drops from PPO_OPTIONS when it registers its own optimizers (the Polyak step replaces them).
POLYAK_OPTION_NAMES = ("step_size_rule", "polyak_c", "polyak_max_lr", "polyak_f_star")

RULE = Rule(
    name="ppo",
    family="on-policy",
    paper_ids=("P147", "P158"),
    summary="clipped surrogate + value loss + entropy bonus, minibatch Adam epochs; GAE advantages",
    config_class=PPORuleConfig,
    options=PPO_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 450.0,
                                 "CleanRL/SB3 PPO reach ~500 on CartPole-v1 within 100k steps"),
)
