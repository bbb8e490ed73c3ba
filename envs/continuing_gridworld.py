"""A continuing (average-reward) goal-reaching gridworld, after the 2-D navigation task of P069 (MAC).

The agent moves on an N x N grid (actions: up, down, left, right; moves into a wall leave it in place). With
probability `slip` the chosen action is replaced by a uniformly random one. Entering the goal cell (the
corner (N-1, N-1)) pays reward 1 and teleports the agent to a uniformly random non-goal cell; every other
step pays 0. The process never terminates: the quantity to maximise is the long-run average reward per
step. Under every policy the chain is irreducible (slips reach every cell) and aperiodic (wall bumps are
self-loops): the ergodic setting average-reward actor-critic methods assume. Sparse reward, and mixing that
slows down as N grows.

Observation: the one-hot of the agent's cell (N*N floats). Registered as `ContinuingGridworld-v0` (N = 8,
slip = 0.1) with a 1000-step time limit: the limit only cuts the stream into reporting windows (truncation,
never termination), so an episode's return is 1000 x the average reward over that window.

`average_reward(policy)` and `optimal_average_reward()` compute the exact gains on the model (relative value
iteration), for learning checks and tests.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "ContinuingGridworld-v0"
WINDOW = 1000
_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])  # up, down, left, right (row, col)


class ContinuingGridworld(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 8, slip: float = 0.1):
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must be in [0, 1], got {slip}")
        self.size = size
        self.slip = slip
        self.goal = size * size - 1
        self.observation_space = gym.spaces.Box(0.0, 1.0, (size * size,), np.float32)
        self.action_space = gym.spaces.Discrete(4)
        self._cell = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.size * self.size, np.float32)
        obs[self._cell] = 1.0
        return obs

    def _random_start(self) -> int:
        return int(self.np_random.integers(self.goal))  # any cell but the goal (the last index)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._cell = self._random_start()
        return self._obs(), {}

    def step(self, action):
        if self.np_random.random() < self.slip:
            action = int(self.np_random.integers(4))
        self._cell = move(self._cell, int(action), self.size)
        reward = 0.0
        if self._cell == self.goal:
            reward = 1.0
            self._cell = self._random_start()
        return self._obs(), reward, False, False, {}


def move(cell: int, action: int, size: int) -> int:
    row, col = divmod(cell, size)
    row = min(max(row + _MOVES[action][0], 0), size - 1)
    col = min(max(col + _MOVES[action][1], 0), size - 1)
    return int(row * size + col)


def _model(size: int, slip: float) -> tuple[np.ndarray, np.ndarray]:
    """P[s, a, s'] and expected reward R[s, a] over the non-goal cells (the goal is never occupied)."""
    n = size * size - 1
    p = np.zeros((n, 4, n))
    r = np.zeros((n, 4))
    for s in range(n):
        for a in range(4):
            for actual in range(4):
                prob = (1.0 - slip) * (actual == a) + slip / 4.0
                nxt = move(s, actual, size)
                if nxt == n:  # the goal: reward, then a uniform restart
                    r[s, a] += prob
                    p[s, a] += prob / n
                else:
                    p[s, a, nxt] += prob
    return p, r


def average_reward(policy: np.ndarray, size: int = 8, slip: float = 0.1) -> float:
    """Exact gain of a stationary policy given as pi[s, a] over the non-goal cells (stationary distribution)."""
    p, r = _model(size, slip)
    p_pi = np.einsum("sa,sat->st", policy, p)
    r_pi = (policy * r).sum(1)
    n = len(r_pi)
    # Solve d^T (P - I) = 0, sum(d) = 1.
    a = np.vstack([(p_pi - np.eye(n)).T, np.ones(n)])
    b = np.append(np.zeros(n), 1.0)
    d = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(d @ r_pi)


def optimal_average_reward(size: int = 8, slip: float = 0.1, iterations: int = 10_000) -> float:
    """Optimal gain by relative value iteration (the chain is aperiodic and unichain)."""
    p, r = _model(size, slip)
    h = np.zeros(p.shape[0])
    gain = 0.0
    for _ in range(iterations):
        q = r + p @ h
        v = q.max(1)
        gain = v[0]
        new_h = v - gain
        if np.max(np.abs(new_h - h)) < 1e-12:
            break
        h = new_h
    return float(gain)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=f"{__name__}:ContinuingGridworld", max_episode_steps=WINDOW)
