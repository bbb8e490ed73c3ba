"""CartPole-v1 with the velocities masked: a POMDP where a memoryless policy cannot see the state.

The observation keeps the cart position x and the pole angle theta and drops x_dot and theta_dot, the usual
"velocities masked" partially observable CartPole of the recurrent-RL literature (P184's kind of POMDP test).
Dynamics, reward (+1 per step) and the 500-step limit are CartPole-v1's.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "CartPoleNoVel-v0"
KEPT = (0, 2)  # x, theta


class MaskedVelocityCartPole(gym.ObservationWrapper):
    def __init__(self, env: gym.Env | None = None):
        super().__init__(env if env is not None else gym.make("CartPole-v1"))
        low, high = self.env.observation_space.low[list(KEPT)], self.env.observation_space.high[list(KEPT)]
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)[list(KEPT)]


def make_masked_cartpole() -> gym.Env:
    return MaskedVelocityCartPole(gym.make("CartPole-v1"))


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.masked_cartpole:make_masked_cartpole")
