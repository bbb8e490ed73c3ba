"""Average-reward (differential) TD arithmetic shared by average-reward critics (torch).

In the average-reward criterion the return is undiscounted and each reward is measured against the policy's gain
rho = lim_T 1/T E[sum_t r_t]. The differential action value satisfies

    Q(s, a) = E[r - rho + Q(s', mu(s'))]

so the one-step differential TD error of a critic is

    delta = r - rho + (1 - d) Q_next - Q(s, a)

with `d` a true termination (a continuing task has none; an env that does end stops the bootstrap, as a
discounted target would). Unlike a discounted target the error is returned with its dependence on rho kept:
rules that learn rho by the same squared TD loss (ARO-DDPG, P211) need d delta^2 / d rho.
"""

from __future__ import annotations

import torch


def differential_td_error(q: torch.Tensor, rewards: torch.Tensor, rho: torch.Tensor, terminateds: torch.Tensor,
                          next_values: torch.Tensor) -> torch.Tensor:
    """r - rho + (1 - d) next_values - q; `next_values` (a target network's) carry no gradient, rho and q do."""
    bootstrap = (1.0 - terminateds.float()) * next_values.detach()
    return rewards.float() - rho + bootstrap - q
