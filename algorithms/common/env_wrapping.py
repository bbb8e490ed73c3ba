"""Rules whose data layout is a wrapper around the user's env (a population of copies, an extended MDP, ...).

`WrappedEnvConfigMixin` turns `config.environment("SomeEnv-v1")` into `config.environment(WRAPPER_ENV_ID)` and
remembers "SomeEnv-v1" as the base env. Every EnvRunner builds its env with `gym.make(WRAPPER_ENV_ID,
**env_config)`, so `validate()` writes the base id and the rule's wrapper options (`wrapper_env_config()`) into
`env_config`, keeping them in step with the rule's options. The wrapper's gymnasium id must be registered by a
module the rule's config module imports, so that unpickling the config in a remote EnvRunner registers it.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.utils.from_config import NotProvided


class WrappedEnvConfigMixin:
    """Put it before the rule's AlgorithmConfig class in the bases; set WRAPPER_ENV_ID."""

    WRAPPER_ENV_ID: str = ""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.wrapped_base_env: str | None = None

    def wrapper_env_config(self) -> dict[str, Any]:
        """The wrapper's keyword arguments besides `base_env` (the rule's options)."""
        return {}

    def environment(self, env=NotProvided, **kwargs):
        if isinstance(env, str) and env != self.WRAPPER_ENV_ID:
            self.wrapped_base_env = env
            env = self.WRAPPER_ENV_ID
        return super().environment(env=env, **kwargs)

    def validate(self) -> None:
        if self.wrapped_base_env is not None:
            self.env_config = {**(self.env_config or {}), "base_env": self.wrapped_base_env,
                               **self.wrapper_env_config()}
        super().validate()
        if self.env == self.WRAPPER_ENV_ID and self.wrapped_base_env is None:
            self._value_error(f"{type(self).__name__} wraps a base env: give its id to config.environment(), "
                              f"e.g. config.environment('CartPole-v1')")
