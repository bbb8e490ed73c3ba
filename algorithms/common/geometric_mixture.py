"""Sampling from the token-level geometric mixture of two causal LMs (P021 IPO-MD, Nash-MD) (torch).

For a policy pi_theta and a reference pi_ref, the mixture used by IPO-MD / Nash-MD is defined per token:

    pi_mix(y_t | x, y_<t)  proportional to  pi_theta(y_t | x, y_<t)^(1 - beta) * pi_ref(y_t | x, y_<t)^beta

so its next-token log-probs are the normalised (1 - beta) log softmax(l_theta) + beta log softmax(l_ref).
beta = 0 is the policy, beta = 1 the reference. `GeometricMixtureLM` wraps the two models as one model whose
`.logits` are those (unnormalised) mixed log-probs, so any sampler of causal LMs can draw from the mixture.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


def mixture_logits(policy_logits: torch.Tensor, reference_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 - beta) log softmax(policy) + beta log softmax(reference): logits of the per-token geometric mixture."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"mixture beta must be in [0, 1], got {beta}")
    return ((1.0 - beta) * torch.log_softmax(policy_logits.float(), dim=-1)
            + beta * torch.log_softmax(reference_logits.float(), dim=-1))


class GeometricMixtureLM(torch.nn.Module):
    """A causal LM whose forward returns `.logits` of pi_theta^(1-beta) pi_ref^beta (token by token)."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, beta: float) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"mixture beta must be in [0, 1], got {beta}")
        self.policy, self.reference, self.beta = policy, reference, beta

    def forward(self, **inputs: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=mixture_logits(self.policy(**inputs).logits, self.reference(**inputs).logits,
                                                     self.beta))
