"""P122: Learning Goal-Conditioned Representations for Language Reward Models (Nath et al. 2024).

The reward model (`reward_head.RewardModel`) is trained with the Bradley-Terry loss plus a contrastive,
goal-conditioned objective on its final hidden states h(.) (the representation the reward head reads). A
goal-conditioned "Q-value" of a source state s and a goal state g is their cosine similarity,

    Q(s, g) = cos(h_s, h_g)

and for each preference pair (x, y_w, y_l) the paper samples a positive triple along the preferred response and a
negative one that ends in the dispreferred response:

    s+ ~ tokens of y_w,  g+ ~ tokens of y_w after s+     (a future state of a preferred trajectory)
    s- ~ tokens of y_w,  g- ~ tokens of y_l              (a state of a dispreferred trajectory)
    L_goal = -log sigmoid(Q(s+, g+)) - log(1 - sigmoid(Q(s-, g-)))
    L = L_BT + lambda * L_goal,        L_BT = -log sigmoid(r(x, y_w) - r(x, y_l))

Choices the paper leaves open (or that we could not confirm in its text), and ours: one positive and one
negative triple per pair per update, each position uniform over its allowed tokens (eos included, prompt tokens
excluded); the two sources are drawn independently; Q is the plain cosine (no temperature); lambda
(`goal_weight`) = 0.5; pairs whose preferred response has one token (no future state) and ties are left out of
L_goal. The paper's inference-time uses of the representations (filtering, steering) are not part of the rule.
The learning check is the plain RM's (held-out accuracy vs the hidden score), with the plain RM trained on the
same queue batches in the same run (goal_weight = 0) reported next to it: does the auxiliary loss help?
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.common.losses import masked_mean
from algorithms.options import Option, non_negative
from algorithms.preference.reward_head import HIDDEN
from algorithms.preference.reward_model import (
    RM_OPTIONS,
    RewardModelConfig,
    RewardModelLearner,
    reward_model_check,
)
from algorithms.rule import Rule

PLAIN_VARIANT = "plain_rm"  # the ablation trained beside it in the learning check


def goal_contrastive_loss(src_pos: torch.Tensor, goal_pos: torch.Tensor, src_neg: torch.Tensor,
                          goal_neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair terms from (B, H) representations: "loss" = -log sig(Q+) - log(1 - sig(Q-)), Q = cosine."""
    q_pos = torch.nn.functional.cosine_similarity(src_pos, goal_pos, dim=-1)
    q_neg = torch.nn.functional.cosine_similarity(src_neg, goal_neg, dim=-1)
    loss = -torch.nn.functional.logsigmoid(q_pos) - torch.nn.functional.logsigmoid(-q_neg)  # 1 - sig(q) = sig(-q)
    return {"loss": loss, "q_pos": q_pos, "q_neg": q_neg}


def sample_positions(allowed: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """One position per row, uniform over the True entries of `allowed` (N, T). Returns (index, ok): rows with no
    allowed position get index 0 and ok False."""
    ok = allowed.any(-1)
    weights = torch.where(ok.unsqueeze(-1), allowed.float(), torch.ones_like(allowed, dtype=torch.float))
    return torch.multinomial(weights, 1, generator=generator).squeeze(-1), ok


def goal_triples(chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
    """Sampled positions (B,) of s+, g+ (both in y_w, g+ after s+), s- (in y_w) and g- (in y_l), and `ok`."""
    t = chosen_mask.shape[-1]
    positions = torch.arange(t, device=chosen_mask.device)
    # a source needs a later token of the same response: every response token but the last one
    has_future = chosen_mask & (chosen_mask.flip(-1).cumsum(-1).flip(-1) > 1)
    src_pos, ok_src = sample_positions(has_future, generator)
    goal_pos, _ = sample_positions(chosen_mask & (positions > src_pos.unsqueeze(-1)), generator)
    src_neg, ok_w = sample_positions(chosen_mask, generator)
    goal_neg, ok_l = sample_positions(rejected_mask, generator)
    return {"src_pos": src_pos, "goal_pos": goal_pos, "src_neg": src_neg, "goal_neg": goal_neg,
            "ok": ok_src & ok_w & ok_l}


class GoalRMConfig(RewardModelConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.goal_weight = 0.5  # lambda; 0 gives the plain Bradley-Terry RM (the ablation)

    def training(self, *, goal_weight: float | None = None, **kwargs: Any) -> GoalRMConfig:
        super().training(**kwargs)
        if goal_weight is not None:
            self.goal_weight = goal_weight
        return self

    def get_default_learner_class(self) -> type:
        return GoalRMLearner

    def validate(self) -> None:
        super().validate()
        if not self.goal_weight >= 0:
            self._value_error(f"goal_weight must be >= 0, got {self.goal_weight}")


class GoalRMLearner(RewardModelLearner):
    def aux_loss(self, config: GoalRMConfig, batch: dict[str, Any], fwd_out: dict[str, Any],
                 valid: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if config.goal_weight == 0:
            return None, {}
        hidden = fwd_out[HIDDEN]  # (B, 2, T, H), chosen first
        mask = batch["response_mask"].bool()
        if getattr(self, "_triple_rng", None) is None:
            # its own seeded stream: the sampled triples must not depend on what else uses torch's global RNG
            # (e.g. another RM trained in the same process), so a run is reproducible from its seed
            self._triple_rng = torch.Generator(device=hidden.device).manual_seed(int(config.seed or 0))
        idx = goal_triples(mask[:, 0], mask[:, 1], self._triple_rng)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        terms = goal_contrastive_loss(hidden[rows, 0, idx["src_pos"]], hidden[rows, 0, idx["goal_pos"]],
                                      hidden[rows, 0, idx["src_neg"]], hidden[rows, 1, idx["goal_neg"]])
        use = valid & idx["ok"]
        goal = masked_mean(terms["loss"], use)
        return config.goal_weight * goal, {"goal_loss": goal, "q_pos": masked_mean(terms["q_pos"], use),
                                           "q_neg": masked_mean(terms["q_neg"], use)}


def run_goal_rm_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    """The RM check, with the plain RM (goal_weight 0) trained on the same batches and reported beside it."""
    from algorithms.preference.rm_loop import run_reward_model_check

    return run_reward_model_check(rule, seeds, variants={PLAIN_VARIANT: {"goal_weight": 0.0}})


RULE = Rule(
    name="goal_rm", family="preference", paper_ids=("P122",),
    summary="Goal-conditioned RM: Bradley-Terry loss + contrastive goal-conditioned representation loss",
    config_class=GoalRMConfig,
    options=RM_OPTIONS + (Option("goal_weight", "weight lambda of the goal-conditioned contrastive loss",
                                 non_negative, ">= 0"),),
    learning_check=reward_model_check("P122", " The plain RM trained on the same batches in the same run is "
                                              "reported as plain_rm_accuracy (the paper's with/without comparison)."),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5, "rm_epochs": 1},
    check_runner="algorithms.preference.goal_rm:run_goal_rm_check",
)
