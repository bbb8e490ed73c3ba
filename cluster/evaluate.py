"""Greedy evaluation of a checkpoint in its gymnasium env, in-process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np

from rlfleet.errors import UserError
from services.policy import LoadedPolicy


def evaluate(path: str | Path, episodes: int = 10, seed: int = 0) -> dict:
    """Run `episodes` greedy episodes (episode i reset with seed + i) and summarise the returns.

    Returns {"mean", "std", "episodes", "returns", "env_id"}.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise UserError(f"episodes must be an integer >= 1, got {episodes!r}")
    policy = LoadedPolicy.from_checkpoint(path)
    if policy.env_id is None:
        raise UserError(
            f"cannot tell which env to evaluate {policy.checkpoint} in: it is not inside a run directory "
            "whose config.json names the env"
        )
    try:
        env = gym.make(policy.env_id)
    except gym.error.Error as exc:
        raise UserError(f"cannot create env {policy.env_id!r}: {exc}") from exc

    returns: list[float] = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                action = policy.act(np.asarray(obs, dtype=policy.observation_space.dtype)[None], deterministic=True)[0]
                if isinstance(policy.action_space, gym.spaces.Box):
                    action = np.asarray(action, dtype=policy.action_space.dtype)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return {
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "episodes": episodes,
        "returns": returns,
        "env_id": policy.env_id,
    }
