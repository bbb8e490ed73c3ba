"""GenARM (P065): Xu et al. 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model for
Test-time Alignment".

An Autoregressive Reward Model pi_r (a causal LM) scores a response as a sum of next-token terms,

    r(x, y) = beta_r * sum_t log pi_r(y_t | x, y_<t)

and is trained on preference pairs with the Bradley-Terry loss

    L_ARM = -E[ log sigmoid( beta_r * ( sum_t log pi_r(y_w,t | .) - sum_t log pi_r(y_l,t | .) ) ) ]

At test time the frozen base LM is decoded token by token with

    pi_decode(y_t | x, y_<t) ∝ pi_base(y_t | x, y_<t) * pi_r(y_t | x, y_<t)^(1/beta)

i.e. next-token scores log pi_base + (1/beta) log pi_r (`algorithms.common.guided_decoding`); the option
`guide_strength` is 1/beta. No weight of the base LM changes.

Read from the paper (arXiv 2410.08193) and its official code (github.com/Yuancheng-Xu/GenARM): the ARM is
fine-tuned from the base/SFT model itself (LoRA r=8 on LLaMA-7B-SFT for HH-RLHF, beta_r = 0.05, lr 5e-4, 1 epoch of
~160k pairs; full fine-tuning of Tulu2-7B for UltraFeedback, beta_r = 0.1, lr 5e-7, 3 epochs; PKU-SafeRLHF beta_r 0.5
/ 0.01); the loss is the sum (not the mean) of token log-probs, no reference model; decoding uses alpha = 1 (the
weight of log pi_r; their sampler's temperature 1 / (1 + alpha) undoes model-arithmetic's normalisation, so
pi_decode = pi_base * pi_r^alpha at temperature 1). The strength is a user's knob in the paper (alpha from 0 to 1+).

Ours: the ARM starts as a copy of the SFT policy (the base) and is trained in full (no LoRA: a 2-layer, 64-wide
model); beta_r = `beta` = 0.05 (the paper's HH value); lr 1e-3 (Adam, constant); the pairs are two samples of the
frozen SFT policy per prompt (`pair_source="reference"`, a fixed dataset as in the paper), added by the generation
actor to the preference queue, labelled by the scripted judge, consumed and acked by the driver; then
`arm_epochs - 1` = 11 shuffled replays of the 1536 acked pairs (the paper makes 1-3 passes over 60k-160k pairs;
1536 pairs need more: measured on validation prompts, seed 0, guided vs untrained ARM at strength 0.1 was 0.57 after
3 passes, 0.60 after 6, 0.63 after 12; with more passes the ARM overfits the noisy labels: its held-out accuracy
falls, seed 1: 0.99 / 0.97 / 0.95 after 5 / 10 / 15, and guidance at strength >= 0.5 gets worse). Ties are left out of the loss. Training is a LearnerGroup whose "policy" is the ARM
(`guided_loop._train_genarm`).

The strength (1/beta = alpha): the paper's alpha = 1 leaves nothing to learn here: the untrained ARM (= the base)
at strength 1 is the base at temperature 1/2, which already answers ~89 % of prompts exactly (the SFT policy's
likelihood orders responses by the hidden score almost perfectly), so guided vs that control is capped near 0.54
whatever the ARM learns. By default (`guide_strength=None`) the strength is chosen after training from
`strength_grid` (0.05, 0.1, 0.25, 0.5, 1) by the win rate of guided decoding vs the untrained ARM at the same
strength on 256 validation prompts from their own stream (`guided_loop.select_strength`), never the check's
held-out prompts; a number fixes it. Because the ARM starts as a copy of the base, guidance at strength s before
any training equals sampling the base at temperature 1 / (1 + s): that is the learning check's control.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from algorithms.common.bradley_terry import pairwise_accuracy
from algorithms.common.sequence import pad_pairs, sequence_logprobs
from algorithms.options import Option, non_negative, positive
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner
from algorithms.preference.guided_loop import guided_check
from algorithms.rule import Rule
from envs.text_tasks import PAD_ID, ReverseDigits


def arm_loss(arm_chosen: torch.Tensor, arm_rejected: torch.Tensor, beta_r: float) -> dict[str, torch.Tensor]:
    """Per-pair GenARM terms from the ARM's sequence log-probs: "loss" = -log sigmoid(beta_r (c - r)), and the
    reward margin r(x, y_w) - r(x, y_l) = beta_r (c - r)."""
    margin = beta_r * (arm_chosen - arm_rejected)
    return {"loss": -torch.nn.functional.logsigmoid(margin), "reward_margin": margin}


@torch.no_grad()
def arm_rewards(arm: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str], responses: Sequence[str],
                beta_r: float) -> np.ndarray:
    """r(x, y) = beta_r * sum_t log pi_r(y_t | x, y_<t) for text prompts and responses (one row each)."""
    batch = pad_pairs([task.prompt_ids(p) for p in prompts], [task.response_ids(r) for r in responses], PAD_ID,
                      side="right")
    return (beta_r * sequence_logprobs(arm, batch)).numpy()


def arm_accuracy(arm: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str], first: Sequence[str],
                 second: Sequence[str], minus: torch.nn.Module | None = None) -> dict[str, float]:
    """How often the ARM's reward orders two responses as the task's hidden score does (pairs whose scores differ;
    0.5 = chance; beta_r > 0 does not change an order). With `minus` (the untrained ARM) the order is that of
    log pi_r - log pi_minus: what training added, apart from the likelihood the ARM started with."""
    def reward(ys: Sequence[str]) -> np.ndarray:
        r = arm_rewards(arm, task, prompts, ys, 1.0)
        return r if minus is None else r - arm_rewards(minus, task, prompts, ys, 1.0)

    s1 = np.array([task.score(p, y) for p, y in zip(prompts, first)])
    s2 = np.array([task.score(p, y) for p, y in zip(prompts, second)])
    acc, se, n = pairwise_accuracy(reward(first), reward(second), s1, s2)
    return {"accuracy": acc, "accuracy_se": se, "scored_pairs": n}


class GenARMLearner(PreferenceLearner):
    """The ARM is the module's LM; its loss needs no reference."""

    def pair_loss(self, config: PreferenceConfig, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        return arm_loss(policy_chosen, policy_rejected, config.beta)


def _is_strength(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


class GenARMConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.05  # beta_r of the ARM's Bradley-Terry loss (the paper's HH-RLHF value)
        # 1 / beta of the decoding rule; None: chosen after training from `strength_grid` on validation prompts
        # (guided vs the untrained ARM at the same strength), never on the check's held-out prompts.
        self.guide_strength: float | None = None
        self.strength_grid: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)  # 1.0 is the paper's alpha
        self.pair_source = "reference"  # the ARM learns from a fixed dataset sampled from the frozen base
        self.arm_epochs = 12  # passes over the labelled pairs: the first through the queue, the rest replayed

    def training(self, *, guide_strength: float | None = None, strength_grid: Sequence[float] | None = None,
                 arm_epochs: int | None = None, **kwargs) -> GenARMConfig:
        super().training(**kwargs)
        if guide_strength is not None:
            self.guide_strength = guide_strength
        if strength_grid is not None:
            self.strength_grid = tuple(strength_grid)
        if arm_epochs is not None:
            self.arm_epochs = arm_epochs
        return self

    def get_default_learner_class(self) -> type:
        return GenARMLearner

    def validate(self) -> None:
        super().validate()
        if self.pair_source != "reference":  # "policy" would sample from the ARM, which is never decoded alone
            self._value_error("GenARM learns from pairs of the frozen base: pair_source must be 'reference'")
        if self.guide_strength is not None and not self.guide_strength >= 0:
            self._value_error(f"guide_strength must be >= 0 (or None: chosen on validation prompts), "
                              f"got {self.guide_strength}")
        if not (self.strength_grid and all(_is_strength(x) for x in self.strength_grid)):
            self._value_error(f"strength_grid must be a non-empty list of numbers >= 0, got {self.strength_grid!r}")
        if not (isinstance(self.arm_epochs, int) and self.arm_epochs >= 1):
            self._value_error(f"arm_epochs must be an integer >= 1, got {self.arm_epochs}")


RULE = Rule(
    name="genarm", family="preference", paper_ids=("P065",),
    summary="GenARM: autoregressive reward model (BT loss on token log-prob sums) guiding a frozen base LM's decoding",
    config_class=GenARMConfig,
    options=tuple(o for o in PREFERENCE_OPTIONS if o.name != "pair_source") + (
        Option("guide_strength", "1/beta: weight of the ARM's log-probs in the decoding scores (none: chosen on "
               "validation prompts from strength_grid)", lambda x: x is None or non_negative(x), ">= 0 or none"),
        Option("strength_grid", "strengths tried on validation prompts when guide_strength is none",
               lambda x: isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_strength(v) for v in x),
               "a non-empty list of numbers >= 0"),
        Option("arm_epochs", "passes over the labelled pairs (the first through the queue)", positive, ">= 1"),
    ),
    learning_check=guided_check("P065"),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5, "arm_epochs": 2, "strength_grid": (0.5, 1.0)},
    check_runner="algorithms.preference.guided_loop:run_guided_check",
)
