"""Fixed-length sequence records for the Redis replay (issue 4): one window of L steps per env step.

An EnvRunner turns each episode chunk of n steps into n windows, the window starting at step t holding

    obs            (L + 1, *obs_shape)   s_t .. s_{t+L}  (s_{t+k+1} is the next observation of step k)
    action         (L, *action_shape)    a_t .. a_{t+L-1}
    reward         (L,)                  r_t ..
    terminated     (L,)                  True at the step that ended the MDP
    mask           (L,)                  True for the m = min(L, n - t) real steps (a prefix), False for padding
    behaviour_logp (L,)                  log mu(a|s) of the acting policy (only when the rule needs it)

A window never crosses the end of its chunk: the last L - 1 windows of a chunk that the next `sample()` call
continues are shorter (they bootstrap from the chunk's last observation), so no step waits for the next call.
Padding repeats the last real next-observation and zeroes the other fields. Records are packed numpy bytes of the
schema below (no pickle), like the one-step transitions of `algorithms/offpolicy/base.py`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.core.columns import Columns

from services.replay import Field, Schema

BEHAVIOUR_LOGP = "behaviour_logp"


def _action_field(action_space: gym.Space, length: int) -> Field:
    if isinstance(action_space, gym.spaces.Discrete):
        return Field("action", "int64", (length,))
    if isinstance(action_space, gym.spaces.Box):
        return Field("action", "float32", (length, *action_space.shape), finite=True)
    raise ValueError(f"off-policy rules need a Discrete or Box action space, got {action_space}")


def sequence_schema(observation_space: gym.Space, action_space: gym.Space, length: int,
                    behaviour_logp: bool = False) -> Schema:
    """The window record of `length` steps (see the module docstring) for a Box observation space."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"off-policy rules need a Box observation space, got {observation_space}")
    if length < 1:
        raise ValueError(f"a sequence needs length >= 1, got {length}")
    fields = [
        Field("obs", "float32", (length + 1, *observation_space.shape)), _action_field(action_space, length),
        Field("reward", "float32", (length,), finite=True), Field("terminated", "bool", (length,)),
        Field("mask", "bool", (length,)),
    ]
    if behaviour_logp:
        fields.append(Field(BEHAVIOUR_LOGP, "float32", (length,)))
    return Schema(fields)


def chunk_windows(obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminated: bool, length: int,
                  logp: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The n windows of one chunk: obs [n + 1, ...], actions/rewards/logp [n, ...], `terminated` = the chunk's
    last step ended the MDP."""
    n = len(rewards)
    starts = np.arange(n)[:, None]
    steps = starts + np.arange(length)[None, :]  # [n, L] step index of each window slot
    mask = steps < n
    step_idx = np.minimum(steps, n - 1)
    obs_idx = np.minimum(starts + np.arange(length + 1)[None, :], n)
    # Padding keeps s_{t+m} in every slot after m, so obs[:, m] is the bootstrap observation.
    obs_idx = np.where(np.concatenate([np.ones((n, 1), bool), mask], axis=1), obs_idx, np.minimum(starts + length, n))

    def gather(x: np.ndarray) -> np.ndarray:
        out = np.asarray(x)[step_idx]
        return np.where(mask.reshape(mask.shape + (1,) * (out.ndim - 2)), out, np.zeros_like(out))

    ends = np.zeros(n, dtype=bool)
    ends[-1] = terminated
    windows = {
        "obs": np.asarray(obs, dtype=np.float32)[obs_idx], "action": gather(actions),
        "reward": gather(np.asarray(rewards, dtype=np.float32)), "terminated": gather(ends) & mask, "mask": mask,
    }
    if logp is not None:
        windows[BEHAVIOUR_LOGP] = gather(np.asarray(logp, dtype=np.float32))
    return windows


def windows_from_episodes(episodes: list, length: int, behaviour_logp: bool = False) -> dict[str, np.ndarray]:
    """The schema's fields for every step of the EnvRunner's episode chunks (one window per step)."""
    parts = []
    for episode in episodes:
        n = len(episode)
        if n == 0:
            continue
        logp = np.asarray(episode.get_extra_model_outputs(Columns.ACTION_LOGP)) if behaviour_logp else None
        parts.append(chunk_windows(np.asarray(episode.get_observations()), np.asarray(episode.get_actions()),
                                   np.asarray(episode.get_rewards()), bool(episode.is_terminated), length, logp))
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
