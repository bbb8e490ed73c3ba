"""P179: Daley, White, Amato & Machado 2023, "Trajectory-Aware Eligibility Traces for Off-Policy Reinforcement
Learning" (ICML): Recency-Bounded Importance Sampling (RBIS) as the multi-step off-policy target of deep Q-learning.

The paper's operator (its eq. for M, tabular) for a trace beta that may depend on the whole history since (s_0, a_0):

    (M Q)(s_0, a_0) = Q(s_0, a_0) + E_mu[ sum_{t>=0} gamma^t beta_t delta_t ],
    delta_t = r_t + gamma (1 - d_t) sum_a pi(a|s_{t+1}) Q(s_{t+1}, a) - Q(s_t, a_t),   rho_t = pi(a_t|s_t) / mu(a_t|s_t)
    RBIS:  beta_0 = 1,  beta_t = min(lambda^t, rho_t beta_{t-1})
           (unrolled: beta_t = min_{0<=j<=t} lambda^j rho_{j+1} ... rho_t: the IS product since any recent point,
            bounded by lambda to the power of its age; a ratio > 1 can undo an earlier cut, which Retrace's
            beta_t = lambda min(1, rho_t) beta_{t-1} never does)

Deep version (ours): the EnvRunners store windows of L = `trace_length` steps with the behaviour policy's
log mu(a_t|s_t) (epsilon-greedy in the Q-net that acted, recorded by the module at acting time) in the Redis replay
(`algorithms/common/sequences.py`); the learner's target for the window's first pair is M Q^- truncated at L steps:

    G = Q^-(s_0, a_0) + sum_{t<m} gamma^t beta_t delta_t^-,   delta^- with the target network Q^-,
    L = mean_B w_i Huber_1(Q(s_0, a_0; theta) - G)       (w_i = 1 unless `prioritized_replay`)

Choices the paper leaves open (it is tabular, with online traces), ours: a forward-view truncation at L = 8 steps
(a window ends early where the episode or the EnvRunner's chunk ended; every env step starts one window); the
target network Q^- evaluates both Q and the target policy; the target policy pi is epsilon-greedy in Q^- with
`target_epsilon` = 0.04, DQN's final behaviour epsilon (the paper's control task used target 0.1, behaviour 0.2),
so off-policyness comes mostly from stale replayed behaviour (greedy in an older Q) - the case where a ratio > 1
lets RBIS recover a trace that Retrace would keep cut; lambda = 0.9. `trace` = "retrace" or "truncated_is" swaps
the coefficient for the paper's baselines. Everything else is `dqn` (RL-Baselines3-Zoo's CartPole-v1 settings).
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import check_positive_ints, set_provided
from algorithms.common.sequences import BEHAVIOUR_LOGP
from algorithms.common.td_targets import huber
from algorithms.common.traces import TRACE_KINDS, epsilon_greedy_probs, trace_coefficients, trace_target
from algorithms.offpolicy.base import OFFPOLICY_OPTIONS, PRIORITY_WEIGHTS
from algorithms.offpolicy.dqn import DQNRule, DQNRuleConfig, DQNRuleLearner
from algorithms.options import Option, positive, unit_interval
from algorithms.rule import LearningCheck, Rule

QF_TARGET_WINDOW = "qf_target_window"
MASK = "mask"


def rbis_loss(q_first: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, terminateds: torch.Tensor,
              mask: torch.Tensor, behaviour_logp: torch.Tensor, q_target_window: torch.Tensor, gamma: float,
              lambda_: float, target_epsilon: float, kind: str = "rbis", huber_delta: float = 1.0,
              weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Huber loss of Q(s_0, a_0) to the truncated trace target G on windows.

    q_first [B, A]: online Q(s_0, .); actions/rewards/terminateds/mask/behaviour_logp [B, L];
    q_target_window [B, L + 1, A]: Q^-(s_t, .) for t = 0..L (padding slots repeat s_m and are masked out)."""
    length = actions.shape[-1]
    actions = actions.long().unsqueeze(-1)
    pi = epsilon_greedy_probs(q_target_window, target_epsilon)  # [B, L + 1, A]
    q_taken_target = q_target_window[:, :length].gather(-1, actions).squeeze(-1)  # Q^-(s_t, a_t)
    v_next = (pi[:, 1:] * q_target_window[:, 1:]).sum(dim=-1)  # E_pi Q^-(s_{t+1}, .)
    alive = 1.0 - terminateds.float()
    deltas = (rewards + gamma * alive * v_next - q_taken_target) * mask.float()
    ratios = pi[:, :length].gather(-1, actions).squeeze(-1) / behaviour_logp.exp()
    betas = trace_coefficients(ratios, mask, lambda_, kind)
    target = trace_target(q_taken_target[:, 0], deltas, betas, mask, gamma)
    q_taken = q_first.gather(-1, actions[:, 0]).squeeze(-1)
    td_error = q_taken - target
    per_sample = huber(td_error, huber_delta)
    loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
    return {"loss": loss, "td_error": td_error.detach(), "q_taken": q_taken.detach(), "target": target,
            "betas": betas.detach()}


