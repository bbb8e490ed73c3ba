"""HyPO (P268): Hybrid Preference Optimization (Song et al. 2024, "The Importance of Online Data: Understanding
Preference Fine-tuning via Coverage"). DPO on offline preference pairs plus a reverse-KL penalty estimated on
online samples of the current policy:

    L(theta) = E_{(x, y_w, y_l) ~ D_offline}[ -log sigmoid(beta h) ]
               + lambda * E_{x ~ D, y ~ pi_theta}[ log pi_theta(y|x) / pi_ref(y|x) ]   (= lambda KL(pi_theta || pi_ref))

The KL's gradient is estimated by REINFORCE with the sequence log-ratio r(y) = log pi_theta(y)/pi_ref(y) as the
(stop-gradient) reward: grad KL = E_y~pi[ r(y) grad log pi(y) ]. With two samples per prompt we baseline each
by the other (leave-one-out), still unbiased:

    surrogate = 1/2 sum_{i=1,2} sg[r_i - r_{3-i}] * log pi_theta(y_i|x),     KL estimate = mean r_i

Design (ours): the offline data is the SFT policy's own samples, fixed (pair_source = "reference": the generation
actor keeps the SFT weights), labelled by the judge through the queue; the online samples are drawn INSIDE each
Learner from its current policy, two per prompt of the batch (every pair's prompt, ties included), with no
gradient, then scored with gradient. So online data never crosses the queue, and no labels are needed for it.
lambda = `kl_coef` = 0.01 (ours; the paper tunes it), beta = 0.1; log pi(y|x) is the sum over response tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.common.losses import masked_mean
from algorithms.common.sequence import pad_pairs, sample_responses
from algorithms.options import Option, non_negative
from algorithms.preference.base import PreferenceConfig, PreferenceLearner, pairwise_rule
from algorithms.preference.dpo import dpo_loss
from algorithms.preference.module import PAIR_COLUMNS, pair_logprobs
from envs.text_tasks import EOS_ID, PAD_ID, make_task


def reverse_kl_surrogate(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-prompt terms from two samples y_1, y_2 ~ pi of each prompt ((B, 2) log-probs, the policy's with grad):
    "loss" = 1/2 sum_i sg[r_i - r_j] log pi(y_i) (its gradient estimates grad KL(pi || pi_ref)), "kl" = mean_i r_i."""
    r = (policy_logp - ref_logp).detach()
    advantage = r - r.flip(-1)  # leave-one-out baseline: the other sample of the same prompt
    return {"loss": 0.5 * (advantage * policy_logp).sum(-1), "kl": r.mean(-1)}


class HyPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(dpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.kl_coef = 0.01  # lambda
        self.pair_source = "reference"  # the offline dataset: samples of the fixed SFT policy

    def training(self, *, kl_coef: float | None = None, **kwargs: Any) -> HyPOConfig:
        super().training(**kwargs)
        if kl_coef is not None:
            self.kl_coef = kl_coef
        return self

    def get_default_learner_class(self) -> type:
        return HyPOLearner

    def validate(self) -> None:
        super().validate()
        if not self.kl_coef >= 0:
            self._value_error(f"kl_coef must be >= 0, got {self.kl_coef}")


def prompt_rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt token ids of each pair of a right-padded (B, 2, T) batch (the first response's row)."""
    prompt_mask = batch["attention_mask"][:, 0].bool() & ~batch["response_mask"][:, 0].bool()
    return [row[mask].tolist() for row, mask in zip(batch["input_ids"][:, 0], prompt_mask)]


class HyPOLearner(PreferenceLearner):
    def build(self) -> None:
        super().build()
        self._sampling = torch.Generator().manual_seed(int(self.config.seed or 0))

    @torch.no_grad()
    def online_samples(self, config: HyPOConfig, module_id: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Two fresh responses of the current policy per prompt of the batch, as a (B, 2, T) pair batch."""
        task = make_task(config.text_task)
        prompts = prompt_rows(batch)
        width = batch["input_ids"].shape[-1]
        rows = [p for p in prompts for _ in range(2)]
        responses = sample_responses(self.policy_lm(module_id), rows, max_new_tokens=task.max_new_tokens,
                                     eos_id=EOS_ID, pad_id=PAD_ID, temperature=config.temperature,
                                     generator=self._sampling)
        padded = pad_pairs(rows, responses, PAD_ID, side="right", length=width)
        device = batch["input_ids"].device
        return {c: padded[c].reshape(len(prompts), 2, width).to(device) for c in PAIR_COLUMNS}

    def compute_loss_for_module(self, *, module_id: str, config: HyPOConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        dpo = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if config.kl_coef == 0:
            return dpo
        samples = self.online_samples(config, module_id, batch)
        policy_logp = pair_logprobs(self.policy_lm(module_id), samples)  # with grad (DDP hooks fire on params)
        with torch.no_grad():
            ref_logp = pair_logprobs(self._references[module_id], samples)
        terms = reverse_kl_surrogate(policy_logp, ref_logp)
        self.metrics.log_dict({"online_kl": terms["kl"].mean().detach()}, key=module_id, window=1)
        return dpo + config.kl_coef * masked_mean(terms["loss"], None)


RULE = pairwise_rule(
    "hypo", "P268", "HyPO: DPO on a fixed offline (SFT-policy) dataset + lambda * reverse KL on fresh policy samples",
    HyPOConfig,
    extra_options=(Option("kl_coef", "lambda, weight of the online reverse-KL term", non_negative, ">= 0"),),
)
