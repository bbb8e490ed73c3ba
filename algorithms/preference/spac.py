"""SPAC: Self-Play with Adversarial Critic (P249): Ji, Kulkarni, Wang, Xie 2024, "Self-Play with Adversarial Critic:
Provable and Scalable Offline Alignment for Language Models".

Offline alignment as a Stackelberg game with on-average pessimism (from offline RL): the critic (a reward f)
fits the preferences while keeping the learner's value low relative to the data,

    f_t = argmin_f  lambda (E_{x, y~pi_t}[f(x, y)] - E_{(x, y)~mu}[f(x, y)]) + L_BT(f; D)

and the learner plays the KL-regularised best response to f_t. With DPO's reparametrisation
f_theta = beta log(pi_theta / pi_ref) the best response is pi_theta itself, so one DPO-like loss trains both
players, the learner's responses y' coming from the policy itself (self-play):

    r_theta(x, y) = beta [log pi_theta(y|x) - log pi_ref(y|x)]
    L_SPAC = E_D[ -log sigmoid(r_theta(x, y_w) - r_theta(x, y_l)) ]
             + lambda ( E_{x~D, y'~pi_theta}[ r_theta(x, y') ] - E_D[ (r_theta(x, y_w) + r_theta(x, y_l)) / 2 ] )

The pessimism term lowers the implicit reward of what the policy generates and raises it on the responses the
data covers, so the policy is not rewarded for drifting where the dataset says nothing (sparse coverage).

Reconstructed from the paper's description (its practical algorithm was not available to us); our choices: y' is
one response per pair's prompt sampled from the current policy at update time (temperature = the config's),
treated as data (no gradient through the sampling); mu's responses are both responses of each labelled pair (the
dataset's response distribution), averaged; the reference is the frozen SFT policy; lambda = 1.0, beta = 0.1;
pairs are a fixed offline dataset (pair_source = "reference", the paper's setting); ties are left out of every term.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.common.pair_rows import score_responses, split_rows
from algorithms.common.sequence import sample_responses
from algorithms.options import Option, non_negative
from algorithms.preference.base import (PREFERENCE_OPTIONS, VALID, PreferenceConfig, PreferenceLearner,
                                        pairwise_rule)
from algorithms.preference.dpo import dpo_loss
from envs.text_tasks import EOS_ID, PAD_ID, make_task


def spac_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float, lam: float, policy_self: torch.Tensor,
              ref_self: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair SPAC terms. `policy_self`/`ref_self`: log-probs of the policy's own sample for the pair's prompt."""
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    reward_self = beta * (policy_self - ref_self)
    reward_data = beta * ((policy_chosen - ref_chosen) + (policy_rejected - ref_rejected)) / 2.0
    pessimism = reward_self - reward_data
    return {"loss": dpo["loss"] + lam * pessimism, "dpo": dpo["loss"], "pessimism": pessimism, "h": dpo["h"]}


class SPACConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.pessimism = 1.0  # lambda
        self.pair_source = "reference"  # the paper's setting: offline preference data

    def training(self, *, pessimism: float = NotProvided, **kwargs) -> SPACConfig:
        super().training(**kwargs)
        set_provided(self, pessimism=pessimism)
        return self

    def get_default_learner_class(self) -> type:
        return SPACLearner

    def validate(self) -> None:
        super().validate()
        if not self.pessimism >= 0:
            self._value_error(f"pessimism must be >= 0, got {self.pessimism}")


class SPACLearner(PreferenceLearner):
    """Samples the policy's own response for each pair's prompt and scores it before the shared loss path."""

    _self_play: tuple[torch.Tensor, torch.Tensor] | None = None

    def build(self) -> None:
        super().build()
        self._generator = torch.Generator().manual_seed(int(self.config.seed or 0))
        self._task = make_task(self.config.text_task)

    def compute_loss_for_module(self, *, module_id: str, config: SPACConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]
        prompts, _ = split_rows(ids[:, 0], batch["attention_mask"][:, 0], batch["response_mask"][:, 0])
        policy = self.policy_lm(module_id)
        samples = sample_responses(policy, prompts, max_new_tokens=self._task.max_new_tokens, eos_id=EOS_ID,
                                   pad_id=PAD_ID, temperature=config.temperature, generator=self._generator)
        policy_self = score_responses(policy, prompts, samples, PAD_ID, ids.device)
        with torch.no_grad():
            ref_self = score_responses(self._references[module_id], prompts, samples, PAD_ID, ids.device)
        self._self_play = (policy_self, ref_self)
        valid = batch[VALID].bool()
        if valid.any():
            gap = config.beta * (policy_self - ref_self).detach()
            self.metrics.log_dict({"self_play_reward": gap[valid].mean()}, key=module_id, window=1)
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    def pair_loss(self, config: SPACConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        if self._self_play is None:
            raise RuntimeError("SPAC's self-play responses are scored in compute_loss_for_module; call that first")
        return spac_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta, config.pessimism,
                         *self._self_play)


RULE = dataclasses.replace(
    pairwise_rule("spac", "P249", "SPAC: DPO-parametrised critic with on-average pessimism against the policy's own "
                  "samples (self-play), offline pairs", SPACConfig),
    options=PREFERENCE_OPTIONS + (
        Option("pessimism", "lambda: weight of the on-average pessimism term", non_negative, ">= 0"),),
)
