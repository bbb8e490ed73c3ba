"""P241 Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms" (ICLR 2021): the two DQN losses the
paper's evolutionary search found when bootstrapped from DQN (section 4.3), as the `value_loss` option.

With Y_t = r_t + gamma (1 - d_t) max_a Q_targ(s_{t+1}, a) and delta = Q(s_t, a_t) - Y_t (the paper's notation):

    DQNReg:      L = 0.1 Q(s_t, a_t) + delta^2                                                    (`dqn_reg`)
    DQNClipped:  L = max[Q(s_t, a_t), delta^2 + Y_t]
                     + max[Q(s_t, a_t) - Y_t, gamma (max_a Q_targ(s_{t+1}, a))^2]                 (`dqn_clipped`)

averaged over the minibatch; Y_t and Q_targ carry no gradient (the target network is not trained). DQNReg pushes
every Q(s, a) down with a constant weight (0.1 = `reg_weight`; the paper's best programs all had the form
delta^2 + k Q with k near 0.1); DQNClipped minimises Q itself while Q > delta^2 + Y (an overestimate) and is
delta^2 otherwise; its second term only adds gradient when the TD error exceeds gamma max Q_targ^2.

Choices the paper leaves open, ours: the paper writes Q_targ(s_t, a) for the next state's target value; we use
s_{t+1} as in its TD loss. Terminal transitions: (1 - d) multiplies max_a Q_targ(s_{t+1}, a) in Y and in the
second term of DQNClipped (the paper's search language has no separate terminal input). Everything else is the
`dqn` rule (algorithms/offpolicy/dqn.py: RL-Zoo's CartPole hyperparameters, 256-256 ReLU MLP, Adam, target copy
every 128 gradient steps, epsilon-greedy, Redis replay) so the check compares the loss alone; the paper itself
trained with Adam lr 1e-4 and epsilon 1 -> 0.05 over 1e3 steps. `double_q` swaps Y's next value for double DQN's.
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.dqn.dqn_learner import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.offpolicy.base import DISCOUNTS, PRIORITY_WEIGHTS
from algorithms.offpolicy.dqn import RULE as DQN_RULE
from algorithms.offpolicy.dqn import DQNRule, DQNRuleConfig, DQNRuleLearner
from algorithms.options import Option, non_negative
from algorithms.rule import LearningCheck, Rule

EVOLVED_LOSSES = ("dqn_reg", "dqn_clipped")


def next_state_value(next_q_target: torch.Tensor, next_q_online: torch.Tensor | None = None) -> torch.Tensor:
    """max_a' Q_targ(s', a'), or double DQN's Q_targ(s', argmax_a' Q(s', a'))."""
    if next_q_online is None:
        return next_q_target.max(dim=-1).values
    return next_q_target.gather(-1, next_q_online.argmax(dim=-1, keepdim=True)).squeeze(-1)


def evolved_dqn_loss(q_values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, terminateds: torch.Tensor,
                     next_q_target: torch.Tensor, gamma: float | torch.Tensor, kind: str = "dqn_reg",
                     reg_weight: float = 0.1, next_q_online: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DQNReg or DQNClipped (P241 section 4.3) on [B, A] Q-values; returns the mean loss and its pieces.

    `gamma` may be a [B] tensor (gamma^m of n-step records, whose rewards are m-step sums); `weights` [B] are
    prioritised replay's importance weights."""
    q_taken = q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    next_value = (1.0 - terminateds.float()) * next_state_value(next_q_target, next_q_online).detach()
    target = (rewards + gamma * next_value).detach()  # Y_t
    delta = q_taken - target
    if kind == "dqn_reg":
        per_sample = reg_weight * q_taken + delta**2
        active = torch.ones_like(q_taken)
    elif kind == "dqn_clipped":
        first = torch.maximum(q_taken, delta**2 + target)
        second = torch.maximum(delta, gamma * next_value**2)
        per_sample = first + second
        active = (q_taken > delta.detach() ** 2 + target).float()  # the "minimise Q" branch of the first max
    else:
        raise ValueError(f"unknown value_loss {kind!r}; valid: {', '.join(EVOLVED_LOSSES)}")
    loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
    return {"loss": loss, "td_error": delta.detach(), "q_taken": q_taken.detach(), "target": target,
            "q_branch_fraction": active.mean()}


class DQNEvolvedConfig(DQNRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DQNEvolved)
        self.value_loss = "dqn_reg"
        self.reg_weight = 0.1  # k in DQNReg's k Q(s, a) + delta^2 (P241)

    @override(DQNRuleConfig)
    def training(self, *, value_loss: str = NotProvided, reg_weight: float = NotProvided,
                 **kwargs) -> "DQNEvolvedConfig":
        super().training(**kwargs)
        set_provided(self, value_loss=value_loss, reg_weight=reg_weight)
        return self

    @override(DQNRuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.value_loss not in EVOLVED_LOSSES:
            self._value_error(f"value_loss={self.value_loss!r} is unknown; valid: {', '.join(EVOLVED_LOSSES)}")
        if not self.reg_weight >= 0:
            self._value_error(f"reg_weight must be >= 0, got {self.reg_weight}")

    @override(DQNRuleConfig)
    def get_default_learner_class(self):
        return DQNEvolvedLearner


class DQNEvolvedLearner(DQNRuleLearner):
    reads_replay_columns = True  # n-step discounts and priority weights reach the loss

    @override(DQNRuleLearner)
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        terms = evolved_dqn_loss(
            fwd_out[QF_PREDS], batch[Columns.ACTIONS], batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
            fwd_out[QF_TARGET_NEXT_PREDS], batch[DISCOUNTS] if DISCOUNTS in batch else config.gamma,
            kind=config.value_loss, reg_weight=config.reg_weight,
            next_q_online=fwd_out[QF_NEXT_PREDS] if config.double_q else None, weights=batch.get(PRIORITY_WEIGHTS),
        )
        terms["metrics"] = {"q_branch_fraction": terms.pop("q_branch_fraction")}
        return terms


class DQNEvolved(DQNRule):
    @classmethod
    @override(DQNRule)
    def get_default_config(cls) -> DQNEvolvedConfig:
        return DQNEvolvedConfig()


RULE = Rule(
    name="dqn_evolved",
    family="off-policy",
    paper_ids=("P241",),
    summary="DQN with the evolved losses DQNReg (0.1 Q + delta^2) or DQNClipped, Redis replay",
    config_class=DQNEvolvedConfig,
    options=tuple(o for o in DQN_RULE.options if o.name != "huber_delta") + (
        Option("value_loss", "evolved loss: dqn_reg or dqn_clipped (P241 section 4.3)",
               lambda x: x in EVOLVED_LOSSES, " or ".join(EVOLVED_LOSSES)),
        Option("reg_weight", "k of DQNReg's k Q(s, a) + delta^2", non_negative, ">= 0"),
    ),
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="P241 figure 4: DQNReg matches or beats DQN on CartPole; the dqn rule's check (RL-Baselines3-Zoo "
               "DQN CartPole-v1, 5e4 steps, benchmark mean return 500 on greedy episodes) and CartPole-v1's "
               "reward_threshold 475, scored like it on 10 greedy evaluation episodes",
    ),
    smoke_overrides=DQN_RULE.smoke_overrides,
)
