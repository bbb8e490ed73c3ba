"""A tiny 0-1 knapsack task: one instance per episode (P206's instance-based setting, at toy size).

Each reset draws an instance from the env's seeded RNG: n items with weights and values ~ U(0, 1) and a fixed
capacity C (n = 10, C = 2.5 by default; the paper's KP-50/100 use the same item distribution with C = 12.5/25).
The agent considers the items in index order; at step i it takes (action 1) or skips (action 0) item i. Taking
an item that no longer fits packs nothing. The reward of a step is the value packed, so an episode's return is
the packed value, and the episode ends after n steps.

Observation (a Markov state laid out so an MLP can read it): [w_i, v_i, remaining capacity, i / n, then the weights
and the values of the items still to come, i+1..n-1, shifted to the front and zero-padded to n - 1 each].

`optimal_value` (exhaustive over the 2^n subsets) and `greedy_value` (value/weight ratio heuristic) give the
reference points of the learning check.
"""

from __future__ import annotations

import itertools
from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "Knapsack10-v0"


def optimal_value(weights: np.ndarray, values: np.ndarray, capacity: float) -> float:
    """The best packed value, by enumerating every subset (fine for n <= ~16)."""
    n = len(weights)
    subsets = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
    feasible = subsets @ weights <= capacity
    return float((subsets @ values)[feasible].max())


def greedy_value(weights: np.ndarray, values: np.ndarray, capacity: float) -> float:
    """The classic heuristic: pack items by decreasing value/weight while they fit."""
    remaining, total = capacity, 0.0
    for i in np.argsort(-values / weights):
        if weights[i] <= remaining:
            remaining -= weights[i]
            total += values[i]
    return float(total)


class KnapsackEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, num_items: int = 10, capacity: float = 2.5):
        if num_items < 1 or capacity <= 0:
            raise ValueError(f"need num_items >= 1 and capacity > 0, got {num_items}, {capacity}")
        self.num_items, self.capacity = num_items, float(capacity)
        high = np.full(4 + 2 * (num_items - 1), 1.0, np.float32)
        high[2] = self.capacity
        self.observation_space = gym.spaces.Box(0.0, high, dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.weights = np.zeros(num_items)
        self.values = np.zeros(num_items)
        self.remaining = self.capacity
        self.index = 0

    def _obs(self) -> np.ndarray:
        n, i = self.num_items, self.index
        obs = np.zeros(self.observation_space.shape, np.float32)
        if i < n:
            obs[0], obs[1] = self.weights[i], self.values[i]
            upcoming = n - 1 - i
            obs[4 : 4 + upcoming] = self.weights[i + 1 :]
            obs[4 + n - 1 : 4 + n - 1 + upcoming] = self.values[i + 1 :]
        obs[2], obs[3] = self.remaining, i / n
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.weights = self.np_random.uniform(0.0, 1.0, self.num_items)
        self.values = self.np_random.uniform(0.0, 1.0, self.num_items)
        self.remaining, self.index = self.capacity, 0
        return self._obs(), {}

    def step(self, action: Any):
        reward = 0.0
        if int(action) == 1 and self.weights[self.index] <= self.remaining:
            self.remaining -= self.weights[self.index]
            reward = float(self.values[self.index])
        self.index += 1
        terminated = self.index >= self.num_items
        return self._obs(), reward, terminated, False, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.knapsack:KnapsackEnv")
