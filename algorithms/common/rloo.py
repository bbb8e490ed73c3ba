"""Leave-one-out (RLOO) advantages over groups of rollouts that share a context (numpy, no framework).

For K >= 2 rollouts i = 1..K of the same context (same task / initial state) with returns R_i:

    A_i = R_i - 1/(K-1) * sum_{j != i} R_j                      (= K/(K-1) * (R_i - mean_j R_j))

Each rollout is baselined by the mean of the *other* rollouts, which does not depend on rollout i, so the policy
gradient stays unbiased (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"). RIPT-VLA
(P229) and LOOP use it as the critic-free advantage. A group of one rollout has no leave-one-out baseline:
its advantage is 0 (it carries no learning signal), and so is every advantage of a group whose returns are
all equal, which is what RIPT's dynamic rollout sampling filters out.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def rloo_advantages(returns: np.ndarray) -> np.ndarray:
    """A_i = R_i - mean_{j != i} R_j for one group of K rollouts of the same context (zeros when K < 2)."""
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 1:
        raise ValueError(f"returns must be 1-D (one value per rollout), got shape {returns.shape}")
    k = len(returns)
    if k < 2:
        return np.zeros_like(returns)
    others_mean = (returns.sum() - returns) / (k - 1)
    return returns - others_mean


def grouped_rloo_advantages(returns: Sequence[float], groups: Sequence[Hashable]) -> np.ndarray:
    """RLOO advantages of rollouts tagged with a group (context) id: each group is baselined on its own."""
    returns = np.asarray(returns, dtype=np.float64)
    if len(returns) != len(groups):
        raise ValueError(f"{len(returns)} returns but {len(groups)} group ids")
    advantages = np.zeros_like(returns)
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    for indices in members.values():
        advantages[indices] = rloo_advantages(returns[indices])
    return advantages


def is_informative_group(returns: Sequence[float]) -> bool:
    """False when all K returns are equal (all success or all failure): every RLOO advantage is then zero."""
    returns = np.asarray(returns, dtype=np.float64)
    return len(returns) >= 2 and bool(np.ptp(returns) > 0)
