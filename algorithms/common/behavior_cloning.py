"""Behaviour cloning of a scripted demonstrator, for rules that start from (or build on) a BC policy.

    demonstrations:  D = {(s, a)}  from episodes of a demonstrator policy (optionally with Gaussian action noise)
    BC objective:    min_psi  mean_D ||pi_psi(s) - a_norm||^2,   a_norm = the action mapped to [-1, 1]^k
    pi_psi:          MLP with ReLU hidden layers and a tanh output (a deterministic BC policy)

Nothing is read from or written to disk: the demonstrations are generated at run time from the demonstrator and a
seed. A fitted policy can be frozen into a `FrozenMLP`, whose weights are buffers: part of the module's state (so
they are checkpointed and synced to EnvRunners) but not parameters (no optimizer sees them, no gradient reaches
them).
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Demonstrator = Callable[[np.ndarray], np.ndarray]


def to_unit_box(actions: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    """Env-space actions -> [-1, 1]^k (the inverse of the EnvRunner's action unsquashing)."""
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return (2.0 * (np.asarray(actions, np.float64) - low) / (high - low) - 1.0).astype(np.float32)


def run_episodes(env_id: str, act: Callable[[np.ndarray], np.ndarray], episodes: int,
                 seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """Episodes (reset seeds seed, seed + 1, ...) of `act(obs)` -> env-space action, clipped to the action box.
    Returns every step's observation and executed action, and each episode's return."""
    env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ValueError(f"behaviour cloning here needs a Box action space, got {env.action_space}")
    low, high = env.action_space.low, env.action_space.high
    observations, actions, returns = [], [], []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            done, total = False, 0.0
            while not done:
                action = np.clip(np.asarray(act(obs), np.float64).reshape(env.action_space.shape), low, high)
                observations.append(np.asarray(obs, np.float32))
                actions.append(action)
                obs, reward, terminated, truncated, _ = env.step(action.astype(env.action_space.dtype))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return observations, actions, returns


def collect_demonstrations(env_id: str, demonstrator: Demonstrator, episodes: int, noise_std: float,
                           seed: int) -> dict[str, np.ndarray | float]:
    """Run `episodes` episodes of demonstrator(obs) + N(0, noise_std^2) (clipped to the action box).

    Returns obs [N, obs_dim], actions [N, act_dim] normalised to [-1, 1], and the demonstrations' mean return."""
    rng = np.random.default_rng(seed)

    def noisy(obs: np.ndarray) -> np.ndarray:
        action = np.asarray(demonstrator(obs), np.float64)
        return action + noise_std * rng.standard_normal(action.shape)

    observations, actions, returns = run_episodes(env_id, noisy, episodes, seed)
    space = gym.make(env_id).action_space
    return {"obs": np.stack(observations), "actions": to_unit_box(np.stack(actions), space),
            "mean_return": float(np.mean(returns))}


def mlp_policy(obs_dim: int, act_dim: int, hidden: list[int]) -> nn.Sequential:
    """ReLU MLP with a tanh output: actions in [-1, 1]^k."""
    sizes = [obs_dim, *hidden, act_dim]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.ReLU() if i < len(sizes) - 2 else nn.Tanh())
    return nn.Sequential(*layers)


def bc_loss(predicted: torch.Tensor, demo_actions: torch.Tensor) -> torch.Tensor:
    """mean over the batch of the squared action error summed over action dimensions."""
    return ((predicted - demo_actions) ** 2).sum(dim=-1).mean()


def fit_behavior_cloning(obs: np.ndarray, actions: np.ndarray, hidden: list[int], steps: int, batch_size: int,
                         lr: float, seed: int) -> tuple[nn.Sequential, float]:
    """Adam on the BC objective with uniform minibatches; returns the policy and its last minibatch loss."""
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the initial weights: same seed, same base policy
    policy = mlp_policy(obs.shape[1], actions.shape[1], hidden)
    torch.random.set_rng_state(torch_state)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    obs_t, actions_t = torch.as_tensor(obs), torch.as_tensor(actions)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(0, len(obs_t), (batch_size,), generator=generator)
        loss = bc_loss(policy(obs_t[index]), actions_t[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy, float(loss.detach())


class FrozenMLP(nn.Module):
    """A ReLU/tanh MLP whose weights are buffers (state, not parameters): a frozen, black-box base policy."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.num_layers = len(sizes) - 1
        for i in range(self.num_layers):
            self.register_buffer(f"weight{i}", torch.zeros(sizes[i + 1], sizes[i]))
            self.register_buffer(f"bias{i}", torch.zeros(sizes[i + 1]))

    def load_from(self, policy: nn.Sequential) -> None:
        linears = [m for m in policy if isinstance(m, nn.Linear)]
        if len(linears) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} linear layers, got {len(linears)}")
        with torch.no_grad():
            for i, linear in enumerate(linears):
                getattr(self, f"weight{i}").copy_(linear.weight)
                getattr(self, f"bias{i}").copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = F.linear(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"))
            x = torch.relu(x) if i < self.num_layers - 1 else torch.tanh(x)
        return x


def evaluate_policy(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], episodes: int, seed: int) -> float:
    """Mean return of a deterministic [-1, 1]-action policy (unsquashed to the env's box) over `episodes`."""
    space = gym.make(env_id).action_space

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            unit = policy(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
        return space.low + (np.clip(unit, -1.0, 1.0) + 1.0) * 0.5 * (space.high - space.low)

    return float(np.mean(run_episodes(env_id, act, episodes, seed)[2]))
