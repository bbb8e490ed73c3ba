"""DPO: Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"; not a seed paper, id DPO-2023).

For a prompt x with preferred response y_w and rejected y_l, policy pi_theta and frozen reference pi_ref:

    h(x, y_w, y_l) = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    L_DPO = -E[ log sigmoid(beta * h) ]                                            (paper, eq. 7)

Choices the paper leaves open, and ours: log pi(y|x) is the sum of the response's token log-probs (eos
included); the reference is the SFT policy, frozen; pairs are sampled online from the current policy by the
generation actor and labelled by the scripted judge (the paper's offline setting is the same loss on a fixed
dataset: import one with `services.preferences.datasets.import_jsonl`); ties carry no preference and are left
out of the mean (they are still acknowledged as used).
"""

from __future__ import annotations

import torch

from algorithms.preference.base import PreferenceConfig, logratio_margin, pairwise_rule


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO terms: "loss" = -log sigmoid(beta * h), "h" the log-ratio margin."""
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return {"loss": -torch.nn.functional.logsigmoid(beta * h), "h": h}


class DPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(dpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # the paper's default for most of its experiments


RULE = pairwise_rule(
    "dpo", "DPO-2023", "Direct Preference Optimization: logistic loss on the policy/reference log-ratio margin",
    DPOConfig,
)
