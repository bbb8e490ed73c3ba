"""The registry: rule name -> its paper(s), family, config class, user options and learning check.

Adding a rule = one module under algorithms/<family>/ with the paper's equation in its docstring and a
module-level `RULE = Rule(...)` (see algorithms/rule.py). The registry imports every module of the family
packages below and collects those declarations; the CLI, training loop, verification and serving read it.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

from algorithms.options import get_option, parse_value, set_option
from algorithms.rule import LearningCheck, PaperWithoutRule, Rule
from rlfleet.errors import UserError

__all__ = ["RULES", "PAPERS_WITHOUT_RULE", "LearningCheck", "Rule", "get_rule", "build_config", "rule_defaults"]

FAMILY_PACKAGES = ("algorithms.onpolicy", "algorithms.offpolicy", "algorithms.preference")


def _discover() -> tuple[dict[str, Rule], dict[str, PaperWithoutRule]]:
    rules: dict[str, Rule] = {}
    without: dict[str, PaperWithoutRule] = {}
    for package_name in FAMILY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{package_name}.{info.name}")
            rule = getattr(module, "RULE", None)
            if isinstance(rule, Rule):
                if rule.name in rules:
                    raise RuntimeError(f"rule name {rule.name!r} declared twice ({module.__name__})")
                rules[rule.name] = rule
            for entry in getattr(module, "PAPERS_WITHOUT_RULE", ()):
                without[entry.paper_id] = entry
    return dict(sorted(rules.items())), without


RULES, PAPERS_WITHOUT_RULE = _discover()


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        close = difflib.get_close_matches(name, RULES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown rule {name!r}{hint}; valid rules: {', '.join(sorted(RULES))}") from None


def rule_defaults(rule: Rule) -> dict[str, Any]:
    """Every option of the rule with its default value."""
    config = rule.config_class()
    return {name: get_option(config, name) for name in rule.option_names()}


def build_config(rule: Rule, env_id: str, seed: int, overrides: dict[str, str] | None = None,
                 typed_overrides: dict[str, Any] | None = None):
    """The rule's AlgorithmConfig for `env_id`, with user overrides applied and validated.

    `overrides` are strings from the command line (parsed against each option's default type);
    `typed_overrides` are already typed (from a run's config.json). Returns (config, resolved options).
    """
    config = rule.config_class()
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
