"""Writing per-row columns computed in numpy back into a learner batch (shared by advantage connectors)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.utils.postprocessing.zero_padding import split_and_zero_pad_n_episodes


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_columns(module, module_batch: dict[str, Any], columns: dict[str, np.ndarray], lengths: list[int],
                  device: torch.device | None) -> None:
    """Store float32 tensors of `columns` (one row per step of the concatenated episodes) in `module_batch`.

    A recurrent module's batch is laid out as zero-padded sequences of `max_seq_len`: the columns are split and
    padded the same way.
    """
    for key, data in columns.items():
        if module.is_stateful():
            max_len = module.model_config["max_seq_len"]
            data = np.stack(split_and_zero_pad_n_episodes(data, episode_lens=lengths, max_seq_len=max_len))
        module_batch[key] = torch.as_tensor(data, dtype=torch.float32, device=device)
