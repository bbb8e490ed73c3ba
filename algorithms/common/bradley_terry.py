"""Bradley-Terry reward models: the pairwise loss, accuracies, and hard EM over a mixture of reward models.

Bradley-Terry (1952) models a preference between two responses of one prompt x as

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))

so a reward model r is fitted by minimising the negative log-likelihood of the labels,

    L_BT = -log sigmoid(r(x, y_w) - r(x, y_l))                                        (per labelled pair)

`em_reward_mixture` fits K reward models to preferences of a population of users with different hidden
preferences, by hard EM over users (MaxMin-RLHF, P044, its Algorithm 1): every user h is assigned to the
cluster whose model gives h's labelled pairs the highest likelihood,

    E-step:  u(h) = argmax_u  sum_{(x, y_w, y_l) in D_h}  log sigmoid(r_u(x, y_w) - r_u(x, y_l))
    M-step:  r_u  = argmin  sum_{h: u(h) = u}  sum_{D_h}  L_BT(r_u)

until no user changes cluster. The models are whatever the caller fits (callbacks), so the same EM runs on
linear models in a test and on RLlib reward-model learners in the MaxMin rule.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_w - r_l) (log 2 when the model cannot tell the two apart)."""
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected)


def pairwise_accuracy(r_first: np.ndarray, r_second: np.ndarray, s_first: np.ndarray,
                      s_second: np.ndarray) -> tuple[float, float, int]:
    """How often the model orders two responses as the hidden scores s do, over the pairs whose hidden scores
    differ (equal scores carry no order). A model tie (r equal) counts half. Returns (accuracy, SE, pairs)."""
    differ = np.asarray(s_first) != np.asarray(s_second)
    n = int(differ.sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    sign_r = np.sign(np.asarray(r_first) - np.asarray(r_second))[differ]
    sign_s = np.sign(np.asarray(s_first) - np.asarray(s_second))[differ]
    hits = np.where(sign_r == 0, 0.5, (sign_r == sign_s).astype(float))
    return float(hits.mean()), float(hits.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"), n


def bayes_label_accuracy(p_first: np.ndarray) -> float:
    """The best any model can do at predicting a noisy judge's label when P(first preferred) = p: the label is
    the likelier side with probability max(p, 1 - p). The mean over pairs bounds label accuracy from above."""
    p = np.asarray(p_first, dtype=np.float64)
    return float(np.maximum(p, 1.0 - p).mean())


@dataclass
class EMResult:
    assignment: dict[Hashable, int]  # user -> cluster
    iterations: int
    converged: bool
    history: list[dict[Hashable, int]] = field(default_factory=list)  # the assignment after each E-step


def em_reward_mixture(users: Sequence[Hashable], clusters: int, init: dict[Hashable, int],
                      fit: Callable[[int, list[Hashable]], None],
                      user_loglik: Callable[[int], dict[Hashable, float]],
                      max_iters: int = 10) -> EMResult:
    """Hard EM over users (see the module docstring).

    `init` is the first assignment; `fit(u, users_of_u)` runs the M-step for cluster u (train r_u on the pairs of
    those users; a cluster left with no user is not refitted); `user_loglik(u)` returns, for every user, the
    summed log-likelihood of that user's labelled pairs under r_u. Stops when an E-step changes nothing."""
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    missing = [h for h in users if h not in init]
    if missing:
        raise ValueError(f"init assigns no cluster to users {missing[:5]}")
    assignment = {h: int(init[h]) for h in users}
    history = []
    for iteration in range(1, max_iters + 1):
        for u in range(clusters):  # M-step
            members = [h for h in users if assignment[h] == u]
            if members:
                fit(u, members)
        loglik = [user_loglik(u) for u in range(clusters)]  # E-step
        new = {h: int(np.argmax([loglik[u][h] for u in range(clusters)])) for h in users}
        history.append(new)
        if new == assignment:
            return EMResult(assignment, iteration, True, history)
        assignment = new
    return EMResult(assignment, max_iters, False, history)


def split_by_fit(user_loglik: dict[Hashable, float], clusters: int, iters: int = 100) -> dict[Hashable, int]:
    """An EM start that breaks the symmetry of K identical models: cluster the users by how well ONE model fitted
    to everyone explains them (mean log-likelihood per pair), with 1-D k-means started at evenly spaced ranks;
    cluster 0 is the best-explained group. A pooled model mostly learns the majority, so users it explains
    worst are the ones most likely to form their own group; k-means (not equal-size cuts) lets a small minority
    be a small cluster."""
    users = sorted(user_loglik, key=lambda h: -user_loglik[h])
    values = np.array([user_loglik[h] for h in users], dtype=np.float64)
    k = min(clusters, len(users))
    centres = values[np.linspace(0, len(users) - 1, k).round().astype(int)]
    labels = np.zeros(len(users), dtype=int)
    for _ in range(iters):
        labels = np.abs(values[:, None] - centres[None, :]).argmin(1)
        new = np.array([values[labels == j].mean() if (labels == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    rank = {int(j): r for r, j in enumerate(np.argsort(-centres))}  # cluster 0 = the highest centre
    return {h: rank[int(labels[i])] for i, h in enumerate(users)}
