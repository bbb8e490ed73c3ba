"""Policies for discrete-action control tasks, the Ray actor that collects their segments into Redis, and the
evaluation of a policy by the env's TRUE return (the only place besides the teacher that sees the true reward).

    SegmentCollector (Ray actor: env + a copy of the policy) --insert--> SegmentTable (Redis, schema'd records)

The collector computes the hidden fields of every segment (true return; summed optimal advantage, when the env
gives its exact tables, as PrefReach-v0 does) so the teacher can label pairs; learners never read them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import torch
from torch import nn

import envs.pref_reach  # noqa: F401  (registers PrefReach-v0 in this process and in every actor unpickling us)
from algorithms.preference.segments import SegmentTable
from envs.pref_reach import PrefReachEnv, cell_index, optimal_q


class CategoricalPolicy(nn.Module):
    """pi(a | s [, z]): a tanh MLP over the observation (and an optional context z, VPL's latent) -> logits."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: Sequence[int] = (64, 64), context_dim: int = 0):
        super().__init__()
        sizes = [obs_dim + context_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(sizes[-1], num_actions))
        self.net = nn.Sequential(*layers)
        self.obs_dim, self.num_actions, self.hidden, self.context_dim = obs_dim, num_actions, tuple(hidden), context_dim

    def forward(self, obs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_dim:
            if context is None:
                raise ValueError("this policy is conditioned on a context z: pass one")
            context = context.expand(*obs.shape[:-1], self.context_dim)
            obs = torch.cat([obs, context], dim=-1)
        return self.net(obs)

    def spec(self) -> dict[str, Any]:
        return {"obs_dim": self.obs_dim, "num_actions": self.num_actions, "hidden": list(self.hidden),
                "context_dim": self.context_dim}


class TabularPolicy(nn.Module):
    """pi(a | s) = softmax(logits[cell(s)]): a table over the cells of a PrefReach-v0 grid (PARL's lower level)."""

    def __init__(self, size: int, num_actions: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(size * size, num_actions))
        self.size, self.num_actions = size, num_actions

    def forward(self, obs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits[torch.as_tensor(cell_index(obs.detach().numpy(), self.size))]

    def spec(self) -> dict[str, Any]:
        return {"kind": "tabular", "size": self.size, "num_actions": self.num_actions}


def build_policy(spec: Mapping[str, Any]) -> nn.Module:
    """The policy a collector acts with, from its spec (`policy.spec()`)."""
    spec = dict(spec)
    if spec.pop("kind", "mlp") == "tabular":
        return TabularPolicy(**spec)
    return CategoricalPolicy(**spec)


def policy_state(policy: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.state_dict().items()}


def load_policy_state(policy: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    # np.array copies: Ray hands out read-only arrays, which torch will not wrap safely.
    policy.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()})


def segment_logprobs(policy: CategoricalPolicy, obs: torch.Tensor, actions: torch.Tensor,
                     context: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a_t | s_t) of segments: obs (B, L + 1, d) (the last one is s_L, unused), actions (B, L) -> (B, L)."""
    logits = policy(obs[:, :-1], None if context is None else context[:, None, :])
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def make_env(env_id: str, env_kwargs: Mapping[str, Any] | None = None) -> gym.Env:
    return gym.make(env_id, **dict(env_kwargs or {})).unwrapped


def teacher_tables(env: gym.Env, gamma: float) -> tuple[np.ndarray, int] | None:
    """(Q*, grid size) when the env gives its exact MDP (PrefReach-v0), else None (no regret teacher)."""
    if isinstance(env, PrefReachEnv):
        return optimal_q(env.size, env.goal, gamma), env.size
    return None


def rollout(env: gym.Env, act, seed: int | None) -> dict[str, np.ndarray]:
    """One episode: obs (T + 1, d), actions (T,), rewards (T,)."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [obs], [], []
    done = False
    while not done:
        action = int(act(obs))
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
        done = terminated or truncated
    return {"obs": np.asarray(observations, np.float32), "action": np.asarray(actions, np.int64),
            "reward": np.asarray(rewards, np.float64)}


class SegmentCollector:
    """Rolls out a policy (or the uniform random one) on each user's env and inserts fixed-length segments.
    Runs as a Ray actor (`RemoteSegmentCollector`); it reaches Redis through `redis_url`."""

    def __init__(self, env_id: str, users: Sequence[Mapping[str, Any]], namespace: str, table: str,
                 redis_url: str | None, policy_spec: Mapping[str, Any], teacher_gamma: float = 0.99,
                 seed: int = 0) -> None:
        if redis_url:
            os.environ["REDIS_URL"] = redis_url  # the driver's (embedded) server, never a new one
        from services.replay.connection import redis_from_env

        torch.set_num_threads(1)  # the machine is shared: one core per actor
        self.envs = [make_env(env_id, kw) for kw in users]
        self.tables = [teacher_tables(env, teacher_gamma) for env in self.envs]
        self.segments = SegmentTable.open(redis_from_env(), namespace, table)
        self.policy = build_policy(policy_spec)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.episodes = 0

    def set_weights(self, state: Mapping[str, np.ndarray]) -> None:
        load_policy_state(self.policy, state)

    def collect(self, episodes: int, user: int = 0, behaviour: str = "policy", group_size: int = 1,
                context: Sequence[float] | None = None) -> dict[str, Any]:
        """Roll out `episodes` episodes for `user` and insert their segments. `behaviour`: "policy" (sample the
        current weights) or "uniform" (random actions: an offline dataset). Episodes come in groups of
        `group_size` that start from the same state (SPO compares trajectories of one start). Returns
        {"ids": segment ids per episode, "env_steps": n}."""
        if behaviour not in ("policy", "uniform"):
            raise ValueError(f"behaviour must be 'policy' or 'uniform', got {behaviour!r}")
        env, tables = self.envs[user], self.tables[user]
        z = None if context is None else torch.as_tensor(np.asarray(context, np.float32))

        def act(obs: np.ndarray) -> int:
            if behaviour == "uniform":
                return int(self.rng.integers(env.action_space.n))
            with torch.no_grad():
                logits = self.policy(torch.as_tensor(obs)[None], None if z is None else z[None])
            return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator))

        steps, batch_parts, start_seed = 0, [], None
        for i in range(episodes):
            if i % group_size == 0:
                start_seed = int(self.rng.integers(2**31 - 1))
            episode = rollout(env, act, start_seed)
            steps += len(episode["action"])
            batch_parts.append(self._segments(episode, user, tables))
            self.episodes += 1
        batch = {k: np.concatenate([p[k] for p in batch_parts]) for k in batch_parts[0]}
        flat = self.segments.insert(batch)
        per_episode = len(flat) // episodes
        ids = [flat[i * per_episode:(i + 1) * per_episode] for i in range(episodes)]
        return {"ids": ids, "env_steps": steps}

    def _segments(self, episode: dict[str, np.ndarray], user: int, tables) -> dict[str, np.ndarray]:
        """Non-overlapping segments of `length` steps (a shorter tail is dropped)."""
        length = self.segments.length
        count = len(episode["action"]) // length
        if count == 0:
            raise ValueError(f"an episode of {len(episode['action'])} steps is shorter than a segment ({length})")
        advantage = np.zeros(len(episode["action"]))
        if tables is not None:
            q, size = tables
            cells = cell_index(episode["obs"], size)
            v = q.max(axis=1)
            advantage = q[cells[:-1], episode["action"]] - v[cells[:-1]]  # A*(s_t, a_t) = Q* - V*
        out: dict[str, list] = {k: [] for k in ("obs", "action", "user", "episode", "true_return",
                                                "optimal_advantage")}
        for j in range(count):
            a, b = j * length, (j + 1) * length
            out["obs"].append(episode["obs"][a:b + 1])
            out["action"].append(episode["action"][a:b])
            out["user"].append(user)
            out["episode"].append(self.episodes)
            out["true_return"].append(episode["reward"][a:b].sum())
            out["optimal_advantage"].append(advantage[a:b].sum())
        return {k: np.asarray(v) for k, v in out.items()}


RemoteSegmentCollector = ray.remote(num_cpus=1)(SegmentCollector)


def evaluate_true_return(policy: CategoricalPolicy, env_id: str, env_kwargs: Mapping[str, Any] | None,
                         episodes: int, seed: int, context: torch.Tensor | None = None,
                         greedy: bool = True) -> float:
    """Mean undiscounted TRUE return of the policy (greedy: argmax action) over `episodes` seeded episodes."""
    env = make_env(env_id, env_kwargs)
    generator = torch.Generator().manual_seed(seed)

    def act(obs: np.ndarray) -> int:
        with torch.no_grad():
            logits = policy(torch.as_tensor(obs)[None], None if context is None else context[None])
        if greedy:
            return int(logits.argmax(-1))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))

    returns = [rollout(env, act, seed + i)["reward"].sum() for i in range(episodes)]
    return float(np.mean(returns))
