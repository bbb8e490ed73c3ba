"""Environments rlfleet trains on: gymnasium ids (classic control, MuJoCo) checked before any Ray work."""

from __future__ import annotations

import difflib

import gymnasium as gym

from rlfleet.errors import UserError

# The tasks the learning checks and examples use; any other registered gymnasium id works too.
SUGGESTED_ENVS = (
    "CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCarContinuous-v0",
    "InvertedPendulum-v5", "HalfCheetah-v5", "Hopper-v5",
)


def ensure_env(env_id: str) -> gym.spaces.Space:
    """Check that `env_id` exists and can be built here; return its observation space."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown env {env_id!r}{hint}; e.g. {', '.join(SUGGESTED_ENVS)}")
    try:
        env = gym.make(env_id)
    except Exception as exc:  # missing optional dependency, bad kwargs: say which env and why
        raise UserError(f"env {env_id!r} cannot be created here: {type(exc).__name__}: {exc}") from None
    try:
        return env.observation_space
    finally:
        env.close()
