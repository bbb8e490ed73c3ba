"""PrefReach-v0: a tiny grid reach task with a dense reward, for learning from segment preferences (issue 6).

The agent moves on a `size` x `size` grid (stay / up / down / left / right, walls stop it) and sees only its own
cell scaled to [0, 1]^2 (never the goal: a preference learner must infer what is wanted from comparisons). The
true reward of a step is minus the Manhattan distance of the new cell to the goal, divided by (size - 1), so a
step costs between 0 and -2; the episode is truncated after `horizon` steps (never terminated). A start cell is
drawn uniformly at every reset. Different users of the VPL rule have different goals (the `goal` kwarg).

Because the task is a small deterministic tabular MDP, the module also gives the exact tables a scripted teacher
needs: `transition_table` (next cell of every (cell, action)), `reward_table`, and `optimal_q` (discounted value
iteration), from which the regret teacher of P135 scores a segment by its summed optimal advantage.

Registered with gymnasium at import; the preference rules' modules import this one, so the driver and every
collector actor that unpickles them have it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "PrefReach-v0"
# (dx, dy) per action: stay, up, down, left, right.
MOVES = np.array([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.int64)
DEFAULT_SIZE = 7
DEFAULT_HORIZON = 16
DEFAULT_GOAL = (5, 5)


def transition_table(size: int) -> np.ndarray:
    """next_cell[s, a] for cell index s = x * size + y."""
    cells = np.array([divmod(s, size) for s in range(size * size)], dtype=np.int64)  # (S, 2)
    nxt = np.clip(cells[:, None, :] + MOVES[None, :, :], 0, size - 1)  # (S, A, 2)
    return nxt[..., 0] * size + nxt[..., 1]


def reward_table(size: int, goal: tuple[int, int]) -> np.ndarray:
    """r[s, a] = -|next cell - goal|_1 / (size - 1): the reward the env pays for taking a in s."""
    nxt = transition_table(size)
    x, y = np.divmod(nxt, size)
    return -(np.abs(x - goal[0]) + np.abs(y - goal[1])).astype(np.float64) / (size - 1)


def optimal_q(size: int, goal: tuple[int, int], gamma: float, iterations: int = 500) -> np.ndarray:
    """Q*[s, a] of the discounted infinite-horizon MDP (value iteration to convergence)."""
    nxt, r = transition_table(size), reward_table(size, goal)
    v = np.zeros(size * size)
    for _ in range(iterations):
        q = r + gamma * v[nxt]
        v_new = q.max(axis=1)
        if np.max(np.abs(v_new - v)) < 1e-10:
            break
        v = v_new
    return r + gamma * v[nxt]


def cell_index(obs: np.ndarray, size: int) -> np.ndarray:
    """Cell indices of observations (..., 2) in [0, 1] (the inverse of the env's scaling)."""
    xy = np.rint(np.asarray(obs, dtype=np.float64) * (size - 1)).astype(np.int64)
    return xy[..., 0] * size + xy[..., 1]


class PrefReachEnv(gym.Env):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, size: int = DEFAULT_SIZE, horizon: int = DEFAULT_HORIZON,
                 goal: tuple[int, int] | list[int] = DEFAULT_GOAL):
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not all(0 <= g < size for g in goal) or len(goal) != 2:
            raise ValueError(f"goal must be a cell (x, y) of the {size}x{size} grid, got {goal}")
        self.size, self.horizon, self.goal = size, horizon, (int(goal[0]), int(goal[1]))
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self._position = np.zeros(2, dtype=np.int64)
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = self.np_random.integers(0, self.size, size=2)
        self._steps = 0
        return self._observation(), {}

    def step(self, action):
        self._position = np.clip(self._position + MOVES[int(action)], 0, self.size - 1)
        self._steps += 1
        distance = int(np.abs(self._position - np.asarray(self.goal)).sum())
        return self._observation(), -distance / (self.size - 1), False, self._steps >= self.horizon, {}

    def _observation(self) -> np.ndarray:
        return (self._position / (self.size - 1)).astype(np.float32)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=PrefReachEnv)
