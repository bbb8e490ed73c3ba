"""Advantage estimators on one trajectory segment (numpy, no framework).

GAE (P158, Schulman et al. 2016, eq. 16):

    delta_t   = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t       = sum_{l >= 0} (gamma * lambda)^l * delta_{t+l}      (recursively: A_t = delta_t + gamma*lambda*A_{t+1})
    V_target_t = A_t + V(s_t)                                        (the lambda-return)

Terminated vs truncated segments differ only in the value after the last step: a terminated episode has no
next state (V(s_T) = 0), a truncated one (time limit, or the rollout cut it) bootstraps with V(s_T).
"""

from __future__ import annotations

import numpy as np


def gae_advantages(
    rewards: np.ndarray,
    values: np.ndarray,
    bootstrap_value: float,
    gamma: float,
    lambda_: float,
) -> np.ndarray:
    """GAE advantages A_0..A_{T-1} of one segment.

    Args:
        rewards: r_0..r_{T-1}.
        values: V(s_0)..V(s_{T-1}) from the critic.
        bootstrap_value: V(s_T) if the segment was truncated, 0.0 if it terminated.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if rewards.shape != values.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and values {values.shape} must be equal 1-D shapes")
    next_values = np.append(values[1:], bootstrap_value)
    deltas = rewards + gamma * next_values - values
    advantages = np.empty_like(deltas)
    running = 0.0
    for t in range(len(deltas) - 1, -1, -1):
        running = deltas[t] + gamma * lambda_ * running
        advantages[t] = running
    return advantages


def standardize(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(x - mean) / (std + eps): the per-batch advantage normalisation most PPO code applies."""
    return (x - x.mean()) / (x.std() + eps)
