"""K copies of one instance, one per population member: the data layout of population training (P206, Poppy).

`PopulationEnv(base_env, population_size=K)` makes K copies of a gymnasium env. Every reset draws one instance
seed and resets all K copies with it, so each member attempts the *same* instance (the base env must draw its
instance from its seeded RNG on reset, as gymnasium envs do). Member k acts in copy k:

    observation  = concat(o_1, ..., o_K)                     (Box of K * d)
    action       = (a_1, ..., a_K)                           (MultiDiscrete([n] * K), or Box of K * m)
    reward_t     = max_k R_k(t) - max_k R_k(t - 1)           (R_k(t): member k's return so far)

so an episode's return is the population's return max_k R_k on the instance. A member whose copy has ended
is frozen (its actions are ignored) until every copy has ended. `info` carries what a population update needs:
`member_returns` (R_k so far, K floats) and `member_active` (which members acted in this step).

Seeding: `reset(seed=s)` starts a reproducible stream of instances; a later reset with the same s continues that
stream instead of repeating its first instance (RLlib's complete_episodes sampling re-passes its seed on every
episode's reset).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "rlfleet/Population-v0"


class PopulationEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, base_env: str, population_size: int = 4, **base_kwargs: Any):
        if population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {population_size}")
        self.population_size = population_size
        self.copies = [gym.make(base_env, **base_kwargs) for _ in range(population_size)]
        obs_space, act_space = self.copies[0].observation_space, self.copies[0].action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"PopulationEnv needs a flat Box observation space, {base_env} has {obs_space}")
        self.member_observation_space = obs_space
        self.member_action_space = act_space
        self.observation_space = gym.spaces.Box(
            np.tile(obs_space.low, population_size), np.tile(obs_space.high, population_size), dtype=obs_space.dtype
        )
        if isinstance(act_space, gym.spaces.Discrete):
            self.action_space = gym.spaces.MultiDiscrete([act_space.n] * population_size)
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            self.action_space = gym.spaces.Box(
                np.tile(act_space.low, population_size), np.tile(act_space.high, population_size), dtype=act_space.dtype
            )
        else:
            raise ValueError(f"PopulationEnv needs a Discrete or flat Box action space, {base_env} has {act_space}")
        self.returns = np.zeros(population_size)
        self.done = np.zeros(population_size, dtype=bool)
        self.last_obs: list[np.ndarray] = []
        self._stream_seed: int | None = None

    def _member_actions(self, action: Any) -> list[Any]:
        action = np.asarray(action)
        if isinstance(self.member_action_space, gym.spaces.Discrete):
            return [int(a) for a in action.reshape(self.population_size)]
        return list(action.reshape(self.population_size, -1).astype(self.member_action_space.dtype))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # The seed starts the stream of instances; a later reset with the same seed goes on with the stream.
        # (RLlib's complete_episodes sampling passes its configured seed to every episode's reset: reseeding
        # each time would make every episode the same instance.)
        if seed is not None and seed == self._stream_seed:
            seed = None
        elif seed is not None:
            self._stream_seed = seed
        super().reset(seed=seed)
        instance_seed = int(self.np_random.integers(2**31 - 1))
        self.last_obs = [env.reset(seed=instance_seed, options=options)[0] for env in self.copies]
        self.returns = np.zeros(self.population_size)
        self.done = np.zeros(self.population_size, dtype=bool)
        info = {"member_returns": self.returns.copy(), "member_active": ~self.done}
        return np.concatenate(self.last_obs), info

    def step(self, action: Any):
        best_before = self.returns.max()
        active = ~self.done
        for k, member_action in enumerate(self._member_actions(action)):
            if self.done[k]:
                continue
            obs, reward, terminated, truncated, _ = self.copies[k].step(member_action)
            self.last_obs[k] = obs
            self.returns[k] += float(reward)
            self.done[k] = terminated or truncated
        all_done = bool(self.done.all())
        info = {"member_returns": self.returns.copy(), "member_active": active}
        # The population episode ends when every copy has ended; it counts as terminated (no bootstrap).
        return np.concatenate(self.last_obs), float(self.returns.max() - best_before), all_done, False, info

    def close(self):
        for env in self.copies:
            env.close()


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.population:PopulationEnv")
