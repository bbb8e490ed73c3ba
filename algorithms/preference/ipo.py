"""IPO: Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to Understand
Learning from Human Preferences"; not a seed paper, id IPO-2023).

With the log-ratio margin h as in DPO,

    h(x, y_w, y_l) = log [ pi_theta(y_w|x) pi_ref(y_l|x) / (pi_theta(y_l|x) pi_ref(y_w|x)) ]
    L_IPO = E[ (h - 1 / (2 tau))^2 ]                                 (paper, sampled IPO loss, eq. 17 / Alg. 1)

a squared loss that regresses the margin to a finite target instead of pushing it to infinity, so the
regularisation towards pi_ref holds even for deterministic preferences. `beta` is the paper's tau.

Choices the paper leaves open, and ours: log pi(y|x) is the sum over the response's tokens (the paper's
pi(y); some implementations average per token instead); reference = the frozen SFT policy; pairs are
sampled online and labelled by the scripted judge; ties are left out (the paper's tie target h = 0 needs
both orders of a pair, which a single label does not give).
"""

from __future__ import annotations

import torch

from algorithms.preference.base import PreferenceConfig, logratio_margin, pairwise_rule


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """Per-pair IPO terms: "loss" = (h - 1/(2 tau))^2, "h" the log-ratio margin."""
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return {"loss": (h - 1.0 / (2.0 * tau)) ** 2, "h": h}


class IPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(ipo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # tau: target margin 1/(2 tau) = 5 nats


RULE = pairwise_rule(
    "ipo", "IPO-2023", "Identity Preference Optimisation: squared loss regressing the log-ratio margin to 1/(2 tau)",
    IPOConfig,
)
