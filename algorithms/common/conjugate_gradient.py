"""Second-order pieces for natural-gradient and trust-region steps (TRPO P145, Appendix C)."""

from __future__ import annotations

from typing import Callable

import torch


def conjugate_gradient(
    matrix_vector_product: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iterations: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given only x -> A x."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_dot_r = r @ r
    for _ in range(iterations):
        if r_dot_r < residual_tol:
            break
        a_p = matrix_vector_product(p)
        alpha = r_dot_r / (p @ a_p)
        x += alpha * p
        r -= alpha * a_p
        new_r_dot_r = r @ r
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return x


def max_step_scale(search_direction: torch.Tensor, fisher_direction: torch.Tensor, max_kl: float) -> torch.Tensor:
    """beta = sqrt(2 delta / (s^T F s)): the step length that puts the quadratic KL model exactly at delta."""
    shs = search_direction @ fisher_direction
    return torch.sqrt(2.0 * max_kl / torch.clamp(shs, min=1e-12))


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    max_kl: float,
    backtrack_coeff: float = 0.5,
    max_backtracks: int = 10,
) -> tuple[float, int]:
    """Shrink the full step until KL <= max_kl and the surrogate improves.

    `evaluate(fraction)` applies `fraction` of the full step and returns (surrogate improvement, mean KL).
    Returns (accepted fraction, backtracks used); fraction 0.0 means no step was accepted.
    """
    fraction = 1.0
    for attempt in range(max_backtracks):
        improvement, kl = evaluate(fraction)
        if kl <= max_kl and improvement > 0.0:
            return fraction, attempt
        fraction *= backtrack_coeff
    return 0.0, max_backtracks
