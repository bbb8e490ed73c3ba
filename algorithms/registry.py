"""The registry: rule name -> its paper(s), family, config class, user options and learning check.

Adding a rule = one module under algorithms/<family>/ with the paper's equation in its docstring, plus one
`Rule(...)` entry below. Everything else (CLI, training loop, verification, serving) reads this table.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from algorithms.options import ONPOLICY_OPTIONS, Option, get_option, parse_value, positive, set_option
from rlfleet.errors import UserError


@dataclass(frozen=True)
class LearningCheck:
    """The smallest honest task that shows a rule learns: mean return >= threshold within `steps` env steps."""

    env: str
    steps: int
    threshold: float
    source: str  # where the threshold comes from (paper claim or well-known baseline)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    paper_ids: tuple[str, ...]
    summary: str
    config_path: str  # "module:ConfigClass", imported lazily so `rlfleet algos` stays fast
    options: tuple[Option, ...]
    learning_check: LearningCheck

    def config_class(self) -> type:
        import importlib

        module_name, class_name = self.config_path.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def option_names(self) -> list[str]:
        return [o.name for o in self.options]


PPO_OPTIONS = ONPOLICY_OPTIONS + (
    Option("num_epochs", "SGD passes over each batch", positive, ">= 1"),
    Option("minibatch_size", "SGD minibatch size", positive, ">= 1"),
    Option("clip_param", "surrogate clip range epsilon", positive, "> 0"),
    Option("vf_loss_coeff", "value-loss coefficient c1", lambda x: x >= 0, ">= 0"),
    Option("entropy_coeff", "entropy-bonus coefficient c2", lambda x: x >= 0, ">= 0"),
    Option("value_clip", "clip V around its old prediction (none = off)", lambda x: x is None or x > 0, "> 0 or none"),
    Option("use_kl_loss", "add the adaptive KL penalty (P147 section 4)"),
    Option("kl_coeff", "initial KL-penalty coefficient beta", lambda x: x >= 0, ">= 0"),
    Option("kl_target", "KL target d_targ for the adaptive penalty", positive, "> 0"),
)

TRPO_OPTIONS = ONPOLICY_OPTIONS + (
    Option("max_kl", "trust-region size delta", positive, "> 0"),
    Option("cg_iters", "conjugate-gradient iterations", positive, ">= 1"),
    Option("cg_damping", "damping added to the Fisher-vector product", lambda x: x >= 0, ">= 0"),
    Option("backtrack_coeff", "line-search shrink factor", lambda x: 0 < x < 1, "in (0, 1)"),
    Option("max_backtracks", "line-search attempts", positive, ">= 1"),
    Option("vf_epochs", "critic Adam passes per batch", positive, ">= 1"),
    Option("vf_minibatch_size", "critic minibatch size", positive, ">= 1"),
)

RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            name="ppo",
            family="on-policy",
            paper_ids=("P147", "P158"),
            summary="clipped surrogate + value loss + entropy bonus, minibatch Adam epochs; GAE advantages",
            config_path="algorithms.onpolicy.ppo:PPORuleConfig",
            options=PPO_OPTIONS,
            learning_check=LearningCheck("CartPole-v1", 100_000, 450.0, "CleanRL/SB3 PPO reach 500 on CartPole-v1 within 100k steps"),
        ),
        Rule(
            name="trpo",
            family="trust-region",
            paper_ids=("P145", "P158"),
            summary="conjugate-gradient natural step on the surrogate, KL <= delta enforced by line search",
            config_path="algorithms.onpolicy.trpo:TRPOConfig",
            options=TRPO_OPTIONS,
            learning_check=LearningCheck("CartPole-v1", 100_000, 400.0, "SB3-contrib TRPO reaches ~500 on CartPole-v1 within 100k steps"),
        ),
        Rule(
            name="gae",
            family="on-policy",
            paper_ids=("P158",),
            summary="the paper's setup: TRPO policy step on raw (unstandardised) GAE(gamma, lambda) advantages",
            config_path="algorithms.onpolicy.gae_rule:GAERuleConfig",
            options=TRPO_OPTIONS,
            learning_check=LearningCheck("CartPole-v1", 100_000, 400.0, "as TRPO: the estimator must not hurt on CartPole-v1"),
        ),
    )
}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        close = difflib.get_close_matches(name, RULES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown rule {name!r}{hint}; valid rules: {', '.join(sorted(RULES))}") from None


def rule_defaults(rule: Rule) -> dict[str, Any]:
    """Every option of the rule with its default value."""
    config = rule.config_class()()
    return {name: get_option(config, name) for name in rule.option_names()}


def build_config(rule: Rule, env_id: str, seed: int, overrides: dict[str, str] | None = None,
                 typed_overrides: dict[str, Any] | None = None):
    """The rule's AlgorithmConfig for `env_id`, with user overrides applied and validated.

    `overrides` are strings from the command line (parsed against each option's default type);
    `typed_overrides` are already typed (from a run's config.json). Returns (config, resolved options).
    """
    config = rule.config_class()()
    config.environment(env_id).debugging(seed=seed)
    options = {o.name: o for o in rule.options}
    requested: dict[str, Any] = dict(typed_overrides or {})
    for name, text in (overrides or {}).items():
        if name not in options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown option {name!r} for rule {rule.name}{hint}; valid: {', '.join(sorted(options))}")
        requested[name] = parse_value(name, text, get_option(config, name))
    for name, value in requested.items():
        if name not in options:
            raise UserError(f"unknown option {name!r} for rule {rule.name}; valid: {', '.join(sorted(options))}")
        option = options[name]
        if option.check is not None:
            try:
                ok = option.check(value)
            except TypeError:
                ok = False
            if not ok:
                raise UserError(f"{name}={value!r} is impossible: {name} must be {option.requirement}")
        set_option(config, name, value)
    try:
        config.validate()
    except (ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"invalid options for {rule.name}: {message}") from None
    resolved = {name: get_option(config, name) for name in rule.option_names()}
    return config, resolved
