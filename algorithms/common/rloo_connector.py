"""RLOO advantages as a learner connector piece any on-policy rule can use in place of GAE.

Every step of an episode gets that episode's leave-one-out advantage (`algorithms.common.rloo`): episodes are
grouped by the `context` entry of their first info dict (the initial-state seed / task id an env reports at
reset; all episodes without one form a single group), and within a group

    A_i = R_i - mean_{j != i} R_j,      R_i = the undiscounted sum of the episode's rewards.

VALUE_TARGETS is R_i, so a rule that also fits a critic (vf_loss_coeff > 0) regresses it on the outcome.
The estimator is meant for whole episodes (RIPT samples K complete rollouts per context); an episode chunk cut
by step-based sampling is scored by the rewards it holds. Like `gae.py`, it expects
`AddOneTsToEpisodesAndTruncate` earlier in the pipeline (one phantom row per episode, masked out of losses).

Any on-policy rule selects it with `advantage_estimator="rloo"` (base.py's ADVANTAGE_ESTIMATORS); RIPT (P229)
uses it by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.postprocessing.zero_padding import unpad_data_if_necessary

from algorithms.common.advantages import standardize
from algorithms.common.batch_columns import to_numpy, write_columns
from algorithms.common.rloo import grouped_rloo_advantages

CONTEXT_INFO_KEY = "context"


def episode_context(episode) -> Any:
    """The context id the env put in the episode's reset info (None when it reports none)."""
    try:
        info = episode.get_infos(0)
    except (IndexError, KeyError):
        return None
    return info.get(CONTEXT_INFO_KEY) if isinstance(info, dict) else None


def rows_per_episode(values_per_episode: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Repeat one value per episode over that episode's rows (its phantom row included)."""
    return np.repeat(np.asarray(values_per_episode, dtype=np.float32), lengths)


class RLOOConnector(ConnectorV2):
    """Learner connector piece: per-episode returns -> grouped leave-one-out advantages on every row."""

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 standardize_advantages: bool = False, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.standardize_advantages = standardize_advantages

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        per_module: dict[Any, list[tuple[int, Any]]] = {}
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            per_module.setdefault(episode.module_id, []).append((len(episode), episode_context(episode)))

        for module_id, module_batch in batch.items():
            entries = per_module.get(module_id) or per_module.get(None, [])
            lengths = [length for length, _ in entries]
            rewards_tensor = module_batch[Columns.REWARDS]
            device = rewards_tensor.device if isinstance(rewards_tensor, torch.Tensor) else None
            rewards = unpad_data_if_necessary(lengths, to_numpy(rewards_tensor))
            if len(rewards) != sum(lengths):
                raise ValueError(f"RLOO: {len(rewards)} batch rows but the episodes hold {sum(lengths)}")
            starts = np.cumsum([0] + lengths[:-1])
            # The phantom row of each episode carries no reward (it is masked out anyway): summing its segment
            # gives the episode's return.
            returns = np.array([rewards[s : s + n].sum() for s, n in zip(starts, lengths)], dtype=np.float64)
            advantages = rows_per_episode(grouped_rloo_advantages(returns, [c for _, c in entries]), lengths)
            if self.standardize_advantages:
                real = np.ones(len(advantages), dtype=bool)
                real[np.cumsum(lengths) - 1] = False
                advantages[real] = standardize(advantages[real])
            columns = {Postprocessing.ADVANTAGES: advantages,
                       Postprocessing.VALUE_TARGETS: rows_per_episode(returns, lengths)}
            write_columns(rl_module[module_id], module_batch, columns, lengths, device)
        return batch
