"""WPO: Weighted Preference Optimization (P227): Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
Optimization".

Off-policy preference pairs are reweighted by how likely the current policy is to produce them, so the DPO loss
on a fixed dataset behaves more like on a dataset sampled from the policy (the paper's weighted DPO loss with
its alignment-normalised weight, in the form of the authors' released training script):

    log w(x, y) = (1/|y|) sum_t [ log pi_theta(y_t | x, y_<t) - log sum_v pi_theta(v | x, y_<t)^2 ]
    w(x, y_w, y_l) = min(1, w(x, y_w) w(x, y_l))                    (detached: no gradient through the weight)
    L_WPO = E_D[ w(x, y_w, y_l) * -log sigmoid(beta h(x, y_w, y_l)) ]

with h DPO's log-ratio margin. Dividing each token probability by sum_v pi(v)^2 (the probability that a sample
of the policy's next-token distribution matches another sample) makes a token the policy would sample at its
usual confidence weigh 1, whatever the entropy of that step; the 1/|y| geometric mean keeps long responses from
vanishing. The mean of the weighted losses is taken over the batch (not divided by the sum of weights).

Choices, and ours: the weight uses the policy being trained (no separate behaviour model), its tokens' full
next-token distribution from one extra forward pass without gradients; ties are left out; the paper's data is
off-policy, so pair_source = "reference" (pairs sampled once from the SFT policy, never refreshed); beta = 0.1.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.preference.base import VALID, PreferenceConfig, PreferenceLearner, pairwise_rule
from algorithms.preference.dpo import dpo_loss
from algorithms.preference.module import PAIR_COLUMNS


def wpo_log_weight(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N,) log w(x, y) of rows whose (N, T, V) `logits` predict `input_ids` (N, T) shifted by one; the mean is
    over the response tokens (`response_mask`)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    log_match = torch.logsumexp(2.0 * logp, dim=-1)  # log sum_v pi(v)^2
    mask = response_mask[:, 1:].bool()
    per_token = torch.where(mask, picked - log_match, torch.zeros_like(picked))
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1)


def pair_weight(log_weight_chosen: torch.Tensor, log_weight_rejected: torch.Tensor) -> torch.Tensor:
    """min(1, w(y_w) w(y_l)), detached."""
    return torch.exp(torch.clamp(log_weight_chosen + log_weight_rejected, max=0.0)).detach()


def wpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair WPO terms: "loss" = weight * DPO loss; "weight" the (detached) pair weight."""
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return {"loss": weight.detach() * dpo["loss"], "dpo": dpo["loss"], "weight": weight.detach(), "h": dpo["h"]}


class WPOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.pair_source = "reference"  # the paper's setting: off-policy pairs the policy never regenerates

    def get_default_learner_class(self) -> type:
        return WPOLearner


class WPOLearner(PreferenceLearner):
    """Computes the pair weights under the current policy before the shared loss path calls `pair_loss`."""

    _weight: torch.Tensor | None = None

    def compute_loss_for_module(self, *, module_id: str, config: PreferenceConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        b, k, t = batch["input_ids"].shape
        flat = {c: batch[c].reshape(b * k, t) for c in PAIR_COLUMNS}
        with torch.no_grad():
            logits = self.policy_lm(module_id)(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"],
                                               position_ids=flat["position_ids"]).logits
            log_w = wpo_log_weight(logits, flat["input_ids"], flat["response_mask"]).reshape(b, k)
        self._weight = pair_weight(log_w[:, 0], log_w[:, 1])
        valid = batch[VALID].bool()
        if valid.any():
            self.metrics.log_dict({"wpo_weight": self._weight[valid].mean()}, key=module_id, window=1)
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    def pair_loss(self, config: WPOConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        if self._weight is None:
            raise RuntimeError("WPO's pair weights are computed in compute_loss_for_module; call that first")
        return wpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta, self._weight)


RULE = pairwise_rule("wpo", "P227", "Weighted Preference Optimization: DPO on off-policy pairs, each weighted by its "
                     "(length-normalised, detached) probability under the current policy", WPOConfig)
