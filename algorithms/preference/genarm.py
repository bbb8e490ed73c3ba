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

Choices the paper leaves open, and ours: the ARM is initialised from the SFT policy (the base; the paper
fine-tunes an ARM from a pretrained LM of the same family, with LoRA), and trained in full; beta_r = `beta`
= 0.1; 1/beta = `guide_strength` = 1; the pairs are sampled from the frozen SFT policy by the generation actor
(`pair_source="reference"`, a fixed dataset as in the paper) and labelled by the scripted judge through the
preference queue; ties are left out of the loss. Training runs through `loop.train_preference` (a LearnerGroup
whose "policy" is the ARM; the frozen reference copy is unused by this loss); `guided_loop` then decodes.
Because the ARM starts as a copy of the base, guidance at strength s before any training equals sampling the
base at temperature 1 / (1 + s): the learning check reports that "untrained ARM" control too.
"""

from __future__ import annotations

import torch

from algorithms.options import Option, non_negative
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner
from algorithms.preference.guided_loop import guided_check
from algorithms.rule import Rule


def arm_loss(arm_chosen: torch.Tensor, arm_rejected: torch.Tensor, beta_r: float) -> dict[str, torch.Tensor]:
    """Per-pair GenARM terms from the ARM's sequence log-probs: "loss" = -log sigmoid(beta_r (c - r)), and the
    reward margin r(x, y_w) - r(x, y_l) = beta_r (c - r)."""
    margin = beta_r * (arm_chosen - arm_rejected)
    return {"loss": -torch.nn.functional.logsigmoid(margin), "reward_margin": margin}


class GenARMLearner(PreferenceLearner):
    """The ARM is the module's LM; its loss needs no reference."""

    def pair_loss(self, config: PreferenceConfig, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        return arm_loss(policy_chosen, policy_rejected, config.beta)


class GenARMConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # beta_r of the ARM's Bradley-Terry loss
        self.guide_strength = 1.0  # 1 / beta of the decoding rule
        self.pair_source = "reference"  # the ARM learns from a fixed dataset sampled from the frozen base

    def training(self, *, guide_strength: float | None = None, **kwargs) -> GenARMConfig:
        super().training(**kwargs)
        if guide_strength is not None:
            self.guide_strength = guide_strength
        return self

    def get_default_learner_class(self) -> type:
        return GenARMLearner

    def validate(self) -> None:
        super().validate()
        if self.pair_source != "reference":  # "policy" would sample from the ARM, which is never decoded alone
            self._value_error("GenARM learns from pairs of the frozen base: pair_source must be 'reference'")
        if not self.guide_strength >= 0:
            self._value_error(f"guide_strength must be >= 0, got {self.guide_strength}")


RULE = Rule(
    name="genarm", family="preference", paper_ids=("P065",),
    summary="GenARM: autoregressive reward model (BT loss on token log-prob sums) guiding a frozen base LM's decoding",
    config_class=GenARMConfig,
    options=tuple(o for o in PREFERENCE_OPTIONS if o.name != "pair_source") + (
        Option("guide_strength", "1/beta: weight of the ARM's log-probs in the decoding scores", non_negative, ">= 0"),
    ),
    learning_check=guided_check("P065"),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5},
    check_runner="algorithms.preference.guided_loop:run_guided_check",
)