class BehaviourLogpDQNModule(DefaultDQNTorchRLModule):
    """RLlib's DQN module that also reports log mu(a|s) of its epsilon-greedy action (stored by the EnvRunner with
    the episode) and, for training on windows, evaluates Q(s_0) online and Q^- on every window observation."""

    @override(DefaultDQNTorchRLModule)
    def _forward_exploration(self, batch, t: int):
        out = super()._forward_exploration(batch, t)
        # The schedule was just moved to t: this is the epsilon the action above was drawn with.
        epsilon = self.epsilon_schedule.get_current_value()
        probs = epsilon_greedy_probs(self.compute_q_values(batch)[QF_PREDS], epsilon)
        taken = probs.gather(-1, out[Columns.ACTIONS].long().unsqueeze(-1)).squeeze(-1)
        out[Columns.ACTION_LOGP] = torch.log(taken)
        return out

    @override(DefaultDQNTorchRLModule)
    def _forward_train(self, batch):
        window = batch[Columns.OBS]  # [B, L + 1, *obs_shape]
        flat = window.reshape(-1, *window.shape[2:])
        with torch.no_grad():
            target = self.forward_target({Columns.OBS: flat})[QF_PREDS]
        return {QF_PREDS: self.compute_q_values({Columns.OBS: window[:, 0]})[QF_PREDS],
                QF_TARGET_WINDOW: target.reshape(*window.shape[:2], -1)}


class DQNRBISConfig(DQNRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DQNRBIS)
        self.trace_length = 8
        self.trace_lambda = 0.9
        self.target_epsilon = 0.04
        self.trace = "rbis"
        self.record_behaviour_logp = True

    @override(DQNRuleConfig)
    def training(self, *, trace_length: int = NotProvided, trace_lambda: float = NotProvided,
                 target_epsilon: float = NotProvided, trace: str = NotProvided, **kwargs) -> "DQNRBISConfig":
        super().training(**kwargs)
        set_provided(self, trace_length=trace_length, trace_lambda=trace_lambda, target_epsilon=target_epsilon,
                     trace=trace)
        return self

    @override(DQNRuleConfig)
    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "trace_length")
        if not 0 <= self.trace_lambda <= 1:
            self._value_error(f"trace_lambda must be in [0, 1], got {self.trace_lambda}")
        if not 0 <= self.target_epsilon <= 1:
            self._value_error(f"target_epsilon must be in [0, 1], got {self.target_epsilon}")
        if self.trace not in TRACE_KINDS:
            self._value_error(f"trace must be one of {', '.join(TRACE_KINDS)}, got {self.trace!r}")
        if self.n_step != 1:
            self._value_error("dqn_rbis bootstraps through its traces: use trace_length, not n_step")
        if self.double_q or self.dueling:
            self._value_error("dqn_rbis evaluates pi and Q with the target network: double_q and dueling must be off")

    def sequence_length(self) -> int:
        return self.trace_length

    @override(DQNRuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        spec = super().get_default_rl_module_spec()
        spec.module_class = BehaviourLogpDQNModule
        return spec

    @override(DQNRuleConfig)
    def get_default_learner_class(self):
        return DQNRBISLearner


class DQNRBISLearner(DQNRuleLearner):
    reads_replay_columns = True  # importance weights reach rbis_loss (n_step is refused by the config)

    @override(DQNRuleLearner)
    def q_loss_terms(self, config, batch, fwd_out) -> dict[str, torch.Tensor]:
        terms = rbis_loss(
            fwd_out[QF_PREDS], batch[Columns.ACTIONS], batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
            batch[MASK], batch[BEHAVIOUR_LOGP], fwd_out[QF_TARGET_WINDOW], config.gamma, config.trace_lambda,
            config.target_epsilon, config.trace, config.huber_delta, weights=batch.get(PRIORITY_WEIGHTS),
        )
        valid = batch[MASK].float()
        terms["metrics"] = {"trace_mean": (terms["betas"] * valid).sum() / valid.sum(),
                            "trace_last_mean": terms["betas"][:, -1].mean()}
        return terms


class DQNRBIS(DQNRule):
    @classmethod
    @override(DQNRule)
    def get_default_config(cls) -> DQNRBISConfig:
        return DQNRBISConfig()

    def _replay_columns(self, data):
        """Whole windows: the learner needs every step's reward, action and behaviour probability."""
        return {Columns.OBS: data["obs"], Columns.ACTIONS: data["action"], Columns.REWARDS: data["reward"],
                Columns.TERMINATEDS: data["terminated"], MASK: data["mask"], BEHAVIOUR_LOGP: data[BEHAVIOUR_LOGP]}


RULE = Rule(
    name="dqn_rbis",
    family="off-policy",
    paper_ids=("P179",),
    summary="DQN with Recency-Bounded Importance Sampling traces (P179) on replayed windows with behaviour probs",
    config_class=DQNRBISConfig,
    options=OFFPOLICY_OPTIONS + (
        Option("lr", "Adam step size", positive, "> 0"),
        Option("huber_delta", "Huber threshold of the TD error", positive, "> 0"),
        Option("trace_length", "steps per replayed window (the trace's truncation)",
               lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
        Option("trace_lambda", "lambda of the trace", unit_interval, "in [0, 1]"),
        Option("target_epsilon", "epsilon of the epsilon-greedy target policy", unit_interval, "in [0, 1]"),
        Option("trace", "trace coefficient: rbis, retrace or truncated_is", lambda x: x in TRACE_KINDS,
               "rbis, retrace or truncated_is"),
        Option("prioritized_replay", "prioritised replay with importance weights (Schaul et al. 2016)"),
    ),
    learning_check=LearningCheck(
        env="CartPole-v1", steps=50_000, threshold=475.0, score="greedy_eval", eval_episodes=10, eval_interval=2,
        source="the dqn rule's check (RL-Baselines3-Zoo DQN CartPole-v1, 5e4 steps, CartPole-v1's reward_threshold "
               "475, 10 greedy evaluation episodes): P179 claims RBIS is robust across lambda, i.e. at least as "
               "good as one-step Q-learning",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0,
                     "trace_length": 4},
)
