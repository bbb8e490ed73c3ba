"""A tiny pixel navigation task for value learning from images (the SPR rule's learning check, P133).

An N x N grid (N = 6) drawn as a 1 x (N*C) x (N*C) uint8 image (C = 4 pixels per cell, so 1 x 24 x 24): the goal
cell is filled with 128, the agent's cell with 255, everything else 0. Each episode places the agent and the goal
in distinct uniformly random cells. Actions: up, down, left, right (a move into a wall stays put). Reward: +1 for
stepping onto the goal (terminated), -0.02 for every other step; 50-step time limit (truncation). One image holds
the whole state (no frame stacking needed); the policy must read both positions off the pixels. An optimal policy
scores about 1 - 0.02 * (mean Manhattan distance - 1) ~ 0.93; a uniformly random one about -0.5.

Registered as `PixelGridGoal-v0` on import (rule modules import this module, so the id exists wherever a pickled
config is loaded, EnvRunner actors included).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "PixelGridGoal-v0"
_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])  # up, down, left, right (row, col)
AGENT, GOAL = 255, 128


class PixelGridGoal(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 6, cell_pixels: int = 4, step_reward: float = -0.02):
        if size < 2 or cell_pixels < 1:
            raise ValueError(f"size must be >= 2 and cell_pixels >= 1, got {size}, {cell_pixels}")
        self.size, self.cell = size, cell_pixels
        self.step_reward = step_reward
        side = size * cell_pixels
        self.observation_space = gym.spaces.Box(0, 255, (1, side, side), np.uint8)
        self.action_space = gym.spaces.Discrete(4)
        self._agent = np.zeros(2, np.int64)
        self._goal = np.zeros(2, np.int64)

    def render_cells(self) -> np.ndarray:
        image = np.zeros(self.observation_space.shape, np.uint8)
        for (row, col), value in ((self._goal, GOAL), (self._agent, AGENT)):
            c = self.cell
            image[0, row * c:(row + 1) * c, col * c:(col + 1) * c] = value
        return image

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        cells = self.np_random.choice(self.size * self.size, size=2, replace=False)
        self._agent = np.array(divmod(int(cells[0]), self.size))
        self._goal = np.array(divmod(int(cells[1]), self.size))
        return self.render_cells(), {}

    def step(self, action):
        self._agent = np.clip(self._agent + _MOVES[int(action)], 0, self.size - 1)
        reached = bool(np.array_equal(self._agent, self._goal))
        reward = 1.0 if reached else self.step_reward
        return self.render_cells(), reward, reached, False, {}


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=f"{__name__}:PixelGridGoal", max_episode_steps=50)
