"""The multi-level Monte Carlo (MLMC) gradient estimator for Markovian data (Dorfman & Levy 2022; MAC, P069).

Draw J ~ Geom(1/2) (P(J = j) = 2^-j, j = 1, 2, ...), roll the chain for 2^J steps, and with g^j the average of
the first 2^j per-step estimates X_1, X_2, ...:

    g^MLMC = g^0 + 2^J (g^J - g^(J-1))    if 2^J <= T_max
           = g^0                           otherwise (then only X_1 is needed)

Its expectation equals that of g^(log2 T_max), a 2^(log2 T_max)-sample average, at an expected rollout length
of only O(log T_max): the estimator needs no knowledge of the chain's mixing time. It is linear in the
samples, g^MLMC = sum_t w_t X_t, with weights (for 2^J <= T_max)

    w_1 = 0,   w_t = -1 for 2 <= t <= 2^(J-1),   w_t = +1 for 2^(J-1) < t <= 2^J         (they sum to 1)

so a rule can build the estimate as a weighted sum of per-step losses and let autograd do the rest.
"""

from __future__ import annotations

import numpy as np


def sample_level(rng: np.random.Generator) -> int:
    """J ~ Geom(1/2) on {1, 2, ...}."""
    return int(rng.geometric(0.5))


def rollout_length(level: int, t_max: int) -> int:
    """Steps to collect for level J: 2^J, or 1 when 2^J exceeds T_max (the estimate is then g^0)."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    return 2**level if 2**level <= t_max else 1


def mlmc_weights(level: int, t_max: int) -> np.ndarray:
    """w_1..w_T of g^MLMC = sum_t w_t X_t for a rollout of `rollout_length(level, t_max)` steps."""
    length = rollout_length(level, t_max)
    if length == 1:
        return np.ones(1)
    half = length // 2
    # 2^J * (1/2^J) on every sample, minus 2^J * (1/2^(J-1)) on the first half, plus g^0 = X_1.
    weights = np.ones(length)
    weights[:half] -= 2.0
    weights[0] += 1.0
    return weights


def mlmc_estimate(samples: np.ndarray, level: int, t_max: int) -> np.ndarray:
    """g^MLMC from per-step samples X_1..X_T (axis 0), computed from its definition (the weights' reference)."""
    samples = np.asarray(samples, dtype=np.float64)
    g0 = samples[0]
    if 2**level > t_max:
        return g0
    n = 2**level
    return g0 + n * (samples[:n].mean(0) - samples[: n // 2].mean(0))
