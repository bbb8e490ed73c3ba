"""Regret preference model (P135, Knox et al. 2022, "Models of human preference for learning reward functions").

Partial-return model (the usual Bradley-Terry one): P(sigma1 > sigma2) = sigmoid(sum_t r(sigma1_t) - sum_t r(sigma2_t)).
Regret model: a labeller prefers the segment that deviates less from optimal behaviour, and for deterministic
transitions the regret of a segment is minus its summed optimal advantage under the reward r,

    regret_r(sigma) = -sum_{t=0}^{L-1} A*_r(s_t, a_t),   A*_r(s, a) = r(s, a) + gamma V*_r(s') - V*_r(s)
    P_regret(sigma1 > sigma2 | r) = sigmoid( sum_t A*_r(sigma1_t) - sum_t A*_r(sigma2_t) )   (regret model)
    L(theta) = -mean_pairs log P(sigma+ > sigma- | r_theta)

V*_r is computed inside the loss by differentiable value iteration on the task's known deterministic dynamics
(the paper's setting: it learns in a gridworld with known transitions), so the gradient reaches r_theta through
both r and V*_r. "Then RL on the learned reward": value iteration on r_theta gives Q*_{r_theta}, whose greedy
policy is evaluated by the env's TRUE return. The same pipeline with the partial-return loss is the paper's
comparison; `rlfleet verify` reports both on the same labelled pairs.

Data flow: as CPL's (algorithms/preference/cpl.py): the collector actor writes uniform-random segments to the
Redis segment table, pairs of ids go through the Redis preference queue to the scripted regret teacher
(P(+ > -) = sigmoid(beta (sum A*(+) - sum A*(-))) from the env's exact Q*), the learner reads them back by id.

Choices the paper leaves open, and ours: a tabular reward r_theta(s, a) (49 cells x 5 actions; the paper's
gridworld reward is a linear function of cell features); the undiscounted sum of A* over an 8-step segment
(the paper weights by gamma^t; gamma^8 = 0.92 here); gamma = the teacher's 0.99; value iteration warm-started from
the previous step's values (detached) for `vi_iterations` = 100 sweeps; Adam lr 0.05, full batch, 400 steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from algorithms.common.config_fields import check_positive_ints
from algorithms.options import Option, positive
from algorithms.preference.control_checks import reach_check
from algorithms.preference.control_collect import TabularPolicy, evaluate_true_return
from algorithms.preference.control_loop import (
    CONTROL_OPTIONS, EVAL_SEED_OFFSET, OFFLINE_OPTIONS, ControlPreferenceConfig, apply_overrides, control_session,
    run_seeds, single_threaded,
)
from algorithms.rule import Rule
from envs.pref_reach import DEFAULT_SIZE, PrefReachEnv, cell_index, transition_table
from services.preferences import PreferenceQueue

REWARD_MODELS = ("regret", "partial_return")


def value_iteration(reward: torch.Tensor, next_state: torch.Tensor, gamma: float, iterations: int,
                    v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (Q*, V*) of a deterministic tabular MDP: reward (S, A), next_state (S, A) indices."""
    v = torch.zeros(reward.shape[0], dtype=reward.dtype) if v0 is None else v0
    for _ in range(iterations):
        v = (reward + gamma * v[next_state]).max(dim=1).values
    q = reward + gamma * v[next_state]
    return q, q.max(dim=1).values


def segment_scores(reward: torch.Tensor, next_state: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                   gamma: float, model: str, v: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) segment scores: sum_t r(s_t, a_t) (partial return) or sum_t A*_r(s_t, a_t) (= -regret).
    states, actions: (B, L) indices; `v` = V*_r (needed for "regret")."""
    r = reward[states, actions]
    if model == "partial_return":
        return r.sum(-1)
    if model != "regret":
        raise ValueError(f"model must be one of {REWARD_MODELS}, got {model!r}")
    if v is None:
        raise ValueError("the regret model needs V*_r")
    advantage = r + gamma * v[next_state[states, actions]] - v[states]
    return advantage.sum(-1)


def preference_nll(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(score+ - score-) per pair."""
    return -torch.nn.functional.logsigmoid(score_chosen - score_rejected)


def greedy_tabular(q: torch.Tensor, size: int) -> TabularPolicy:
    """The policy whose logits are the Q table (evaluated greedily: argmax_a Q(s, a))."""
    policy = TabularPolicy(size, q.shape[1])
    with torch.no_grad():
        policy.logits.copy_(q.float())
    return policy


