"""Small helpers for a rule config's `training()` keywords and `validate()` range checks."""

from __future__ import annotations

from typing import Any

from ray.rllib.utils.from_config import NotProvided


def set_provided(config: Any, **values: Any) -> None:
    """setattr(config, name, value) for every keyword the caller actually passed (not NotProvided)."""
    for name, value in values.items():
        if value is not NotProvided:
            setattr(config, name, value)


def check_positive_ints(config: Any, *names: str) -> None:
    """config._value_error unless every named field is an int >= 1."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            config._value_error(f"{name} must be an integer >= 1, got {value!r}")


def check_not_recurrent(config: Any, rule: str) -> None:
    if config.model_config.get("use_lstm") or config.model_config.get("use_attention"):
        config._value_error(f"{rule} does not support recurrent models")
