"""Transitions (s, a, r, s', terminated) out of RLlib's learner batches, and a small FIFO ring to replay them.

An on-policy learner batch is a concatenation of episode chunks, each ending in one phantom row that only
carries the last next-observation s_T (RLlib's `AddOneTsToEpisodesAndTruncate`). Row t of a chunk is a real
step whose next observation is row t + 1. Rules that also learn off-policy from their on-policy data (a
distributional critic trained by replay, a discriminator over visited states) take their transitions here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns

from algorithms.common.batch_columns import to_numpy


def segment_transition_rows(segment_lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rows, next_rows) of the real steps of concatenated chunks and of their next observations.

    Each chunk of length L + 1 holds L real steps followed by one phantom row (L >= 0).
    """
    rows, next_rows = [], []
    start = 0
    for length_with_phantom in segment_lengths:
        real = np.arange(start, start + length_with_phantom - 1)
        rows.append(real)
        next_rows.append(real + 1)
        start += length_with_phantom
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(next_rows).astype(np.int64)


class TransitionRing:
    """A fixed-capacity FIFO of named arrays (one row per transition), sampled uniformly with replacement."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._columns: dict[str, np.ndarray] = {}
        self._next = 0  # where the next row goes
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, columns: dict[str, np.ndarray]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        n = lengths.pop()
        if n == 0:
            return
        if not self._columns:
            self._columns = {k: np.zeros((self.capacity,) + np.asarray(v).shape[1:], dtype=np.asarray(v).dtype)
                             for k, v in columns.items()}
        if set(columns) != set(self._columns):
            raise ValueError(f"expected columns {sorted(self._columns)}, got {sorted(columns)}")
        if n > self.capacity:  # only the newest `capacity` rows survive anyway
            columns = {k: np.asarray(v)[-self.capacity:] for k, v in columns.items()}
            n = self.capacity
        positions = (self._next + np.arange(n)) % self.capacity
        for key, value in columns.items():
            self._columns[key][positions] = value
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        if self._size == 0:
            raise ValueError("cannot sample from an empty ring")
        index = np.random.randint(0, self._size, size=batch_size)
        return {k: torch.as_tensor(v[index], device=device) for k, v in self._columns.items()}



class TransitionRecorder(ConnectorV2):
    """Learner connector piece (appended after the advantage step): hands every real step of the batch to
    `sink(module_id, {"obs", "actions", "rewards", "next_obs", "terminateds"})` and leaves the batch as is."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, sink=None, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.sink = sink

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        lengths: dict = {}
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            lengths.setdefault(episode.module_id, []).append(len(episode))
        for module_id, module_batch in batch.items():
            rows, next_rows = segment_transition_rows(lengths.get(module_id) or lengths.get(None, []))
            obs = to_numpy(module_batch[Columns.OBS])
            self.sink(module_id, {
                "obs": obs[rows].astype(np.float32),
                "actions": to_numpy(module_batch[Columns.ACTIONS])[rows],
                "rewards": to_numpy(module_batch[Columns.REWARDS])[rows].astype(np.float32),
                "next_obs": obs[next_rows].astype(np.float32),
                "terminateds": to_numpy(module_batch[Columns.TERMINATEDS])[rows].astype(np.float32),
            })
        return batch
