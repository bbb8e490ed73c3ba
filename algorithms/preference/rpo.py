"""RPO: Regularized Preference Optimization (P043): Liu et al. 2024, "Provably Mitigating Overoptimization in
RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer".

The theoretical algorithm picks the policy that is best against an adversarially chosen reward: the reward
minimises its Bradley-Terry negative log-likelihood plus eta * E_{x, y~pi_base}[r(x, y)] (a penalty on the reward
of a baseline distribution's responses). With DPO's reparametrisation r = beta log(pi_theta/pi_ref) + const, the
penalty is eta * beta * E[log pi_theta(y_base|x)] - const, so the min-max collapses to one objective:

    L_RPO = E_D[ -log sigmoid(beta h(x, y_w, y_l)) ] + eta * beta * E_{x, y_base}[ -log pi_theta(y_base | x) ]

with h DPO's log-ratio margin: DPO plus an SFT (NLL) loss weighted eta * beta.

Choices, and ours: the baseline responses are the chosen ones of each pair (the paper's experiments imitate the
preferred responses of the preference data); -log pi(y|x) is the whole-sequence NLL (sum over the response's
tokens, eos included), not length-normalised, because it comes from the sequence-level reward; ties carry no
chosen response and are left out of both terms. The paper trains offline on a fixed preference dataset, so
pair_source = "reference" (pairs sampled once from the SFT policy); eta = 1.0 and beta = 0.1 are ours (the SFT term's
gradient on log pi(y_w|x) is then eta beta = 0.1, twice the DPO term's beta/2 at the start).
"""

from __future__ import annotations

import dataclasses

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.options import Option, non_negative
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner, pairwise_rule
from algorithms.preference.dpo import dpo_loss


def rpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, eta: float) -> dict[str, torch.Tensor]:
    """Per-pair RPO terms: "loss" = DPO loss + eta * beta * (-log pi(y_w|x)); "dpo" and "sft_nll" its parts."""
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    nll = -policy_chosen
    return {"loss": dpo["loss"] + eta * beta * nll, "dpo": dpo["loss"], "sft_nll": nll, "h": dpo["h"]}


class RPOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.eta = 1.0
        self.pair_source = "reference"  # the paper's setting: a fixed offline preference dataset

    def training(self, *, eta: float = NotProvided, **kwargs) -> RPOConfig:
        super().training(**kwargs)
        set_provided(self, eta=eta)
        return self

    def get_default_learner_class(self) -> type:
        return RPOLearner

    def validate(self) -> None:
        super().validate()
        if not self.eta >= 0:
            self._value_error(f"eta must be >= 0, got {self.eta}")


class RPOLearner(PreferenceLearner):
    def pair_loss(self, config: RPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return rpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta, config.eta)


RULE = dataclasses.replace(
    pairwise_rule("rpo", "P043", "Regularized Preference Optimization: DPO loss + eta * beta * SFT NLL of the chosen "
                  "responses", RPOConfig),
    options=PREFERENCE_OPTIONS + (
        Option("eta", "weight of the SFT (chosen-response NLL) term, times beta", non_negative, ">= 0"),),
)
