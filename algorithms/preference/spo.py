"""SPO: Self-Play Preference Optimization (P011, Swamy et al. 2024, "A Minimaximalist Approach to Reinforcement
Learning from Human Feedback").

The preference function P(xi > xi') defines a symmetric two-player zero-sum game whose solution is the Minimax
Winner; SPO finds it by self-play with a single agent: sample K trajectories from the current policy, have the
labeller compare them, and give each trajectory its win rate against the others as its reward,

    r(xi_i) = 1 / (K - 1) * sum_{j != i} P(xi_i > xi_j)      (a tie counts 1/2)

then take an ordinary RL step on that reward. We use PPO (SPO plugs into any RL algorithm):
the win rate is paid at the last step of the trajectory (zero before), GAE (gamma 0.99, lambda 0.95) with a
critic V(s, t/T), clipped surrogate.

Data flow: each iteration the collector actor rolls out G groups of K episodes (each group from one start state)
with the current weights into the Redis segment table (a segment = a whole 16-step episode); all K(K-1)/2 pairs
of a group go through the Redis preference queue to the scripted teacher (Bradley-Terry on the hidden true
return, beta 10: nearly always the better trajectory); the learner turns the labels into win rates, reads the
episodes (obs/actions only) back by id, updates, acks the pairs, and sends the weights to the collector.

Choices the paper leaves open, and ours: comparisons only within a group of one start state (the paper's queue
compares trajectories of the same task; here the start cell is the task instance, so a win means a better
behaviour rather than a luckier start); a sampled label per pair rather than the preference probability; K = 8,
G = 8, 40 iterations; the win rate is the trajectory's only reward (the paper also discusses per-step variants).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from algorithms.common.config_fields import check_positive_ints
from algorithms.options import Option, positive
from algorithms.preference.control_checks import reach_check
from algorithms.preference.control_collect import evaluate_true_return, policy_state
from algorithms.preference.control_loop import (
    CONTROL_OPTIONS, EVAL_SEED_OFFSET, ControlPreferenceConfig, apply_overrides, control_policy, control_session,
    run_seeds, single_threaded,
)
from algorithms.preference.control_ppo import PPOSettings, TimeValue, ppo_update
from algorithms.rule import Rule
from services.preferences import LabelledPair, PreferenceQueue


def spo_win_rates(group_size: int, outcomes: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """Win rate of each member of one group from (i, j, score of i against j: 1 win, 0 loss, 0.5 tie) for every
    unordered pair i < j: r_i = sum_j score_ij / (K - 1)."""
    if group_size < 2:
        raise ValueError(f"SPO needs at least 2 trajectories per group, got {group_size}")
    wins = np.zeros(group_size)
    seen = np.zeros((group_size, group_size), dtype=bool)
    for i, j, score in outcomes:
        if i == j or seen[i, j]:
            raise ValueError(f"pair ({i}, {j}) is a self-comparison or given twice")
        seen[i, j] = seen[j, i] = True
        wins[i] += score
        wins[j] += 1.0 - score
    if not seen[np.triu_indices(group_size, 1)].all():
        raise ValueError("SPO's win rate needs every pair of the group compared once")
    return wins / (group_size - 1)


def terminal_rewards(win_rates: np.ndarray, steps: int) -> np.ndarray:
    """(E, T) rewards: each trajectory's win rate at its last step, 0 before."""
    rewards = np.zeros((len(win_rates), steps))
    rewards[:, -1] = win_rates
    return rewards


def outcome(pair: LabelledPair) -> float:
    """Score of responses[0] against responses[1]."""
    return 0.5 if pair.label.preferred == "tie" else float(pair.label.preferred == 0)


class SPOConfig(ControlPreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.segment_length = 16  # a whole PrefReach-v0 episode: SPO compares trajectories
        self.teacher = "return"
        self.group_size = 8
        self.groups = 8
        self.iterations = 40
        self.lr = 3e-3
        self.ppo = PPOSettings()

    def validate(self) -> None:
        super().validate()
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            self._value_error(f"group_size must be an integer >= 2, got {self.group_size!r}")
        check_positive_ints(self, "groups", "iterations")


@single_threaded
def train_spo(rule: Rule, seed: int = 0, overrides: dict[str, Any] | None = None,
              queue: PreferenceQueue | None = None) -> dict[str, Any]:
    """Self-play iterations through the collector, the queue and the teacher; Ray must be initialised."""
    config: SPOConfig = apply_overrides(rule, overrides)
    started = time.monotonic()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = control_policy(config)
    value = TimeValue(policy.obs_dim)
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(value.parameters()), lr=config.lr)
    k = config.group_size
    episodes = k * config.groups
    history, env_steps, acked = [], 0, 0
    with control_session(config, rule.name, seed, 4 * episodes, policy.spec(), queue) as session:
        for it in range(config.iterations):
            session.set_weights(policy_state(policy))
            collected = session.collect(episodes, behaviour="policy", group_size=k)
            env_steps += collected["env_steps"]
            ids = [episode[0] for episode in collected["ids"]]  # one segment = one whole episode
            index = {}
            id_pairs = []
            for g in range(config.groups):
                for i in range(k):
                    for j in range(i + 1, k):
                        index[(ids[g * k + i], ids[g * k + j])] = (g, i, j)
                        id_pairs.append((ids[g * k + i], ids[g * k + j]))
            batch = session.channel.ask(id_pairs, version=it)
            per_group: list[list[tuple[int, int, float]]] = [[] for _ in range(config.groups)]
            for pair in batch:
                g, i, j = index[tuple(pair.pair.responses)]
                per_group[g].append((i, j, outcome(pair)))
            win_rates = np.concatenate([spo_win_rates(k, outcomes) for outcomes in per_group])
            data = session.read(ids)
            stats = ppo_update(policy, value, optimizer, data["obs"], data["action"],
                               terminal_rewards(win_rates, data["action"].shape[1]), config.ppo, generator)
            acked += session.channel.ack(batch)
            history.append(stats | {"iteration": it})
    env_kwargs = config.users[0]
    true_return = evaluate_true_return(policy, config.env_id, env_kwargs, config.eval_episodes,
                                       seed + EVAL_SEED_OFFSET)
    return {"seed": seed, "return": true_return, "env_steps": env_steps, "pairs_acked": acked,
            "wall_s": time.monotonic() - started, "history": history, "policy": policy}


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_seeds(rule, seeds, lambda seed: {k: v for k, v in train_spo(rule, seed=seed).items()
                                                if k not in ("policy", "history")})


RULE = Rule(
    name="spo", family="preference", paper_ids=("P011",),
    summary="Self-Play Preference Optimization: each sampled trajectory's reward is its win rate against the "
            "policy's other trajectories under the labeller, then PPO",
    config_class=SPOConfig,
    options=CONTROL_OPTIONS + (
        Option("group_size", "trajectories compared with each other per start state (K)", lambda x: x >= 2, ">= 2"),
        Option("groups", "start states per iteration", positive, ">= 1"),
        Option("iterations", "self-play iterations", positive, ">= 1"),
    ),
    learning_check=reach_check("P011", env_steps=40 * 64 * 16,
                               what="40 iterations of 8 x 8 trajectories, 28 comparisons per group"),
    smoke_overrides={"group_size": 2, "groups": 2, "iterations": 1, "eval_episodes": 4},
    check_runner="algorithms.preference.spo:run_learning_check",
)
