"""DQN: Mnih et al. 2015, "Human-level control through deep reinforcement learning" (Nature 518; not in the seed
catalogue, id "DQN-2015"), with van Hasselt, Guez & Silver 2016 "Deep Reinforcement Learning with Double
Q-learning" as the `double_q` option.

Loss on a minibatch of replayed transitions (s, a, r, s', d) (Mnih 2015, Methods, eq. 2 with error clipping):

    y      = r + gamma (1 - d) max_a' Q(s', a'; theta^-)                            (DQN)
    y      = r + gamma (1 - d) Q(s', argmax_a' Q(s', a'; theta); theta^-)           (double DQN, van Hasselt 2016)
    L      = mean_B Huber_1(Q(s, a; theta) - y)       (Huber with delta 1 = the paper's TD-error clipping to [-1, 1])
    theta^- <- theta every C gradient steps; acting: epsilon-greedy in Q(s, .; theta)

Choices the papers leave open or that differ for a small task, ours (RL-Baselines3-Zoo's tuned CartPole-v1 DQN,
the baseline of the learning check): Adam (lr 2.3e-3) instead of RMSProp, a 256-256 ReLU MLP instead of the conv
net, replay 100k, 1k learning starts (uniform-random actions while epsilon = 1), epsilon 1 -> 0.04 over the first
8k steps, batch 64, 128 gradient steps per 256 env steps (samples_per_insert = 32), target copy every 128 gradient
steps (C), gradient-norm clip 10, plain (non-dueling) Q head. `terminated` (not time-limit truncation) stops the
bootstrap. One-step targets (n = 1) by default.

Learning check: scored like the zoo's benchmark, on greedy (explore=False) evaluation episodes (`score=
"greedy_eval"`). With the same settings, the score "mean of the last 100 epsilon-greedy training episodes" at 100k
steps was 134.7 (2026-11-21): that run's training mean reached 500 at about 41k steps, fell to 30-75 by 57k and 90k
and came back to 418 at 65k, i.e. these aggressive settings (lr 2.3e-3, 128 gradient steps per 256 env steps, which
the zoo labels "almost tuned" and trains for 5e4 steps only) oscillate after solving CartPole, and a 100-episode
training window measures the oscillation and the 4% random actions, not whether DQN learned. The hyperparameters,
target period, epsilon schedule, replay ratio and data path (transitions, `terminated` only, EnvRunner epsilon from
the synced lifetime step count) match the zoo's and were left as they are. Measured with the greedy score: 500 at
32,768 env steps (seed 0).

Options of the replay (algorithms/offpolicy/base.py):
- `n_step` = n > 1 (Sutton 1988; as in Rainbow, Hessel et al. 2018, uncorrected for the off-policy actions): the
  EnvRunners write windows of n steps and the target becomes
      y = sum_{k<m} gamma^k r_k + gamma^m (1 - d) max_a' Q(s_m, a'; theta^-)   (double DQN: argmax by theta)
  with m = n, or fewer steps where the episode (d = terminated) or the EnvRunner's chunk ended first.
- `prioritized_replay` (Schaul et al. 2016, proportional variant): sample i with P(i) = p_i^alpha / sum_j p_j^alpha,
  L = mean_B w_i Huber_1(Q(s_i, a_i) - y_i) with w_i = (N P(i))^-beta / max_j w_j, and p_i <- |TD error_i| + eps
  after the iteration's update (`prioritized_replay_alpha` 0.6, `prioritized_replay_beta` 0.4 fixed, as Ape-X).
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.dqn import DQN, DQNConfig
from ray.rllib.algorithms.dqn.dqn_learner import QF_NEXT_PREDS, QF_PREDS, QF_TARGET_NEXT_PREDS
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.td_targets import huber, q_learning_target
from algorithms.offpolicy.base import (
    DISCOUNTS,
    OFFPOLICY_OPTIONS,
    PRIORITY_WEIGHTS,
    REPLAY_RECORD_OPTIONS,
    OffPolicyAlgorithmMixin,
    OffPolicyConfigMixin,
    OffPolicyLearnerMixin,
)
from algorithms.options import Option, positive
from algorithms.rule import LearningCheck, Rule


def dqn_loss(q_values: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, terminateds: torch.Tensor,
             next_q_target: torch.Tensor, gamma: float | torch.Tensor, next_q_online: torch.Tensor | None = None,
             huber_delta: float = 1.0, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mean Huber TD loss of Q(s, a) against the (double-)DQN target; q tensors are [B, num_actions].

    `gamma` may be a [B] tensor of bootstrap discounts (gamma^m of n-step transitions, whose `rewards` are then the
    discounted m-step sums); `weights` [B] are prioritised replay's importance weights."""
    q_taken = q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    target = q_learning_target(rewards, terminateds, gamma, next_q_target, next_q_online)
    td_error = q_taken - target
    per_sample = huber(td_error, huber_delta)
    loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
    return {"loss": loss, "td_error": td_error.detach(), "q_taken": q_taken.detach(), "target": target}


