"""P158 Generalized Advantage Estimation, as a learner connector any on-policy rule can select.

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = sum_{l >= 0} (gamma * lambda)^l delta_{t+l}        (Schulman et al. 2016, eq. 16)
    V_targ  = A_t + V(s_t)

The math is `algorithms.common.advantages.gae_advantages`; this module only moves data between RLlib's
batch and that function. Unlike RLlib's own GAE piece it keeps the pre-update value predictions
(`OLD_VALUES`, for value clipping) and lets the rule choose raw or standardised advantages
(`standardize_advantages`): the paper uses raw advantages; most PPO code standardises per batch.

It expects `AddOneTsToEpisodesAndTruncate` earlier in the pipeline: every episode chunk carries one extra
(phantom) timestep whose value prediction is the bootstrap V(s_T), and whose LOSS_MASK entry is False.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.postprocessing.zero_padding import split_and_zero_pad_n_episodes, unpad_data_if_necessary

from algorithms.common.advantages import gae_advantages, standardize

OLD_VALUES = "old_values"


def segment_advantages(
    values: np.ndarray,
    rewards: np.ndarray,
    terminateds: np.ndarray,
    segment_lengths: list[int],
    gamma: float,
    lambda_: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over consecutive segments, each ending in one phantom bootstrap row.

    Row k of a segment of length L+1 (k < L) is a real step; row L holds V(s_L). The segment terminated
    when terminateds[L-1] is True, in which case the bootstrap is 0. Returns (advantages, value_targets)
    with 0 at phantom rows (they are masked out of every loss).
    """
    advantages = np.zeros_like(values, dtype=np.float32)
    start = 0
    for length_with_phantom in segment_lengths:
        end = start + length_with_phantom - 1  # index of the phantom row
        terminated = bool(terminateds[end - 1]) if end > start else False
        bootstrap = 0.0 if terminated else float(values[end])
        advantages[start:end] = gae_advantages(rewards[start:end], values[start:end], bootstrap, gamma, lambda_)
        start = end + 1
    targets = advantages + values
    return advantages, targets.astype(np.float32)


class GAEConnector(ConnectorV2):
    """Learner connector piece: critic forward pass, then GAE per episode chunk (P158)."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        gamma: float,
        lambda_: float,
        standardize_advantages: bool = True,
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma = gamma
        self.lambda_ = lambda_
        self.standardize_advantages = standardize_advantages

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        episodes_per_module: dict[str, list[int]] = {}
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            episodes_per_module.setdefault(episode.module_id, []).append(len(episode))

        for module_id, module_batch in batch.items():
            module = rl_module[module_id]
            if not isinstance(module, ValueFunctionAPI):
                continue
            lengths = episodes_per_module.get(module_id) or episodes_per_module.get(None, [])
            with torch.no_grad():
                values_tensor = module.compute_values(module_batch)
            device = values_tensor.device
            values = unpad_data_if_necessary(lengths, values_tensor.cpu().numpy())
            rewards = unpad_data_if_necessary(lengths, np.asarray(_to_numpy(module_batch[Columns.REWARDS])))
            terminateds = unpad_data_if_necessary(lengths, np.asarray(_to_numpy(module_batch[Columns.TERMINATEDS])))

            advantages, targets = segment_advantages(values, rewards, terminateds, lengths, self.gamma, self.lambda_)
            if self.standardize_advantages:
                real_rows = _real_rows(lengths)
                advantages[real_rows] = standardize(advantages[real_rows])

            columns = {Postprocessing.ADVANTAGES: advantages, Postprocessing.VALUE_TARGETS: targets, OLD_VALUES: values}
            for key, data in columns.items():
                if module.is_stateful():
                    max_len = module.model_config["max_seq_len"]
                    data = np.stack(split_and_zero_pad_n_episodes(data, episode_lens=lengths, max_seq_len=max_len))
                module_batch[key] = torch.as_tensor(data, dtype=torch.float32, device=device)
        return batch


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _real_rows(segment_lengths: list[int]) -> np.ndarray:
    """Boolean mask of the non-phantom rows of concatenated segments."""
    mask = np.ones(sum(segment_lengths), dtype=bool)
    mask[np.cumsum(segment_lengths) - 1] = False
    return mask
