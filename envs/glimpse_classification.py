"""A tiny hard-attention classification task for internally rewarded RL (P178, IRRL).

Each episode hides a label y in {0..K-1} in a "scene" of 1 + L locations, and the agent takes T = 2 glimpses
(an action = a location to look at):

- location 0, the pointer, shows which candidate location holds the label: one_hot(h), h in {1..L};
- location h shows one_hot(y);
- every other candidate shows nothing (zeros).

Each glimpse's content carries Gaussian noise (std `noise`). Two glimpses at candidates find the label half of
the time at best; the reliable strategy is to read the pointer, then look where it points (attention that
depends on what was seen, as in recurrent hard-attention models). The environment pays
no reward the agent learns from: in IRRL the reward comes from a discriminator q_phi(y | tau) trained with
the policy (see algorithms/onpolicy/irrl.py). The true label is handed over in the last step's info
(`info["label"]`), as a supervised dataset hands labels to the classifier.

Observation: [one_hot(t) (T + 1 slots), then per past glimpse i < t: one_hot(location) (1 + L) + content
(max(K, L))], zeros for glimpses not taken yet; the observation after the last step holds the whole
trajectory tau, which is what the discriminator classifies.

Reported return (never a training signal): 1 for an episode whose glimpses include the location holding the
label (the trajectory identifies y), else 0. A uniformly random policy scores 1 - (L / (1 + L))^2 = 0.36 with
L = 4, the best policy that ignores the pointer 2 / L = 0.5, the pointer-following policy 1. Registered as `GlimpseClassification-v0`
(K = 4 classes, L = 4 candidates, noise 0.1).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENV_ID = "GlimpseClassification-v0"
GLIMPSES = 2


class GlimpseClassification(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, num_classes: int = 4, num_candidates: int = 4, noise: float = 0.1):
        if num_classes < 2 or num_candidates < 2:
            raise ValueError("num_classes and num_candidates must be >= 2")
        self.num_classes = num_classes
        self.num_candidates = num_candidates
        self.noise = noise
        self.num_locations = 1 + num_candidates
        self.content_dim = max(num_classes, num_candidates)
        self.glimpse_dim = self.num_locations + self.content_dim
        size = (GLIMPSES + 1) + GLIMPSES * self.glimpse_dim
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(self.num_locations)
        self._obs = np.zeros(size, np.float32)
        self._t = 0
        self._label = 0
        self._target = 1
        self._seen: set[int] = set()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._label = int(self.np_random.integers(self.num_classes))
        self._target = 1 + int(self.np_random.integers(self.num_candidates))
        self._t = 0
        self._seen = set()
        self._obs[:] = 0.0
        self._obs[0] = 1.0
        return self._obs.copy(), {}

    def _content(self, location: int) -> np.ndarray:
        content = np.zeros(self.content_dim, np.float32)
        if location == 0:
            content[self._target - 1] = 1.0
        elif location == self._target:
            content[self._label] = 1.0
        return content + self.noise * self.np_random.standard_normal(self.content_dim).astype(np.float32)

    def step(self, action):
        location = int(action)
        start = (GLIMPSES + 1) + self._t * self.glimpse_dim
        self._obs[start + location] = 1.0
        self._obs[start + self.num_locations : start + self.glimpse_dim] = self._content(location)
        self._obs[self._t] = 0.0
        self._t += 1
        self._obs[self._t] = 1.0
        self._seen.add(location)
        done = self._t == GLIMPSES
        informative = done and self._target in self._seen
        info = {"label": self._label} if done else {}
        return self._obs.copy(), float(informative), done, False, info


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=f"{__name__}:GlimpseClassification")
