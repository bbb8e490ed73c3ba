"""PPO on whole episodes of a discrete control task, for the preference rules that do RL on a reward that is not
the env's (SPO's win rates, a learned reward model). The math is the shared one: GAE (algorithms/common/
advantages.py, P158), the clipped surrogate and the squared value error (algorithms/common/losses.py, P147).

The critic sees the observation and the step's time fraction t / T: the learner knows where in the episode a
step is (never the reward), and a reward paid at the end of an episode (SPO) is not predictable without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from algorithms.common.advantages import gae_advantages, standardize
from algorithms.common.losses import clipped_surrogate, value_loss
from algorithms.preference.control_collect import CategoricalPolicy, segment_logprobs


class TimeValue(nn.Module):
    """V(s, t / T): a tanh MLP."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        sizes = [obs_dim + 1, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (E, T + 1, d) -> V (E, T + 1)."""
        steps = obs.shape[1]
        t = (torch.arange(steps, dtype=obs.dtype) / max(steps - 1, 1)).expand(*obs.shape[:-1]).unsqueeze(-1)
        return self.net(torch.cat([obs, t], dim=-1)).squeeze(-1)


@dataclass
class PPOSettings:
    gamma: float = 0.99
    lambda_: float = 0.95
    clip: float = 0.2
    epochs: int = 4
    minibatches: int = 4
    vf_coeff: float = 0.5
    entropy_coeff: float = 0.01


def episode_advantages(rewards: np.ndarray, values: np.ndarray, gamma: float, lambda_: float) -> np.ndarray:
    """GAE per episode: rewards (E, T), values (E, T + 1); the episode's game ends at T (bootstrap 0)."""
    return np.stack([gae_advantages(r, v[:-1], 0.0, gamma, lambda_) for r, v in zip(rewards, values)])


def ppo_update(policy: CategoricalPolicy, value: TimeValue, optimizer: torch.optim.Optimizer, obs: torch.Tensor,
               actions: torch.Tensor, rewards: np.ndarray, settings: PPOSettings,
               generator: torch.Generator, context: torch.Tensor | None = None) -> dict[str, float]:
    """Several epochs of clipped PPO on whole episodes obs (E, T + 1, d), actions (E, T), rewards (E, T)."""
    with torch.no_grad():
        old_logp = segment_logprobs(policy, obs, actions, context)
        values = value(obs).numpy().astype(np.float64)
    advantages = episode_advantages(rewards, values, settings.gamma, settings.lambda_)
    targets = torch.as_tensor(advantages + values[:, :-1], dtype=torch.float32)
    adv = torch.as_tensor(standardize(advantages), dtype=torch.float32)
    episodes = obs.shape[0]
    size = max(1, episodes // settings.minibatches)
    stats: dict[str, float] = {}
    for _ in range(settings.epochs):
        order = torch.randperm(episodes, generator=generator)
        for start in range(0, episodes, size):
            idx = order[start:start + size]
            ctx = None if context is None else context[idx]
            logits = policy(obs[idx, :-1], None if ctx is None else ctx[:, None, :])
            logp_all = torch.log_softmax(logits, -1)
            logp = logp_all.gather(-1, actions[idx].long().unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            surrogate = clipped_surrogate(torch.exp(logp - old_logp[idx]), adv[idx], settings.clip).mean()
            v_loss = value_loss(value(obs[idx])[:, :-1], targets[idx]).mean()
            loss = -surrogate + settings.vf_coeff * v_loss - settings.entropy_coeff * entropy
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value.parameters()), 0.5)
            optimizer.step()
            stats = {"surrogate": float(surrogate.detach()), "value_loss": float(v_loss.detach()),
                     "entropy": float(entropy.detach())}
    return stats
