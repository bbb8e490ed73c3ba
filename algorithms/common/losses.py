"""Policy and value loss pieces (torch). Each returns per-sample terms; reduce with `masked_mean`."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the entries where mask is True (all entries when mask is None)."""
    if mask is None:
        return x.mean()
    return x[mask].mean() if mask.any() else x.sum() * 0.0


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's clipped objective per sample (P147, eq. 7): min(r A, clip(r, 1-eps, 1+eps) A). Maximise it."""
    return torch.min(ratio * advantages, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)


def importance_weighted_surrogate(ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The unclipped surrogate r A (TRPO's objective, P145 eq. 14; CPI in P147). Maximise it."""
    return ratio * advantages


def value_loss(
    values: torch.Tensor,
    targets: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Squared error (V - V_target)^2 per sample.

    With `clip`, the prediction may move at most `clip` from the value it had when the data was collected
    (the OpenAI-baselines variant): max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
    """
    squared = (values - targets) ** 2
    if clip is None:
        return squared
    if old_values is None:
        raise ValueError("value clipping needs the old value predictions")
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    return torch.max(squared, (clipped_values - targets) ** 2)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[target - prediction] / Var[target]: 1 is perfect, 0 is no better than a constant."""
    var_targets = torch.var(targets)
    if var_targets.item() == 0.0:
        return float("nan")
    return float(1.0 - torch.var(targets - predictions) / var_targets)
