"""INPO (P278): Iterative Nash Policy Optimization (Zhang et al. 2024, "Iterative Nash Policy Optimization:
Aligning LLMs with General Preferences via No-Regret Learning").

Online mirror descent on the KL-regularised preference game (regularisation tau towards pi_ref, step eta): the
next iterate is

    pi_{t+1}(y|x)  ∝  pi_ref(y|x)^(tau eta) * pi_t(y|x)^(1 - tau eta) * exp( eta * P(y > pi_t | x) )

and INPO reaches it without estimating win rates, by minimising on pairs y, y' ~ pi_t labelled y_w > y_l

    L_t(pi) = E[ ( h_t(y_w, y_l) - eta / 2 )^2 ],
    h_t = log pi(y_w)/pi(y_l) - tau eta log pi_ref(y_w)/pi_ref(y_l) - (1 - tau eta) log pi_t(y_w)/pi_t(y_l)

whose population minimiser is pi_{t+1} (the label's mean is P(y_w > y_l)). The squared loss is
`algorithms.common.proximal_preference.proximal_regression_loss` with a = tau eta, c = eta. An iteration is
`iteration_steps` updates: the generation actor samples from pi_t for the whole iteration (weights synced only
at iteration ends) and the anchor pi_t (a frozen copy in each Learner) moves to the policy at the same moments.

Choices, and ours: the paper's scaling of h and the target may differ by constant factors; we wrote the loss so
that its minimiser is exactly the OMD step above. `beta` is tau (default 0.1), `eta` = 5 (so tau eta = 0.5 and the
target margin per iteration is eta/2 = 2.5 nats); 6 updates per iteration (4 in the 24-step check); the Adam
state is kept across iterations; ties are left out.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.common.proximal_preference import proximal_regression_loss
from algorithms.options import Option, positive
from algorithms.preference.base import (ITERATION_OPTION, AnchoredPreferenceLearner, IterativePreferenceConfig,
                                        pairwise_rule)


def inpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, prev_chosen: torch.Tensor, prev_rejected: torch.Tensor, tau: float,
              eta: float) -> dict[str, torch.Tensor]:
    """Per-pair INPO terms: (h_t - eta/2)^2 with the reference weighted tau*eta and the last iterate 1 - tau*eta."""
    return proximal_regression_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, prev_chosen,
                                    prev_rejected, ref_weight=tau * eta, step=eta)


class MirrorStepConfig(IterativePreferenceConfig):
    """An iterative rule with a mirror-descent / mirror-prox step size `eta` (INPO here, Nash-MP)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.eta = 1.0

    def training(self, *, eta: float | None = None, **kwargs: Any) -> MirrorStepConfig:
        super().training(**kwargs)
        if eta is not None:
            self.eta = eta
        return self

    def validate(self) -> None:
        super().validate()
        if not self.eta > 0:
            self._value_error(f"eta must be > 0, got {self.eta}")


class INPOConfig(MirrorStepConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # tau, the KL regularisation towards pi_ref
        self.eta = 5.0

    def get_default_learner_class(self) -> type:
        return INPOLearner

    def validate(self) -> None:
        super().validate()
        if not self.beta * self.eta <= 1:
            self._value_error(f"beta * eta (tau eta, the weight of pi_ref) must be <= 1, got {self.beta * self.eta}")


class INPOLearner(AnchoredPreferenceLearner):
    def pair_loss(self, config: INPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return inpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.anchor_logp[:, 0],
                         self.anchor_logp[:, 1], config.beta, config.eta)

    def after_update(self, config: INPOConfig, step: int) -> None:
        if config.iteration_ends(step):
            self.set_anchor("policy")  # pi_{t+1} is the next iteration's pi_t


RULE = pairwise_rule(
    "inpo", "P278", "INPO: iterated squared regression onto the online-mirror-descent step of the preference game",
    INPOConfig,
    extra_options=(ITERATION_OPTION, Option("eta", "mirror-descent step size (target margin eta/2)", positive, "> 0")),
)
