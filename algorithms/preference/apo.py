"""APO (P255): Accelerated Preference Optimization (He, Yuan & Gu 2024, "Accelerated Preference Optimization for
Large Language Model Alignment"), here with DPO as the inner preference-optimisation step.

Iterative DPO is a proximal-point method on the policy; APO adds Nesterov extrapolation between iterations:

    pi_{t+1}     = argmin_pi  -E_{(y_w, y_l) ~ pi_t, judge}[ log sigmoid( beta h(pi; pi_hat_t) ) ]
                   h(pi; pi_hat) = log pi(y_w)/pi_hat(y_w) - log pi(y_l)/pi_hat(y_l)
    pi_hat_{t+1}(y|x) ∝ pi_{t+1}(y|x) * ( pi_{t+1}(y|x) / pi_t(y|x) )^alpha        (extrapolation, alpha >= 0)

The extrapolated reference is not a network we can sample from, but DPO needs only its log-ratio margin, in which
the normaliser cancels:

    log pi_hat_t(y_w)/pi_hat_t(y_l) = (1 + alpha) log pi_t(y_w)/pi_t(y_l) - alpha log pi_{t-1}(y_w)/pi_{t-1}(y_l)

so each Learner keeps two frozen iterates (pi_t as the reference, pi_{t-1} as the anchor) and the margin is
`algorithms.common.proximal_preference.anchored_margin` with reference weight 1 + alpha. At t = 0 both are the
SFT policy (pi_hat_0 = pi_ref). alpha = 0 is iterative DPO.

Choices, and ours: the extrapolation is exact in log-prob space (the paper's theory) rather than an approximation
in weight space; alpha = 0.3 (ours; the paper tunes it); pairs for iteration t are sampled from pi_t (the
generation actor is synced at iteration ends only); 6 updates per iteration (4 in the 24-step check); Adam state
kept; the trained policy pi_T is the output (not the unsampleable pi_hat_T); beta = 0.1; ties left out.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.common.proximal_preference import anchored_margin
from algorithms.options import Option, non_negative
from algorithms.preference.base import (ITERATION_OPTION, AnchoredPreferenceLearner, IterativePreferenceConfig,
                                        pairwise_rule)


def apo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, last_chosen: torch.Tensor,
             last_rejected: torch.Tensor, before_chosen: torch.Tensor, before_rejected: torch.Tensor, beta: float,
             alpha: float) -> dict[str, torch.Tensor]:
    """Per-pair APO-DPO terms: -log sigmoid(beta h), h the policy's margin minus the extrapolated reference's,
    (1 + alpha) * margin(pi_t) - alpha * margin(pi_{t-1})."""
    h = anchored_margin(policy_chosen, policy_rejected, last_chosen, last_rejected, before_chosen, before_rejected,
                        ref_weight=1.0 + alpha)
    return {"loss": -torch.nn.functional.logsigmoid(beta * h), "h": h}


class APOConfig(IterativePreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.extrapolation = 0.3  # alpha

    def training(self, *, extrapolation: float | None = None, **kwargs: Any) -> APOConfig:
        super().training(**kwargs)
        if extrapolation is not None:
            self.extrapolation = extrapolation
        return self

    def get_default_learner_class(self) -> type:
        return APOLearner

    def validate(self) -> None:
        super().validate()
        if not self.extrapolation >= 0:
            self._value_error(f"extrapolation (alpha) must be >= 0, got {self.extrapolation}")


class APOLearner(AnchoredPreferenceLearner):
    """reference = pi_t (last iterate), anchor = pi_{t-1} (the one before)."""

    def pair_loss(self, config: APOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return apo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.anchor_logp[:, 0],
                        self.anchor_logp[:, 1], config.beta, config.extrapolation)

    def after_update(self, config: APOConfig, step: int) -> None:
        if config.iteration_ends(step):
            self.set_anchor("reference")  # pi_{t-1} <- pi_t
            self.reset_reference(1.0)  # pi_t <- pi_{t+1}


RULE = pairwise_rule(
    "apo", "P255", "APO: iterative DPO with Nesterov extrapolation of the reference, pi_t (pi_t / pi_{t-1})^alpha",
    APOConfig,
    extra_options=(ITERATION_OPTION,
                   Option("extrapolation", "Nesterov extrapolation alpha (0 = iterative DPO)", non_negative, ">= 0")),
)
