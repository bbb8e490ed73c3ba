"""A gridworld coverage task: the return is a submodular function of the visited cells (P032's coverage setting).

The agent walks H steps on an n x n grid from a fixed start cell. Visiting cell v covers the disc D_r(v) (v itself
and, for radius 1, its 4 grid neighbours). The objective is the coverage of the whole trajectory

    F(tau) = | U_{v in tau} D_r(v) |        (monotone submodular in the set of visited cells)

and the reward of step t is the marginal gain of the cell it reaches,

    r_t = F(tau_{0:t+1}) - F(tau_{0:t}),    with F(tau_{0:0}) := 0 at t = 0,

so an episode's return is exactly F(tau) (the start cell's disc is counted in r_0). The reward depends on the
history, which the observation does NOT show: the observation is (one-hot cell, one-hot time step), the input of
the paper's Markovian, time-indexed policies pi(a | s, t). The visited set is exposed in `info["coverage"]`
(F so far) and `env.unwrapped.visited` for anyone who wants to recompute a gain.

`reward="modular"` gives the Markov (additive) reward r_t = |D_r(s_{t+1})| (P032's "modular RL" baseline: every
visit scores again); `info["coverage"]` still reports F so that baseline's coverage can be measured.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

# (dx, dy) of the four moves; a move into the wall leaves the agent where it is.
MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1))
ENV_ID = "CoverageGrid-v0"


def disc(cell: tuple[int, int], size: int, radius: int) -> set[tuple[int, int]]:
    """D_r(cell): the cell and, for radius >= 1, its grid neighbours within Manhattan distance `radius`."""
    x, y = cell
    return {
        (x + dx, y + dy)
        for dx in range(-radius, radius + 1)
        for dy in range(-radius, radius + 1)
        if abs(dx) + abs(dy) <= radius and 0 <= x + dx < size and 0 <= y + dy < size
    }


def coverage(cells, size: int, radius: int) -> int:
    """F(V) = |U_{v in V} D_r(v)|."""
    covered: set[tuple[int, int]] = set()
    for cell in cells:
        covered |= disc(tuple(cell), size, radius)
    return len(covered)


class CoverageGridEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 8, horizon: int = 20, radius: int = 1, start: tuple[int, int] = (0, 0),
                 reward: str = "marginal"):
        if size < 2 or horizon < 1 or radius < 0:
            raise ValueError(f"need size >= 2, horizon >= 1, radius >= 0; got {size}, {horizon}, {radius}")
        if reward not in ("marginal", "modular"):
            raise ValueError(f"reward must be 'marginal' or 'modular', got {reward!r}")
        if not (0 <= start[0] < size and 0 <= start[1] < size):
            raise ValueError(f"start {start} is outside the {size}x{size} grid")
        self.size, self.horizon, self.radius, self.start, self.reward_kind = size, horizon, radius, tuple(start), reward
        self.observation_space = gym.spaces.Box(0.0, 1.0, (size * size + horizon,), np.float32)
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self.position = self.start
        self.t = 0
        self.visited: list[tuple[int, int]] = []
        self.covered: set[tuple[int, int]] = set()

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, np.float32)
        obs[self.position[0] * self.size + self.position[1]] = 1.0
        obs[self.size * self.size + min(self.t, self.horizon - 1)] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position, self.t = self.start, 0
        self.visited = [self.start]
        self.covered = set()  # F(tau_{0:0}) = 0: the start cell's disc is the first step's gain
        return self._obs(), {"coverage": 0}

    def step(self, action: Any):
        dx, dy = MOVES[int(action)]
        x = min(max(self.position[0] + dx, 0), self.size - 1)
        y = min(max(self.position[1] + dy, 0), self.size - 1)
        self.position = (x, y)
        self.t += 1
        gained = disc(self.start, self.size, self.radius) if self.t == 1 else set()
        gained |= disc(self.position, self.size, self.radius)
        before = len(self.covered)
        self.covered |= gained
        self.visited.append(self.position)
        if self.reward_kind == "marginal":
            reward = float(len(self.covered) - before)
        else:
            reward = float(len(disc(self.position, self.size, self.radius)))
        terminated = self.t >= self.horizon  # time is part of the state: after H steps nothing is left
        return self._obs(), reward, terminated, False, {"coverage": len(self.covered)}


# Registered at import: rule modules that use the task import this module, so every process that unpickles their
# config (the driver and each remote EnvRunner) has the id before it calls gym.make.
if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.coverage:CoverageGridEnv")
if "CoverageGridModular-v0" not in gym.registry:
    gym.register("CoverageGridModular-v0", entry_point="envs.coverage:CoverageGridEnv", kwargs={"reward": "modular"})
