"""Value mappings and reward channels of Orchestrated Value Mapping (P233, Fatemi & Tavakoli 2022) (torch).

A mapping f moves a channel's value estimate into the space where it is learned (Q~ = f(Q)); its inverse brings
it back. The paper's instantiation (LogLinDQN, Sec. 5) uses the piecewise log-linear map with parameters (c, d):

    f(x)      = c log(x) + d                   for x <= x0 = exp(-d / c)
              = c exp(d / c) x - c             for x >  x0          (value and slope continuous at x0)
    f^-1(y)   = exp((y - d) / c)               for y <= 0
              = (y + c) exp(-d / c) / c        for y >  0

`log` is the pure logarithm c log(x) + d (van Seijen et al. 2019's Log Q-learning) and `identity` is f(x) = x
(Q-learning / Q-decomposition). The log branches need x > 0: callers clip their targets at a small eps first.

The "polar" reward decomposition (the paper's eq. 13): r = sum_j lambda_j r_j with lambda = (+1, -1),
r_1 = min(1, max(r, 0)) and r_2 = min(1, max(-r, 0)), so each channel's reward lies in [0, 1].
"""

from __future__ import annotations

import math

import torch

MAPPINGS = ("loglin", "log", "identity")
DECOMPOSITIONS = ("polar", "single")


def forward_map(x: torch.Tensor, mapping: str, c: float = 0.5, d: float = 0.0) -> torch.Tensor:
    """Q -> Q~ = f(Q)."""
    if mapping == "identity":
        return x
    if mapping == "log":
        return c * torch.log(x) + d
    if mapping == "loglin":
        x0 = math.exp(-d / c)
        # torch.where evaluates both branches: keep log's argument positive where the linear branch is taken.
        log_branch = c * torch.log(torch.clamp(x, max=x0)) + d
        lin_branch = c * math.exp(d / c) * x - c
        return torch.where(x > x0, lin_branch, log_branch)
    raise ValueError(f"unknown mapping {mapping!r}; valid: {', '.join(MAPPINGS)}")


def inverse_map(y: torch.Tensor, mapping: str, c: float = 0.5, d: float = 0.0) -> torch.Tensor:
    """Q~ -> Q = f^-1(Q~)."""
    if mapping == "identity":
        return y
    if mapping == "log":
        return torch.exp((y - d) / c)
    if mapping == "loglin":
        # exp of the log branch only where it is taken (y <= 0), so large y cannot overflow it.
        log_branch = torch.exp((torch.clamp(y, max=0.0) - d) / c)
        lin_branch = (y + c) * math.exp(-d / c) / c
        return torch.where(y > 0, lin_branch, log_branch)
    raise ValueError(f"unknown mapping {mapping!r}; valid: {', '.join(MAPPINGS)}")


def channel_weights(decomposition: str) -> tuple[float, ...]:
    """lambda_j of the decomposition r = sum_j lambda_j r_j."""
    if decomposition == "polar":
        return (1.0, -1.0)
    if decomposition == "single":
        return (1.0,)
    raise ValueError(f"unknown reward decomposition {decomposition!r}; valid: {', '.join(DECOMPOSITIONS)}")


def decompose_reward(rewards: torch.Tensor, decomposition: str) -> torch.Tensor:
    """[B] rewards -> [B, C] channel rewards r_j, each clipped to [0, 1] (eq. 13 for `polar`)."""
    if decomposition == "polar":
        return torch.stack([torch.clamp(rewards, 0.0, 1.0), torch.clamp(-rewards, 0.0, 1.0)], dim=-1)
    if decomposition == "single":
        return torch.clamp(rewards, 0.0, 1.0).unsqueeze(-1)
    raise ValueError(f"unknown reward decomposition {decomposition!r}; valid: {', '.join(DECOMPOSITIONS)}")


def orchestrate(q_tilde: torch.Tensor, lambdas: tuple[float, ...], mapping: str, c: float = 0.5,
                d: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mapped channel values [B, C, A] -> (channel values f^-1(Q~_j) [B, C, A], Q = sum_j lambda_j Q_j [B, A])."""
    q_channels = inverse_map(q_tilde, mapping, c, d)
    weights = torch.tensor(lambdas, dtype=q_channels.dtype, device=q_channels.device).view(1, -1, 1)
    return q_channels, (weights * q_channels).sum(dim=1)
