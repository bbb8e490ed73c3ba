"""A 2D point-mass quality-diversity task (P269's setting at toy size): where it ends is the behaviour, how cheaply
it gets there is the quality.

The point starts at the origin of [-1, 1]^2 and moves x_{t+1} = clip(x_t + 0.1 a_t, -1, 1) for H = 25 steps, with
actions a_t in [-1, 1]^2. Quality and measures of an episode:

    f(tau) = sum_t r_t,   r_t = 0.04 - 0.05 ||a_t||^2             (energy cost; 0.04 per step keeps idle f > 0)
    m(tau) = (x_H + 1) / 2  in [0, 1]^2                            (the final position: the archive's 2 measures)

So every final position is reachable and the best quality for a cell is a straight, constant-speed path: a QD
algorithm must both spread the final positions over the grid and make each path efficient. Measures are
reported per step as `info["measure_rewards"]` (dm_t = (x_{t+1} - x_t) / 2, plus 0.5 at t = 0), which sum to
m(tau); observations are (x, y, t / H).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "PointMassQD-v0"
NUM_MEASURES = 2


class PointMassQDEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, horizon: int = 25, step_size: float = 0.1):
        self.horizon, self.step_size = horizon, step_size
        self.observation_space = gym.spaces.Box(np.array([-1.0, -1.0, 0.0], np.float32),
                                                np.array([1.0, 1.0, 1.0], np.float32), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2)
        self.t = 0

    @property
    def min_return(self) -> float:
        """The lowest possible f (full thrust, ||a||^2 = 2, every step): the QD score's offset."""
        return self.horizon * (0.04 - 0.05 * 2.0)

    def _obs(self) -> np.ndarray:
        return np.array([self.position[0], self.position[1], self.t / self.horizon], np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position, self.t = np.zeros(2), 0
        return self._obs(), {}

    def step(self, action: Any):
        action = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        before = self.position.copy()
        self.position = np.clip(self.position + self.step_size * action, -1.0, 1.0)
        measure_rewards = (self.position - before) / 2.0 + (0.5 if self.t == 0 else 0.0)
        self.t += 1
        reward = 0.04 - 0.05 * float(action @ action)
        info = {"measure_rewards": measure_rewards.astype(np.float32), "measures": (self.position + 1.0) / 2.0}
        return self._obs(), reward, self.t >= self.horizon, False, info


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.qd_pointmass:PointMassQDEnv")
