"""EXO: Efficient Exact Optimization of the alignment objective (P187): Ji et al. 2024, "Towards Efficient and
Exact Optimization of Language Model Alignment".

The KL-regularised alignment objective is optimised exactly by minimising a *reverse* KL between two
distributions over the K responses of a prompt: the one the policy implies, p_f (a softmax of its log-ratios to
the reference), and the one the preferences imply, p_rh (a softmax of the rewards). For a preference pair (K = 2)
the labels give p_rh directly, softened by label smoothing eps:

    z = beta h(x, y_w, y_l),  h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    p_f  = (sigmoid(z), sigmoid(-z))           over (y_w, y_l)
    p_rh = (1 - eps, eps)
    L_EXO = KL(p_f || p_rh) = sigmoid(z) [log sigmoid(z) - log(1 - eps)] + sigmoid(-z) [log sigmoid(-z) - log eps]

DPO minimises the forward KL(p_rh || p_f) instead (with eps = 0 it is -log sigmoid(z)); the reverse KL is
mode-seeking, which is what makes EXO match the RL solution. The minimum is at sigmoid(z) = 1 - eps, i.e. a
finite margin z* = log((1 - eps) / eps), so EXO, unlike DPO, stops pushing once a pair is separated enough.

Choices, and ours: eps = 1e-3 (ours, small; eps must be > 0, else the log eps term is infinite); beta = 0.1
(the policy-side temperature beta_pi); log pi is the whole-sequence log-prob; the paper
learns from a fixed preference dataset, so pair_source = "reference"; ties are left out.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.options import Option
from algorithms.preference.base import (PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner, logratio_margin,
                                        pairwise_rule)


def exo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, eps: float) -> dict[str, torch.Tensor]:
    """Per-pair EXO terms: "loss" = KL(p_f || p_rh) with p_f = softmax of beta log-ratios, p_rh = (1 - eps, eps)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"EXO's label smoothing eps must be in (0, 1), got {eps}")
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = beta * h
    log_p_w, log_p_l = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    loss = log_p_w.exp() * (log_p_w - math.log(1.0 - eps)) + log_p_l.exp() * (log_p_l - math.log(eps))
    return {"loss": loss, "h": h}


class EXOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.label_smoothing = 1e-3
        self.pair_source = "reference"  # the paper's setting: a fixed preference dataset

    def training(self, *, label_smoothing: float = NotProvided, **kwargs) -> EXOConfig:
        super().training(**kwargs)
        set_provided(self, label_smoothing=label_smoothing)
        return self

    def get_default_learner_class(self) -> type:
        return EXOLearner

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.label_smoothing < 0.5:
            self._value_error(f"label_smoothing must be in (0, 0.5), got {self.label_smoothing}")


class EXOLearner(PreferenceLearner):
    def pair_loss(self, config: EXOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return exo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta, config.label_smoothing)


RULE = dataclasses.replace(
    pairwise_rule("exo", "P187", "EXO: reverse KL between the policy's and the labels' distributions over a pair's "
                  "responses (label smoothing eps)", EXOConfig),
    options=PREFERENCE_OPTIONS + (
        Option("label_smoothing", "eps: probability the labels leave on the rejected response",
               lambda x: 0 < x < 0.5, "in (0, 0.5)"),),
)