class DQNRuleConfig(OffPolicyConfigMixin, DQNConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DQNRule)
        self._init_offpolicy()
        self.lr = 2.3e-3
        self.gamma = 0.99
        self.train_batch_size_per_learner = 64
        self.rollout_fragment_length = 256
        self.samples_per_insert = 32.0  # 128 gradient steps x 64 / 256 env steps
        self.num_steps_sampled_before_learning_starts = 1000
        self.replay_capacity = 100_000
        self.target_update_interval = 128
        self.tau = 1.0
        self.epsilon = [(0, 1.0), (8000, 0.04)]
        self.double_q = False
        self.dueling = False
        self.huber_delta = 1.0
        self.grad_clip = 10.0
        self.grad_clip_by = "global_norm"
        self._model_config = {"fcnet_hiddens": [256, 256], "fcnet_activation": "relu", "head_fcnet_hiddens": []}

    @override(DQNConfig)
    def training(self, *, huber_delta: float = NotProvided, **kwargs) -> "DQNRuleConfig":
        super().training(**kwargs)
        if huber_delta is not NotProvided:
            self.huber_delta = huber_delta
        return self

    @override(DQNConfig)
    def validate(self) -> None:
        super().validate()
        self._validate_offpolicy()
        if self.huber_delta <= 0:
            self._value_error(f"huber_delta must be > 0, got {self.huber_delta}")
        if self.num_atoms != 1 or self.noisy:
            self._value_error("dqn implements the scalar Q-learning loss: num_atoms must be 1 and noisy False")

    @override(DQNConfig)
    def get_default_learner_class(self):
        return DQNRuleLearner

    # n-step transitions and importance weights reach the loss through `DQNRuleLearner.q_loss_terms`: a learner
    # that overrides that hook supports them only if it says so (`reads_replay_columns` in its own class body).
    @property
    def supports_n_step(self) -> bool:
        return _reads_replay_columns(self.get_default_learner_class())

    @property
    def supports_prioritized_replay(self) -> bool:
        return _reads_replay_columns(self.get_default_learner_class())


class DQNRuleLearner(OffPolicyLearnerMixin, DQNTorchLearner):
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        """The Q loss on a minibatch: "loss", "q_taken", "td_error", and optionally "metrics" (a dict of extra
        scalars to log). Rules with another value loss (P127, P157, P241) override this hook only."""
        return dqn_loss(
            fwd_out[QF_PREDS], batch[Columns.ACTIONS], batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
            fwd_out[QF_TARGET_NEXT_PREDS], batch[DISCOUNTS] if DISCOUNTS in batch else config.gamma,
            next_q_online=fwd_out[QF_NEXT_PREDS] if config.double_q else None, huber_delta=config.huber_delta,
            weights=batch.get(PRIORITY_WEIGHTS),
        )

    @override(DQNTorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        terms = self.q_loss_terms(config, batch, fwd_out)
        loss = terms["loss"]
        if config.prioritized_replay:
            self.record_td_errors(batch, terms["td_error"])
        self.metrics.log_dict({
            "qf_loss": loss, "qf_mean": terms["q_taken"].mean(), "td_error_mean": terms["td_error"].abs().mean(),
            # The policy is greedy in Q, so the Q loss is both its value and its policy loss (the keys every
            # rlfleet rule reports).
            VF_LOSS_KEY: loss, POLICY_LOSS_KEY: loss, **terms.get("metrics", {}),
        }, key=module_id, window=1)
        return loss


def _reads_replay_columns(learner_class: type) -> bool:
    return learner_class.q_loss_terms is DQNRuleLearner.q_loss_terms or bool(
        vars(learner_class).get("reads_replay_columns", False))


class DQNRule(OffPolicyAlgorithmMixin, DQN):
    @classmethod
    @override(DQN)
    def get_default_config(cls) -> DQNRuleConfig:
        return DQNRuleConfig()


RULE = Rule(
    name="dqn",
    family="off-policy",
    paper_ids=("DQN-2015",),
    summary="DQN: Huber TD loss to a target network, epsilon-greedy, Redis replay (double DQN as an option)",
    config_class=DQNRuleConfig,
    options=OFFPOLICY_OPTIONS + REPLAY_RECORD_OPTIONS + (
        Option("lr", "Adam step size", positive, "> 0"),
        Option("double_q", "double DQN target (van Hasselt 2016)"),
        Option("huber_delta", "Huber threshold of the TD error", positive, "> 0"),
    ),
    # Scored on greedy evaluation episodes, as the zoo's benchmark and Mnih et al. 2015 score DQN: the epsilon-greedy
    # training episodes understate the learned policy, and DQN with these settings is known to oscillate after it
    # first solves CartPole, so a 100-episode training window mostly measured the oscillation, not the learning.
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="RL-Baselines3-Zoo DQN CartPole-v1 (hyperparameters as here, n_timesteps 5e4, benchmark mean "
               "return 500 on greedy evaluation episodes) and CartPole-v1's reward_threshold 475; the score is the "
               "mean of 10 greedy episodes evaluated every 2 iterations (about 2k env steps)",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0},
)
