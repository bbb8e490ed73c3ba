"""Bootstrapped TD targets and target-network arithmetic shared by the off-policy rules (torch).

All targets are one-step (n = 1) and treat `terminated` (a true end of the MDP) as the only reason not to
bootstrap; a time-limit truncation keeps its bootstrap because the stored next observation is the real s'.

    Q-learning (DQN, Mnih et al. 2015):      y = r + gamma (1 - d) max_a' Q_target(s', a')
    double Q-learning (van Hasselt 2016):    y = r + gamma (1 - d) Q_target(s', argmax_a' Q_online(s', a'))
    soft (SAC, Haarnoja et al. 2018):        y = r + gamma (1 - d) (min_i Q_target_i(s', a') - alpha log pi(a'|s')),
                                             a' ~ pi(.|s')
    clipped double Q (TD3, Fujimoto 2018):   y = r + gamma (1 - d) min_i Q_target_i(s', a~'),
                                             a~' = clip(mu_target(s') + clip(eps, -c, c), low, high), eps ~ N(0, s^2)
    Polyak averaging:                        theta_target <- tau theta + (1 - tau) theta_target
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def bootstrap(rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float,
              next_values: torch.Tensor) -> torch.Tensor:
    """r + gamma (1 - d) V(s'): the common tail of every one-step target (no gradient flows through it)."""
    return (rewards + gamma * (1.0 - terminateds.float()) * next_values).detach()


def q_learning_target(rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float,
                      next_q_target: torch.Tensor, next_q_online: torch.Tensor | None = None) -> torch.Tensor:
    """DQN's target from [B, A] next-state Q-values; with `next_q_online` the double-DQN target
    (the online net picks a', the target net evaluates it)."""
    if next_q_online is None:
        next_values = next_q_target.max(dim=-1).values
    else:
        best = next_q_online.argmax(dim=-1, keepdim=True)
        next_values = next_q_target.gather(-1, best).squeeze(-1)
    return bootstrap(rewards, terminateds, gamma, next_values)


def soft_q_target(rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float,
                  next_q_targets: Iterable[torch.Tensor], next_logp: torch.Tensor, alpha: float | torch.Tensor
                  ) -> torch.Tensor:
    """SAC's soft target: min over the target critics at a' ~ pi(.|s') minus alpha log pi(a'|s')."""
    next_q = torch.stack(list(next_q_targets), dim=0).min(dim=0).values
    return bootstrap(rewards, terminateds, gamma, next_q - alpha * next_logp)


def clipped_double_q_target(rewards: torch.Tensor, terminateds: torch.Tensor, gamma: float,
                            next_q1: torch.Tensor, next_q2: torch.Tensor) -> torch.Tensor:
    """TD3's target: the smaller of the two target critics (P171's single critic: pass the same tensor twice)."""
    return bootstrap(rewards, terminateds, gamma, torch.minimum(next_q1, next_q2))


def smoothed_target_action(target_actions: torch.Tensor, noise_std: float, noise_clip: float,
                           low: float = -1.0, high: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """TD3's target policy smoothing: clip(mu'(s') + clip(eps, -c, c), low, high), eps ~ N(0, noise_std^2).
    `noise` (standard normal draws) may be given so a test can fix it."""
    if noise is None:
        noise = torch.randn_like(target_actions)
    eps = torch.clamp(noise * noise_std, -noise_clip, noise_clip)
    return torch.clamp(target_actions + eps, low, high)


def huber(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Per-element Huber loss: x^2 / 2 for |x| <= delta, else delta (|x| - delta / 2). Its gradient is the TD error
    clipped to [-delta, delta] (Mnih et al. 2015's error clipping)."""
    absolute = x.abs()
    quadratic = torch.clamp(absolute, max=delta)
    return 0.5 * quadratic**2 + delta * (absolute - quadratic)


@torch.no_grad()
def polyak_update(online: torch.nn.Module, target: torch.nn.Module, tau: float) -> None:
    """theta_target <- tau theta + (1 - tau) theta_target, parameter by parameter (tau = 1: a hard copy)."""
    for p, p_target in zip(online.parameters(), target.parameters()):
        p_target.mul_(1.0 - tau).add_(p, alpha=tau)
