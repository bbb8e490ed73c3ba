"""Quantile-based distributional RL pieces (torch): IQN's quantile embedding and the quantile Huber loss.

Implicit Quantile Networks (Dabney et al. 2018, "IQN"):

    phi_j(tau)  = ReLU( sum_{i=0}^{n-1} cos(pi i tau) w_ij + b_j )                        (IQN eq. 4)
    Z_tau(s, a) = f( psi(s) * phi(tau) )_a        (* = Hadamard product with the state embedding psi)

    delta_ij      = y_j - Z_{tau_i}(s, a),         y_j = r + gamma (1 - terminated) Z'_{tau'_j}(s', a')
    L_kappa(d)    = d^2 / 2                  if |d| <= kappa
                    kappa (|d| - kappa / 2)  otherwise                                  (Huber loss)
    rho^kappa_tau(d) = |tau - 1{d < 0}| L_kappa(d) / kappa                               (IQN eq. 3)
    loss          = sum_{i=1}^{N} (1/N') sum_{j=1}^{N'} rho^kappa_{tau_i}(delta_ij)        (IQN eq. 3, per sample)

kappa = 0 is the plain quantile-regression loss |tau - 1{d < 0}| |d| (the kappa -> 0 limit).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_basis(taus: torch.Tensor, num_cosines: int) -> torch.Tensor:
    """cos(pi i tau) for i = 0..num_cosines-1: shape taus.shape + (num_cosines,)."""
    i = torch.arange(num_cosines, dtype=taus.dtype, device=taus.device)
    return torch.cos(math.pi * taus.unsqueeze(-1) * i)


class QuantileEmbedding(nn.Module):
    """phi(tau) = ReLU(Linear(cos(pi i tau))), IQN eq. 4: maps quantile fractions to a vector of size `dim`."""

    def __init__(self, dim: int, num_cosines: int = 64):
        super().__init__()
        self.num_cosines = num_cosines
        self.linear = nn.Linear(num_cosines, dim)

    def forward(self, taus: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(cosine_basis(taus, self.num_cosines)))


def midpoint_taus(num_quantiles: int, batch_size: int = 1, device=None) -> torch.Tensor:
    """The fixed fractions tau_i = (2i - 1) / (2N), i = 1..N (QR-DQN's quantile midpoints), shape [B, N]."""
    taus = (torch.arange(num_quantiles, dtype=torch.float32, device=device) + 0.5) / num_quantiles
    return taus.expand(batch_size, num_quantiles)


def quantile_td_targets(
    rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float, next_quantiles: torch.Tensor
) -> torch.Tensor:
    """Distributional Bellman targets y_j = r + gamma (1 - terminated) Z'_j, shape [B, N']."""
    not_done = 1.0 - terminateds.float()
    return rewards.unsqueeze(-1) + gamma * not_done.unsqueeze(-1) * next_quantiles


def quantile_huber_loss(
    quantiles: torch.Tensor, taus: torch.Tensor, targets: torch.Tensor, kappa: float = 1.0
) -> torch.Tensor:
    """IQN eq. 3 per sample: sum over the N predicted quantiles, mean over the N' target samples.

    Args:
        quantiles: Z_{tau_i}, shape [B, N] (with gradient).
        taus: the fractions tau_i the quantiles were predicted at, shape [B, N].
        targets: target samples y_j, shape [B, N'] (treated as constants).
        kappa: Huber threshold; 0 = plain quantile regression.
    Returns: shape [B].
    """
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    delta = targets.detach().unsqueeze(-2) - quantiles.unsqueeze(-1)  # [B, N, N']: delta_ij = y_j - Z_i
    abs_delta = delta.abs()
    if kappa == 0:
        scaled = abs_delta
    else:
        huber = torch.where(abs_delta <= kappa, 0.5 * delta.pow(2), kappa * (abs_delta - 0.5 * kappa))
        scaled = huber / kappa
    weight = (taus.unsqueeze(-1) - (delta.detach() < 0).float()).abs()
    return (weight * scaled).mean(-1).sum(-1)
