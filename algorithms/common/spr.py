"""Self-Predictive Representations (P133, Schwarzer et al. 2021): the future-prediction loss and the K-step
sequences it trains on.

Given latents predicted k = 1..K steps ahead by a transition model from the online encoder's z_0 and the actions
taken, and target latents from the EMA target encoder applied to the real future observations, both projected,

    L_SPR = -sum_{k=1..K} mean_B  m_{b,k} cos(y^_{b,k}, y~_{b,k}),   cos(u, v) = u.v / (|u| |v|)

(the paper's normalised L2 ||u/|u| - v/|v|||^2 = 2 - 2 cos: the same gradient up to a factor 2), where m_{b,k} = 0
once step k lies past the end of the episode (or of the EnvRunner's chunk) the sequence starts in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def spr_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """predictions, targets: [B, K, D] (targets carry no gradient); mask: [B, K] of 0/1."""
    cosine = F.cosine_similarity(predictions, targets.detach(), dim=-1, eps=1e-8)
    return -(mask.float() * cosine).sum(dim=1).mean()


def sequence_records(episodes: list, horizon: int) -> dict[str, np.ndarray]:
    """One record per env step t of the given episode chunks: the K + 1 observations o_t..o_{t+K} and the K actions,
    rewards and termination flags of steps t..t+K-1, zero-padded past the chunk's end; `valid[k]` says whether
    o_{t+k} is a real observation of the same episode (valid[0] and valid[1] always are: step t is real)."""
    columns: dict[str, list] = {"obs": [], "action": [], "reward": [], "terminated": [], "valid": []}
    k_obs = np.arange(horizon + 1)
    for episode in episodes:
        n = len(episode)
        if n == 0:
            continue
        observations = np.asarray(episode.get_observations())[: n + 1]
        actions = np.asarray(episode.get_actions())
        rewards = np.asarray(episode.get_rewards(), np.float32)
        terminated = np.zeros(n, bool)
        terminated[-1] = bool(episode.is_terminated)
        pad = horizon
        observations = np.concatenate([observations, np.zeros((pad, *observations.shape[1:]), observations.dtype)])
        actions = np.concatenate([actions, np.zeros((pad, *actions.shape[1:]), actions.dtype)])
        rewards = np.concatenate([rewards, np.zeros(pad, np.float32)])
        terminated = np.concatenate([terminated, np.zeros(pad, bool)])
        starts = np.arange(n)[:, None]
        obs_index = starts + k_obs[None, :]  # [n, K + 1]
        step_index = obs_index[:, :horizon]  # [n, K]
        columns["obs"].append(observations[obs_index])
        columns["action"].append(actions[step_index])
        columns["reward"].append(rewards[step_index])
        columns["terminated"].append(terminated[step_index])
        columns["valid"].append(obs_index <= n)
    if not columns["obs"]:
        return {}
    return {key: np.concatenate(value) for key, value in columns.items()}
