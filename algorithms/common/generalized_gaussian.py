"""The generalized Gaussian distribution (GGD) of a TD error (P256, Kim et al., "Generalized Gaussian Temporal
Difference Error for Uncertainty-aware Reinforcement Learning") (torch).

Zero-mean GGD with scale alpha > 0 and shape beta > 0 (beta = 2: Gaussian with variance alpha^2 / 2; beta = 1:
Laplace with scale alpha):

    p(delta)   = beta / (2 alpha Gamma(1 / beta)) exp(-(|delta| / alpha)^beta)
    -log p     = (|delta| / alpha)^beta + log(alpha) - log(beta) + log Gamma(1 / beta) + log 2
    Var[delta] = alpha^2 Gamma(3 / beta) / Gamma(1 / beta)      (falls as beta grows: the paper's aleatoric
                                                                  uncertainty is inversely related to beta)
    risk-averse weights over an ensemble of critics i = 1..N:  w_i = beta_i / sum_j beta_j
"""

from __future__ import annotations

import math

import torch

_LOG_2 = math.log(2.0)
_TINY = 1e-8  # keeps |delta|^beta differentiable at delta = 0 when beta < 1


def ggd_nll(delta: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Elementwise -log p(delta) of a zero-mean GGD(scale, shape)."""
    ratio = (delta.abs() + _TINY) / scale
    return ratio.pow(shape) + torch.log(scale) - torch.log(shape) + torch.lgamma(1.0 / shape) + _LOG_2


def ggd_variance(scale: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """alpha^2 Gamma(3 / beta) / Gamma(1 / beta)."""
    return scale.pow(2) * torch.exp(torch.lgamma(3.0 / shape) - torch.lgamma(1.0 / shape))


def risk_averse_weights(shapes: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """beta_i / sum_j beta_j along `dim` (the ensemble axis), held constant (no gradient through the weights)."""
    shapes = shapes.detach()
    return shapes / shapes.sum(dim=dim, keepdim=True)
