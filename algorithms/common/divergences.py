"""Divergences between action distributions given as RLlib distribution objects or raw parameters."""

from __future__ import annotations

import torch


def mean_kl(old_dist, new_dist, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over states of KL(pi_old(.|s) || pi_new(.|s)); dists are RLlib TorchDistribution objects."""
    from algorithms.common.losses import masked_mean

    return masked_mean(old_dist.kl(new_dist), mask)


def kl_categorical(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row for categorical distributions given by logits: sum_a p_a (log p_a - log q_a)."""
    log_p = torch.log_softmax(p_logits, dim=-1)
    log_q = torch.log_softmax(q_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_diag_gaussian(
    mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor, log_std_q: torch.Tensor
) -> torch.Tensor:
    """KL(p || q) per row for diagonal Gaussians:
    sum_i log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2."""
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)
