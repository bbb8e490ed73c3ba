"""VAS (P208): Han et al. 2024, "Value Augmented Sampling for Language Model Alignment and Personalization".

Responses y ~ pi_base(. | x) are sampled only from the frozen initial (SFT) policy and scored by the reward
r(x, y) (here the task's hidden score). A value model gives Q(x, y_<t, a) = V(x, y_<t ∘ a) for every next token
a in one pass; it is fitted with TD(lambda) on those samples, no discount, the reward at the end:

    G_last = r(x, y),   G_t = (1 - lambda) Q(x, y_<=t, y_t+1) + lambda G_t+1
    L_V = mean over response tokens of ( Q(x, y_<t, y_t) - stopgrad(G_t) )^2

Decoding keeps the base LM frozen and re-weights its top-k candidates (paper, eq. for the KL-regularised optimum
pi*(a|s) ∝ pi_base(a|s) exp(beta Q(s, a))):

    score(a) = log pi_base(a | x, y_<t) + beta * Q(x, y_<t, a)  for a in top-k(pi_base),   -inf otherwise

(`algorithms.common.guided_decoding`; `guide_strength` = beta).

Choices the paper leaves open, and ours: the value model is the base LM's architecture with an untied output
head read as Q-values, its body initialised from the SFT policy and its head at zero (so Q = 0 and decoding is
plain top-k sampling of the base before training; the paper initialises from a smaller pretrained LM);
lambda = 0.95; beta = 3 (reward units: the hidden score is 0 .. 3); top_k = 10 of the 13 tokens; the value
model is fitted after collection for `value_steps` Adam steps on minibatches of the collected responses (the
paper trains on a fixed dataset too). The samples reach the learner through the preference queue: the
generation actor adds two SFT samples per prompt as a pair, the reward labels the pair (higher reward wins;
equal rewards are a tie), the learner consumer reads, claims and acks it, and both responses become training
data with their rewards (ties included: VAS needs rewards, not preferences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from algorithms.common.guided_decoding import td_lambda_targets, token_values
from algorithms.common.losses import masked_mean, value_loss
from algorithms.common.sequence import build_causal_lm
from algorithms.options import Option, non_negative, positive, unit_interval
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig
from algorithms.preference.guided_loop import guided_check
from algorithms.preference.sft import fit_on_responses
from algorithms.rule import Rule
from envs.text_tasks import ReverseDigits


def vas_value_loss(q: torch.Tensor, response_mask: torch.Tensor, reward: torch.Tensor,
                   lam: float) -> dict[str, torch.Tensor]:
    """TD(lambda) regression of per-token Q-values (B, T) on right-padded responses with final rewards (B,):
    "loss" = mean over response tokens of (Q_t - G_t)^2, "targets" the G_t."""
    targets = td_lambda_targets(q, response_mask, reward, lam)
    mask = response_mask.bool()
    return {"loss": masked_mean(value_loss(q, targets), mask), "targets": targets}


def build_value_model(lm: Mapping[str, Any], base: torch.nn.Module) -> torch.nn.Module:
    """The base architecture with its own (untied) head: body copied from `base`, head zero (Q = 0)."""
    model = build_causal_lm({**lm, "tie_word_embeddings": False})
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise ValueError(f"value model does not match the base LM: missing {missing}, unexpected {unexpected}")
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model


def fit_value(model: torch.nn.Module, task: ReverseDigits, samples: Sequence[tuple[str, str, float]], *,
              steps: int, lam: float, lr: float, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Fit Q on (prompt, response, reward) samples with `vas_value_loss`; returns the loss of every step."""
    if not samples:
        raise ValueError("VAS needs at least one scored sample to fit its value model")
    rewards = torch.tensor([float(r) for _, _, r in samples])

    def td_loss(batch: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
        q = token_values(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return vas_value_loss(q, batch["response_mask"], rewards[idx], lam)["loss"]

    return fit_on_responses(model, task, [(p, r) for p, r, _ in samples], td_loss, steps=steps,
                            batch_size=batch_size, lr=lr, seed=seed)


class VASConfig(PreferenceConfig):
    """Reuses the preference options for SFT and sample collection (`pairs_per_step` pairs = 2x responses per
    step, always from the frozen SFT policy); `lr` is the value model's step size."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.pair_source = "reference"  # VAS only ever samples from the frozen initial policy
        self.guide_strength = 3.0  # beta of the decoding rule, per unit of reward
        self.top_k = 10
        self.td_lambda = 0.95
        self.value_steps = 400
        self.lr = 1e-3

    def training(self, *, guide_strength: float | None = None, top_k: int | None = None,
                 td_lambda: float | None = None, value_steps: int | None = None, **kwargs: Any) -> VASConfig:
        super().training(**kwargs)
        for name, value in dict(guide_strength=guide_strength, top_k=top_k, td_lambda=td_lambda,
                                value_steps=value_steps).items():
            if value is not None:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if self.pair_source != "reference":
            self._value_error("VAS samples only from the frozen SFT policy: pair_source must be 'reference'")
        if not self.guide_strength >= 0:
            self._value_error(f"guide_strength must be >= 0, got {self.guide_strength}")
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            self._value_error(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 <= self.td_lambda <= 1:
            self._value_error(f"td_lambda must be in [0, 1], got {self.td_lambda}")
        if not (isinstance(self.value_steps, int) and self.value_steps >= 1):
            self._value_error(f"value_steps must be an integer >= 1, got {self.value_steps!r}")


VAS_OPTIONS: tuple[Option, ...] = tuple(o for o in PREFERENCE_OPTIONS if o.name not in ("beta", "pair_source")) + (
    Option("guide_strength", "beta: weight of the value in the decoding scores (per unit of reward)", non_negative,
           ">= 0"),
    Option("top_k", "candidates of the base LM re-weighted per token", positive, ">= 1"),
    Option("td_lambda", "lambda of the TD(lambda) value targets", unit_interval, "in [0, 1]"),
    Option("value_steps", "Adam steps fitting the value model", positive, ">= 1"),
)


RULE = Rule(
    name="vas", family="preference", paper_ids=("P208",),
    summary="Value Augmented Sampling: TD(lambda) value of the frozen SFT policy's samples re-weights its top-k tokens",
    config_class=VASConfig, options=VAS_OPTIONS, learning_check=guided_check("P208"),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5, "value_steps": 5},
    check_runner="algorithms.preference.guided_loop:run_guided_check",
)
