"""SQIRL: P048, Laidlaw, Zhu, Russell & Dragan 2023, "The Effective Horizon Explains Deep RL Performance in
Stochastic Environments" (shallow Q-iteration via reinforcement learning), as a stationary deep variant on the Redis
replay of `base.py`.

SQIRL separates exploration from learning: it explores randomly, estimates the random policy's Q-function
Q^1 = Q^{pi_rand} by regression, applies k - 1 further steps of fitted-Q iteration to it and acts greedily in
Q^k. One network with k heads Q_1 .. Q_k (as the authors' code does) is trained on replayed (s, a, r, s', d):

    y_1      = r + gamma (1 - d) mean_a' Q_1(s', a'; theta^-)                    (evaluation of pi_rand)
    y_j      = r + gamma (1 - d) max_a'  Q_{j-1}(s', a'; theta^-),   j = 2 .. k  (one Bellman optimality step each)
    L        = mean_B mean_j (Q_j(s, a; theta) - y_j)^2
    acting:  a = argmax_a Q_k(s, a), or a uniformly random action with probability epsilon (random exploration)

theta^- is copied from theta every `target_update_interval` gradient steps: each copy is one round of the paper's
fitted-Q iteration (regress Q_j onto targets built from the frozen Q_{j-1}). Data path: every EnvRunner writes
its (s, a, r, s', d) into the run's Redis table and the learner samples minibatches from it, as for dqn.

Choices the paper leaves open or that differ from it, ours: (1) the paper's SQIRL is non-stationary (one greedy
policy per timestep t, acting greedily before t and randomly after) and regresses Q_1 on Monte-Carlo returns of
the random continuation; a stationary agent on a transition replay has no random continuation to sum, so Q_1 is
learned by TD evaluation of the uniform policy instead (the mean over a' above: correct off-policy for pi_rand on
any behaviour data), and exploration is epsilon-random around the greedy Q_k policy, epsilon 1 -> 0.04 over the
first 8k steps (pure random rollouts first, as SQIRL's first iteration); (2) k = 3 (the paper sweeps k = 1..5
and reports the smallest that works); (3) squared error, Adam 1e-3, gradient-norm clip 10 (the authors' code
uses 10), 256-256 ReLU torso shared by the heads, batch 64, 32 transitions sampled per inserted one, target copy
every 128 gradient steps, gamma 0.99 (dqn.py's CartPole setting for the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import check_positive_ints, set_provided
from algorithms.common.td_targets import bootstrap
from algorithms.offpolicy.base import OFFPOLICY_OPTIONS
from algorithms.offpolicy.dqn import DQNRule, DQNRuleConfig, DQNRuleLearner
from algorithms.options import Option, positive
from algorithms.rule import LearningCheck, Rule

Q_HEADS = "q_heads"  # [B, k, A]: Q_1 .. Q_k of the replayed observations
Q_TARGET_NEXT_HEADS = "q_target_next_heads"  # [B, k, A]: the target copy at the next observations


def sqirl_targets(rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float,
                  next_q_heads: torch.Tensor) -> torch.Tensor:
    """[B, k] targets: y_1 from the mean over a' of Q_1 (random policy), y_j from the max over a' of Q_{j-1}."""
    random_policy_value = next_q_heads[:, :1].mean(dim=-1)  # [B, 1]
    greedy_values = next_q_heads[:, :-1].max(dim=-1).values  # [B, k - 1]: max_a' Q_{j-1}, j = 2 .. k
    next_values = torch.cat([random_policy_value, greedy_values], dim=1)
    return bootstrap(rewards.unsqueeze(-1), terminateds.unsqueeze(-1), gamma, next_values)


def sqirl_loss(q_heads: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, terminateds: torch.Tensor,
               next_q_heads: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """Mean over the batch and the k heads of the squared error to `sqirl_targets`; q tensors are [B, k, A]."""
    targets = sqirl_targets(rewards, terminateds, gamma, next_q_heads)
    taken = actions.long().view(-1, 1, 1).expand(-1, q_heads.shape[1], 1)
    q_taken = q_heads.gather(-1, taken).squeeze(-1)  # [B, k]
    per_head = ((q_taken - targets) ** 2).mean(dim=0)
    return {"loss": per_head.mean(), "per_head": per_head.detach(), "targets": targets, "q_taken": q_taken.detach()}


class SQIRLModule(DefaultDQNTorchRLModule):
    """k heads of A Q-values on one torso; acting (and QF_PREDS) uses the last head Q_k."""

    @override(DefaultDQNTorchRLModule)
    def setup(self) -> None:
        super().setup()
        self.planning_depth = int(self.model_config["planning_depth"])
        self.af = self.catalog._get_head_config(output_layer_dim=self.planning_depth * self.action_space.n).build(
            framework=self.framework)

    @override(DefaultDQNTorchRLModule)
    def _qf_forward_helper(self, batch, encoder, head) -> dict[str, torch.Tensor]:
        heads = head(encoder(batch)[ENCODER_OUT]).view(-1, self.planning_depth, self.action_space.n)
        return {QF_PREDS: heads[:, -1], Q_HEADS: heads}

    @override(DefaultDQNTorchRLModule)
    def _forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        outs = self.compute_q_values({Columns.OBS: batch[Columns.OBS]})
        with torch.no_grad():
            target = self.forward_target({Columns.OBS: batch[Columns.NEXT_OBS]})
        return {QF_PREDS: outs[QF_PREDS], Q_HEADS: outs[Q_HEADS], Q_TARGET_NEXT_HEADS: target[Q_HEADS]}


class SQIRLConfig(DQNRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SQIRL)
        self.planning_depth = 3
        self.lr = 1e-3

    @override(DQNRuleConfig)
    def training(self, *, planning_depth: int = NotProvided, **kwargs) -> "SQIRLConfig":
        super().training(**kwargs)
        set_provided(self, planning_depth=planning_depth)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"planning_depth": self.planning_depth}

    @override(DQNRuleConfig)
    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "planning_depth")
        if self.double_q or self.dueling:
            self._value_error("sqirl's targets are fixed by the paper (no double_q) and its heads are plain "
                              "(no dueling)")

    @override(DQNRuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=SQIRLModule, model_config=self.model_config)

    @override(DQNRuleConfig)
    def get_default_learner_class(self):
        return SQIRLLearner


if not hasattr(DQNRuleLearner, "q_loss_terms"):  # without the hook the plain DQN loss would run silently
    raise ImportError("sqirl needs DQNRuleLearner.q_loss_terms (algorithms/offpolicy/dqn.py)")


class SQIRLLearner(DQNRuleLearner):
    # dqn.py's loss hook: overriding it (without `reads_replay_columns`) makes the config refuse n_step > 1 and
    # prioritized replay, which this loss does not implement.
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        terms = sqirl_loss(fwd_out[Q_HEADS], batch[Columns.ACTIONS], batch[Columns.REWARDS],
                           batch[Columns.TERMINATEDS], fwd_out[Q_TARGET_NEXT_HEADS], config.gamma)
        q_taken = terms["q_taken"][:, -1]
        return {"loss": terms["loss"], "q_taken": q_taken, "td_error": q_taken - terms["targets"][:, -1],
                "metrics": {f"q{j + 1}_loss": value for j, value in enumerate(terms["per_head"])}}


class SQIRL(DQNRule):
    @classmethod
    @override(DQNRule)
    def get_default_config(cls) -> SQIRLConfig:
        return SQIRLConfig()


RULE = Rule(
    name="sqirl",
    family="off-policy",
    paper_ids=("P048",),
    summary="SQIRL: random exploration, Q of the random policy plus k - 1 fitted-Q steps (k heads), greedy in Q_k; "
            "Redis replay",
    config_class=SQIRLConfig,
    options=OFFPOLICY_OPTIONS + (
        Option("lr", "Adam step size", positive, "> 0"),
        Option("planning_depth", "k: fitted-Q steps on top of the random policy's Q (heads Q_1 .. Q_k)",
               lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    ),
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="the dqn rule's check (RL-Baselines3-Zoo DQN CartPole-v1, 5e4 steps, CartPole-v1's reward_threshold "
               "475, 10 greedy evaluation episodes); P048: SQIRL's return tracks DQN's where a small k suffices",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0},
)
