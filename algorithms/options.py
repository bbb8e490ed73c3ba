"""User-settable options of a rule (`rlfleet train --set key=value`), typed and range-checked.

An option maps a short user-facing name onto the RLlib AlgorithmConfig. Its default is read from the rule's
config class, so a rule's defaults live in one place (its config's __init__).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from rlfleet.errors import UserError

MODEL_KEYS = {"hidden_sizes": "fcnet_hiddens", "activation": "fcnet_activation", "vf_share_layers": "vf_share_layers"}
ALIASES = {"train_batch_size": "train_batch_size_per_learner"}


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # what `check` demands, for the error message


def positive(x: Any) -> bool:
    return x is not None and x > 0


def non_negative(x: Any) -> bool:
    return x is not None and x >= 0


def unit_interval(x: Any) -> bool:
    return x is not None and 0 <= x <= 1


def positive_or_none(x: Any) -> bool:
    return x is None or x > 0


# Options every on-policy rule accepts.
ONPOLICY_OPTIONS: tuple[Option, ...] = (
    Option("lr", "Adam step size", positive, "> 0"),
    Option("gamma", "discount factor", lambda x: 0 < x <= 1, "in (0, 1]"),
    Option("lambda_", "GAE lambda (P158)", unit_interval, "in [0, 1]"),
    Option("train_batch_size", "env steps per training iteration", positive, ">= 1"),
    Option("grad_clip", "global gradient-norm clip (none = off)", positive_or_none, "> 0 or none"),
    Option("advantage_estimator", "which advantage estimator fills ADVANTAGES"),
    Option("standardize_advantages", "standardise advantages per batch (false = the paper's raw advantages)"),
    Option("hidden_sizes", "hidden layer sizes of the policy and value MLPs",
           lambda x: len(x) > 0 and all(isinstance(h, int) and h > 0 for h in x), "a non-empty list of positive ints"),
    Option("activation", "MLP activation", lambda x: x in ("tanh", "relu", "swish", "elu", "linear"),
           "one of tanh, relu, swish, elu, linear"),
    Option("vf_share_layers", "one torso for policy and value"),
    Option("num_env_runners", "EnvRunner actors (0 = sample in the driver)", non_negative, ">= 0"),
    Option("num_envs_per_env_runner", "vectorised envs per EnvRunner", positive, ">= 1"),
    Option("observation_filter", "NoFilter or MeanStdFilter (running observation normalisation)",
           lambda x: x in ("NoFilter", "MeanStdFilter"), "NoFilter or MeanStdFilter"),
)


def _config_attr(name: str) -> str:
    return ALIASES.get(name, name)


def get_option(config: Any, name: str) -> Any:
    """The option's current value on an AlgorithmConfig."""
    if name in MODEL_KEYS:
        return config.model_config.get(MODEL_KEYS[name])
    return getattr(config, _config_attr(name))


def mean_std_filter_connector(env=None, spaces=None, device=None):
    """EnvRunner connector factory: RLlib's running mean/std observation filter (new API stack)."""
    from ray.rllib.connectors.env_to_module import MeanStdFilter

    return MeanStdFilter()


def set_option(config: Any, name: str, value: Any) -> None:
    if name == "observation_filter":
        # On the new API stack the filter is an env-to-module connector; the old string setting alone is ignored.
        config.observation_filter = value
        config._env_to_module_connector = mean_std_filter_connector if value == "MeanStdFilter" else None
    elif name in MODEL_KEYS:
        model = dict(config._model_config or {})
        model[MODEL_KEYS[name]] = value
        config._model_config = model
    else:
        setattr(config, _config_attr(name), value)


def parse_value(name: str, text: str, default: Any) -> Any:
    """Parse `text` into the type of `default` (bool, int, float, str, list of ints, or None-able float)."""
    lowered = text.strip().lower()
    try:
        if isinstance(default, bool):
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if isinstance(default, float) or default is None:
            if default is None and lowered in ("none", "null", "off"):
                return None
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            return number
        if isinstance(default, (list, tuple)):
            items = json.loads(text) if lowered.startswith("[") else [int(t) for t in text.split(",") if t.strip()]
            if not isinstance(items, list):
                raise ValueError
            return items
        return text
    except (ValueError, json.JSONDecodeError):
        kind = {bool: "true or false", int: "an integer", float: "a number", list: "a list like 64,64"}.get(
            type(default), "a number or none"
        )
        raise UserError(f"--set {name}={text}: expected {kind}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['lr=1e-3', 'gamma=0.9'] -> {'lr': '1e-3', 'gamma': '0.9'}, each checked for the key=value form."""
    overrides: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected key=value")
        overrides[key.strip()] = value.strip()
    return overrides
