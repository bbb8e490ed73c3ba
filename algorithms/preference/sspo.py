"""SPO: Self-supervised Preference Optimization (P129), registered as "sspo" (P011's Self-Play PO is also "SPO"):
Li et al. 2024, "Self-supervised Preference Optimization: Enhance Your Language Model with Preference Degree
Awareness".

A pairwise alignment loss (DPO here) plus a self-supervised preference-degree loss. The degrees are built without
labels: the key content of a response (the paper extracts key phrases with RAKE) is removed in increasing amounts,
giving copies y^(0) = y, y^(1), ..., y^(K) each missing one more piece of key content, so y^(k) is preferred to
y^(k+1) by construction; the model is trained to recognise the degree. The total loss is

    L_SPO = L_DPO(x, y_w, y_l) + lambda * L_deg(x, y_w)        (degree_responses = "chosen", the default)
    L_SPO = L_DPO(x, y_w, y_l) + lambda * [ L_deg(x, y_w) + L_deg(x, y_l) ] / 2      (degree_responses = "both")

and we score the degrees with the policy's own implicit reward r(x, y) = beta log(pi_theta(y|x) / pi_ref(y|x)),
with a Plackett-Luce (listwise) cross-entropy over the ordering of the degrees:

    L_deg(x, y) = - sum_{k=0}^{K-1} log [ exp r(x, y^(k)) / sum_{j=k}^{K} exp r(x, y^(j)) ]

Choices, and ours: the paper classifies the degree with a classifier on the LM's representations; this module
has no extra head (the shared RLModule is a plain causal LM), so the classifier's scores are the implicit
rewards and the classification target is the degree order (each term of L_deg is the cross-entropy of picking
the least-damaged remaining copy) -- our substitution, which keeps the degree signal in the same reward the DPO
term shapes. Key content of ReverseDigits responses = the digit tokens (eos never removed); K = 2 removals at
random positions (nested, seeded); degrees of the chosen response only by default: with the implicit reward as
the degree scorer, degrees of the rejected response would also raise its reward against the DPO term, which a
separate classifier head would not ("both" keeps the paper's use of every response); lambda = 0.5, beta = 0.1 (ours);
offline pairs (pair_source = "reference", the paper's fixed datasets); ties are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import check_positive_ints, set_provided
from algorithms.common.pair_rows import removal_degrees, score_responses, split_rows
from algorithms.options import Option, non_negative, positive
from algorithms.preference.base import (PREFERENCE_OPTIONS, VALID, PreferenceConfig, PreferenceLearner,
                                        pairwise_rule)
from algorithms.preference.dpo import dpo_loss
from envs.text_tasks import PAD_ID, TOKEN_ID

KEY_TOKENS = frozenset(TOKEN_ID[d] for d in "0123456789")  # the content of a ReverseDigits response
DEGREE_RESPONSES = ("chosen", "both")


def degree_loss(rewards: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(R, K+1) implicit rewards of the degree copies (column k = k pieces removed), `present` (R, K+1) bool
    marking copies that exist (a response with fewer key tokens has fewer) -> (R,) Plackett-Luce loss."""
    # absent copies get a huge negative finite score, not -inf: a row of -inf makes logcumsumexp's gradient NaN
    masked = torch.where(present, rewards, torch.full_like(rewards, -1e9))
    # log sum_{j >= k} exp r_j: a reversed cumulative logsumexp
    tail = torch.flip(torch.logcumsumexp(torch.flip(masked, [-1]), dim=-1), [-1])
    terms = torch.where(present, rewards - tail, torch.zeros_like(rewards))
    return -terms.sum(-1)


def sspo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float, lam: float, degree: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair terms: "loss" = DPO + lam * the pair's degree loss (`degree_loss` of its responses, see the class)."""
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return {"loss": dpo["loss"] + lam * degree, "dpo": dpo["loss"], "degree": degree, "h": dpo["h"]}


class SSPOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.degree_weight = 0.5  # lambda
        self.degrees = 2  # K: key-content removals per response
        self.degree_responses = "chosen"  # whose degree copies enter the loss: "chosen" or "both"
        self.pair_source = "reference"  # the paper's setting: fixed preference datasets

    def training(self, *, degree_weight: float = NotProvided, degrees: int = NotProvided,
                 degree_responses: str = NotProvided, **kwargs) -> SSPOConfig:
        super().training(**kwargs)
        set_provided(self, degree_weight=degree_weight, degrees=degrees, degree_responses=degree_responses)
        return self

    def get_default_learner_class(self) -> type:
        return SSPOLearner

    def validate(self) -> None:
        super().validate()
        if not self.degree_weight >= 0:
            self._value_error(f"degree_weight must be >= 0, got {self.degree_weight}")
        check_positive_ints(self, "degrees")
        if self.degree_responses not in DEGREE_RESPONSES:
            self._value_error(f"degree_responses must be one of {', '.join(DEGREE_RESPONSES)}, "
                              f"got {self.degree_responses!r}")


class SSPOLearner(PreferenceLearner):
    """Builds the degree copies of the responses and their degree losses before the shared loss path."""

    _degree: torch.Tensor | None = None

    def build(self) -> None:
        super().build()
        self._generator = torch.Generator().manual_seed(int(self.config.seed or 0))

    def compute_loss_for_module(self, *, module_id: str, config: SSPOConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        b, _, t = batch["input_ids"].shape
        k = 1 if config.degree_responses == "chosen" else 2  # the chosen response is column 0
        flat = {c: batch[c][:, :k].reshape(b * k, t) for c in ("input_ids", "attention_mask", "response_mask")}
        prompts, responses = split_rows(flat["input_ids"], flat["attention_mask"], flat["response_mask"])
        width = config.degrees + 1
        rows_p, rows_r, slots = [], [], []  # slot = row * width + degree of each copy that exists
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            for d, variant in enumerate(removal_degrees(response, KEY_TOKENS, config.degrees, self._generator)):
                rows_p.append(prompt)
                rows_r.append(variant)
                slots.append(row * width + d)
        device = batch["input_ids"].device
        policy = score_responses(self.policy_lm(module_id), rows_p, rows_r, PAD_ID, device)
        with torch.no_grad():
            ref = score_responses(self._references[module_id], rows_p, rows_r, PAD_ID, device)
        index = torch.tensor(slots, device=device)
        rewards = torch.zeros(b * k * width, device=device).index_put((index,), config.beta * (policy - ref))
        present = torch.zeros(b * k * width, dtype=torch.bool, device=device).index_fill(0, index, True)
        losses = degree_loss(rewards.reshape(b * k, width), present.reshape(b * k, width)).reshape(b, k)
        self._degree = losses.mean(-1)
        valid = batch[VALID].bool()
        if valid.any():
            self.metrics.log_dict({"degree_loss": losses[valid].mean().detach()}, key=module_id, window=1)
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    def pair_loss(self, config: SSPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        if self._degree is None:
            raise RuntimeError("SSPO's degree losses are computed in compute_loss_for_module; call that first")
        return sspo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta,
                         config.degree_weight, self._degree)


RULE = dataclasses.replace(
    pairwise_rule("sspo", "P129", "Self-supervised Preference Optimization: DPO + a preference-degree loss over copies "
                  "of each response with increasing key content removed", SSPOConfig),
    options=PREFERENCE_OPTIONS + (
        Option("degree_weight", "lambda: weight of the self-supervised degree loss", non_negative, ">= 0"),
        Option("degrees", "K: key-content removals per response (degree copies = K + 1)", positive, ">= 1"),
        Option("degree_responses", "whose degree copies enter the loss", lambda x: x in DEGREE_RESPONSES,
               " or ".join(DEGREE_RESPONSES)),
    ),
)
