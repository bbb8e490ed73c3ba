"""f-DPO (P073): Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints".

DPO's reverse-KL regulariser replaced by an f-divergence D_f(pi_theta || pi_ref). For an f whose derivative f'
is invertible with 0 outside its domain, the KKT conditions of max_pi E_pi[r] - beta D_f(pi || pi_ref) give

    r(x, y) = beta f'( pi(y|x) / pi_ref(y|x) ) + const(x)

with no partition function, so the Bradley-Terry likelihood of the preferences becomes

    u_w = pi_theta(y_w|x) / pi_ref(y_w|x),   u_l = pi_theta(y_l|x) / pi_ref(y_l|x)
    L_f-DPO = -E[ log sigmoid( beta f'(u_w) - beta f'(u_l) ) ]

f' for reverse KL (f' = log u + 1: exactly DPO), forward KL, Jensen-Shannon and the alpha-divergence lives in
`algorithms/common/f_divergences.py` (computed on log u; u itself under/overflows for sequences).

Choices the paper leaves open, and ours: u is the ratio of whole-sequence probabilities (the sum of the response's
token log-probs, eos included); default: the alpha-divergence with alpha = 0.5 (midway between reverse KL,
alpha -> 0, and forward KL, alpha -> 1: the family the paper interpolates along) and beta = 0.1 (ours);
"reverse_kl" reproduces DPO exactly. Measured on the learning check (seed 0, offline, beta 0.1, win rate vs SFT):
reverse_kl 0.720, alpha(0.5) 0.615, forward_kl 0.575, js 0.436 (js, beta 0.5: 0.545): reward drops as the
divergence moves away from reverse KL, the trade-off the paper reports; JS at beta 0.1 does not beat SFT here
(its exact-match rate rises, 0.40 vs 0.32, but more of its other responses are worse than the SFT policy's).
The paper learns from fixed preference datasets, so pair_source = "reference" (pairs sampled once from the SFT
policy, labelled by the scripted judge); ties are left out.
"""

from __future__ import annotations

import dataclasses

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.common.f_divergences import F_DIVERGENCES, f_prime
from algorithms.options import Option
from algorithms.preference.base import (PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner, logratio_margin,
                                        pairwise_rule)


def f_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, divergence: str = "alpha",
               alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-pair f-DPO terms: "loss" = -log sigmoid(beta (f'(u_w) - f'(u_l))), "reward_margin" the f'-margin."""
    margin = f_prime(policy_chosen - ref_chosen, divergence, alpha) - f_prime(policy_rejected - ref_rejected,
                                                                              divergence, alpha)
    return {"loss": -torch.nn.functional.logsigmoid(beta * margin), "reward_margin": margin,
            "h": logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)}


class FDPOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.divergence = "alpha"
        self.alpha = 0.5  # only read by the alpha-divergence
        self.pair_source = "reference"  # the paper's setting: fixed preference datasets

    def training(self, *, divergence: str = NotProvided, alpha: float = NotProvided, **kwargs) -> FDPOConfig:
        super().training(**kwargs)
        set_provided(self, divergence=divergence, alpha=alpha)
        return self

    def get_default_learner_class(self) -> type:
        return FDPOLearner

    def validate(self) -> None:
        super().validate()
        if self.divergence not in F_DIVERGENCES:
            self._value_error(f"divergence must be one of {', '.join(F_DIVERGENCES)}, got {self.divergence!r}")
        if self.divergence == "alpha" and not 0.0 < self.alpha < 1.0:
            self._value_error(f"alpha must be in (0, 1) for the alpha-divergence, got {self.alpha}")


class FDPOLearner(PreferenceLearner):
    def pair_loss(self, config: FDPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return f_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta,
                          config.divergence, config.alpha)


RULE = dataclasses.replace(
    pairwise_rule("f_dpo", "P073", "f-DPO: DPO with an f-divergence regulariser; BT loss on beta f'(pi/pi_ref) margins",
                  FDPOConfig),
    options=PREFERENCE_OPTIONS + (
        Option("divergence", "the f-divergence to the reference", lambda x: x in F_DIVERGENCES,
               " or ".join(F_DIVERGENCES)),
        Option("alpha", "alpha of the alpha-divergence", lambda x: 0 < x < 1, "in (0, 1)"),
    ),
)
