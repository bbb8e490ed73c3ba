"""The squared (IPO-style) regression onto a proximal preference step, shared by INPO (P278) and Nash-MP (P080).

Both rules move from an anchor policy pi_k (the last iterate) towards a target of the form

    pi*(y|x)  proportional to  pi_ref(y|x)^a * pi_k(y|x)^(1 - a) * exp(c * P(y > mu | x))

(a in [0, 1]: the weight of the reference; c > 0: the step on the win probability against an opponent mu). With
pairs y, y' ~ mu labelled y_w > y_l, the population minimiser of

    L = E[ (h - c / 2)^2 ],   h = log pi(y_w)/pi(y_l) - a log pi_ref(y_w)/pi_ref(y_l) - (1 - a) log pi_k(y_w)/pi_k(y_l)

is exactly pi* (the argument of IPO: the label's expectation is P(y > y'), and the squared loss regresses h onto
c (P(y > mu) - P(y' > mu))). a = 1 with c = 1/tau and no anchor is IPO itself.
"""

from __future__ import annotations

import torch


def anchored_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, anchor_chosen: torch.Tensor, anchor_rejected: torch.Tensor,
                    ref_weight: float) -> torch.Tensor:
    """h = log-ratio margin of the policy minus the margin of the log-linear mix pi_ref^a pi_k^(1-a)."""
    policy = policy_chosen - policy_rejected
    prior = ref_weight * (ref_chosen - ref_rejected) + (1.0 - ref_weight) * (anchor_chosen - anchor_rejected)
    return policy - prior


def proximal_regression_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                             ref_rejected: torch.Tensor, anchor_chosen: torch.Tensor, anchor_rejected: torch.Tensor,
                             ref_weight: float, step: float) -> dict[str, torch.Tensor]:
    """Per-pair (h - step/2)^2 with h from `anchored_margin` (ref_weight = a, step = c in the module docstring)."""
    if not 0.0 <= ref_weight <= 1.0:
        raise ValueError(f"ref_weight must be in [0, 1], got {ref_weight}")
    h = anchored_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, anchor_chosen, anchor_rejected,
                        ref_weight)
    return {"loss": (h - step / 2.0) ** 2, "h": h}
