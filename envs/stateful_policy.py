"""The extended MDP of a stochastic stateful policy (P184): the policy's internal state z rides along with the env.

A stateful policy pi(a_t, z_{t+1} | o_t, z_t) = pi_a(a_t | o_t, z_t) pi_z(z_{t+1} | o_t, z_t) is a memoryless
policy of the extended MDP whose state is (o_t, z_t) and whose action is (a_t, z_{t+1}). This wrapper is that
extended MDP for any gymnasium env:

    observation  = concat(o_t, z_t)                       (z_0 = 0 at every reset)
    action       = (a_t, z_{t+1})                         Tuple(base action, Box(-1, 1)^m) for a Discrete base,
                                                          one Box(base low/high ++ [-1, 1]^m) for a Box base
    step         = base.step(a_t); z <- clip(z_{t+1}, -1, 1); same reward, termination, info

The stochastic internal-state transition is thereby an action: its log-likelihood enters the policy gradient and
no gradient flows through time (no BPTT). The bound [-1, 1] matches RLlib's action normalisation; a sample
outside it is clipped, a deterministic function of the sampled action the policy gradient does not need to know.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "rlfleet/StatefulPolicy-v0"


class StatefulPolicyEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, base_env: str, state_dim: int = 4, **base_kwargs: Any):
        if state_dim < 1:
            raise ValueError(f"state_dim must be >= 1, got {state_dim}")
        self.base = gym.make(base_env, **base_kwargs)
        self.state_dim = state_dim
        obs_space, act_space = self.base.observation_space, self.base.action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"StatefulPolicyEnv needs a flat Box observation space, {base_env} has {obs_space}")
        ones = np.ones(state_dim, np.float32)
        self.observation_space = gym.spaces.Box(
            np.concatenate([obs_space.low, -ones]).astype(np.float32),
            np.concatenate([obs_space.high, ones]).astype(np.float32),
            dtype=np.float32,
        )
        self.state_space = gym.spaces.Box(-ones, ones, dtype=np.float32)
        if isinstance(act_space, gym.spaces.Discrete):
            self.action_space = gym.spaces.Tuple((act_space, self.state_space))
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            self.action_space = gym.spaces.Box(
                np.concatenate([act_space.low, -ones]).astype(np.float32),
                np.concatenate([act_space.high, ones]).astype(np.float32),
                dtype=np.float32,
            )
        else:
            raise ValueError(f"StatefulPolicyEnv needs a Discrete or flat Box action space, {base_env} has {act_space}")
        self.z = np.zeros(state_dim, np.float32)

    def split_action(self, action: Any) -> tuple[Any, np.ndarray]:
        """(base action, next internal state) of an extended action."""
        if isinstance(self.action_space, gym.spaces.Tuple):
            base_action, z_next = action
            return int(np.asarray(base_action).reshape(())), np.asarray(z_next, np.float32).reshape(self.state_dim)
        action = np.asarray(action, np.float32).reshape(-1)
        return action[: -self.state_dim], action[-self.state_dim :]

    def _obs(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(observation, np.float32), self.z]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        observation, info = self.base.reset(seed=seed, options=options)
        self.z = np.zeros(self.state_dim, np.float32)
        return self._obs(observation), info

    def step(self, action: Any):
        base_action, z_next = self.split_action(action)
        observation, reward, terminated, truncated, info = self.base.step(base_action)
        self.z = np.clip(z_next, -1.0, 1.0).astype(np.float32)
        return self._obs(observation), reward, terminated, truncated, info

    def close(self):
        self.base.close()


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.stateful_policy:StatefulPolicyEnv")
