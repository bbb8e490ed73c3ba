"""SparseReach-v0: grid goal reaching with a sparse binary success reward and resettable contexts.

A small honest stand-in for RIPT-VLA's setting (P229): a task instance ("context") is an integer seed that fixes
the start cell and the goal cell; the agent sees (x, y, goal_x, goal_y) scaled to [0, 1], moves up / down /
left / right (walls stop it), and gets reward 1 and termination on reaching the goal, 0 otherwise; the episode
is truncated after `max_steps`. So an episode's return is its success (0 or 1), and several rollouts of the
same context start from the same state. The context is reported in the reset info under "context".

Contexts: `set_context(c)` pins every following reset to context c (RIPT's K rollouts of one context);
`reset(options={"context": c})` does it for one reset; otherwise each reset draws a context from the env's
RNG. Registered with gymnasium at import (the ript rule's module imports this one, so the driver and every
EnvRunner process that unpickles its config have it).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "SparseReach-v0"
# (dx, dy) per action: up, down, left, right.
MOVES = np.array([[0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.int64)


def context_cells(context: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (start, goal) cells of a context: two distinct cells drawn from the context's own RNG."""
    rng = np.random.default_rng(int(context))
    start, goal = rng.choice(size * size, size=2, replace=False)
    return np.array(divmod(int(start), size)), np.array(divmod(int(goal), size))


class SparseReachEnv(gym.Env):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, size: int = 7, max_steps: int | None = None):
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        self.size = size
        # Enough for the longest shortest path (2 (size - 1) moves) plus a little slack for a stochastic policy.
        self.max_steps = max_steps if max_steps is not None else 2 * (size - 1) + 4
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(4)
        self._pinned_context: int | None = None
        self._position = np.zeros(2, dtype=np.int64)
        self._goal = np.zeros(2, dtype=np.int64)
        self._steps = 0

    def set_context(self, context: int | None) -> None:
        """Pin every following reset to `context` (None: draw a fresh context at each reset)."""
        self._pinned_context = None if context is None else int(context)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        context = (options or {}).get("context", self._pinned_context)
        if context is None:
            context = int(self.np_random.integers(2**31 - 1))
        self._position, self._goal = context_cells(int(context), self.size)
        self._steps = 0
        return self._observation(), {"context": int(context)}

    def step(self, action):
        self._position = np.clip(self._position + MOVES[int(action)], 0, self.size - 1)
        self._steps += 1
        reached = bool((self._position == self._goal).all())
        truncated = not reached and self._steps >= self.max_steps
        return self._observation(), float(reached), reached, truncated, {}

    def _observation(self) -> np.ndarray:
        return (np.concatenate([self._position, self._goal]) / (self.size - 1)).astype(np.float32)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=SparseReachEnv)