class RegretPrefConfig(ControlPreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.reward_model = "regret"
        self.lr = 0.05
        self.dataset_episodes = 400
        self.pairs = 2000
        self.updates = 400
        self.vi_iterations = 100

    def validate(self) -> None:
        super().validate()
        if self.reward_model not in REWARD_MODELS:
            self._value_error(f"reward_model must be one of {', '.join(REWARD_MODELS)}, got {self.reward_model!r}")
        check_positive_ints(self, "dataset_episodes", "pairs", "updates", "vi_iterations")
        if self.env_id != "PrefReach-v0":
            self._value_error("regret_pref needs the known tabular dynamics of PrefReach-v0")


def fit_reward(model: str, states: tuple[torch.Tensor, torch.Tensor], actions: tuple[torch.Tensor, torch.Tensor],
               next_state: torch.Tensor, config: RegretPrefConfig) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Adam on the preference NLL of `model` over all labelled pairs (full batch); returns r_theta (S, A)."""
    reward = torch.zeros(next_state.shape, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([reward], lr=config.lr)
    v = None
    history = []
    for step in range(config.updates):
        if model == "regret":
            _, v = value_iteration(reward, next_state, config.teacher_gamma, config.vi_iterations,
                                   None if v is None else v.detach())
        chosen = segment_scores(reward, next_state, states[0], actions[0], config.teacher_gamma, model, v)
        rejected = segment_scores(reward, next_state, states[1], actions[1], config.teacher_gamma, model, v)
        loss = preference_nll(chosen, rejected).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.updates - 1:
            history.append({"loss": float(loss.detach()), "accuracy": float((chosen > rejected).double().mean())})
    return reward.detach(), history


@single_threaded
def train_regret_pref(rule: Rule, seed: int = 0, overrides: dict[str, Any] | None = None,
                      queue: PreferenceQueue | None = None, models: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Collect, label through the queue, fit the reward model(s), plan on each, evaluate the true return.
    `models` defaults to the config's; the learning check passes both to compare them."""
    config: RegretPrefConfig = apply_overrides(rule, overrides)
    models = models or (config.reward_model,)
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = PrefReachEnv(**config.users[0])
    size = env.size
    next_state = torch.as_tensor(transition_table(size))
    spec = {"obs_dim": 2, "num_actions": int(env.action_space.n), "hidden": list(config.hidden), "context_dim": 0}
    with control_session(config, rule.name, seed, config.dataset_episodes * 64, spec, queue) as session:
        data = session.offline_dataset(config.dataset_episodes, config.pairs, rng)
        win, lose = data.chosen, data.rejected
        states = tuple(torch.as_tensor(cell_index(d["obs"][:, :-1].numpy(), size)) for d in (win, lose))
        actions = (win["action"], lose["action"])
        results = {}
        for model in models:
            reward, history = fit_reward(model, states, actions, next_state, config)
            q, _ = value_iteration(reward, next_state, config.teacher_gamma, 1000)
            policy = greedy_tabular(q, size)
            results[model] = {"return": evaluate_true_return(policy, config.env_id, config.users[0],
                                                             config.eval_episodes, seed + EVAL_SEED_OFFSET),
                              "final": history[-1], "reward": reward}
        acked = session.channel.ack(data.batch)
    main = results[models[0]]
    return {"seed": seed, "return": main["return"], "env_steps": data.env_steps, "pairs_acked": acked,
            "wall_s": time.monotonic() - started, "models": results}


def check_seed(rule: Rule, seed: int) -> dict[str, Any]:
    """Both preference models on the same labelled pairs; the row's "return" is the config's model (regret)."""
    result = train_regret_pref(rule, seed=seed, models=REWARD_MODELS)
    return ({k: v for k, v in result.items() if k != "models"}
            | {f"{m}_return": r["return"] for m, r in result["models"].items()}
            | {f"{m}_final": r["final"] for m, r in result["models"].items()})


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_seeds(rule, seeds, lambda seed: check_seed(rule, seed))


RULE = Rule(
    name="regret_pref", family="preference", paper_ids=("P135",),
    summary="Regret preference model: a reward learned from segment preferences through P(sigma1 > sigma2) = "
            "sigmoid(sum A*_r(sigma1) - sum A*_r(sigma2)), then value iteration on it (vs the partial-return model)",
    config_class=RegretPrefConfig,
    options=CONTROL_OPTIONS + OFFLINE_OPTIONS + (
        Option("reward_model", "preference model of the learner: regret or partial_return",
               lambda x: x in REWARD_MODELS, " or ".join(REWARD_MODELS)),
        Option("vi_iterations", "value-iteration sweeps per step (warm-started)", positive, ">= 1"),
    ),
    learning_check=reach_check("P135", env_steps=6400, what="400 uniform-random episodes, 2000 regret-labelled pairs"),
    smoke_overrides={"dataset_episodes": 8, "pairs": 16, "updates": 2, "vi_iterations": 5, "eval_episodes": 4},
    check_runner="algorithms.preference.regret_pref:run_learning_check",
)

assert DEFAULT_SIZE == 7  # the check's random/optimal returns (control_checks.py) were measured on the 7x7 grid
