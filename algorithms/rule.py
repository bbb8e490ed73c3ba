"""What a rule declares about itself. Each rule module ends with `RULE = Rule(...)`; the registry finds it.

A module may also list `PAPERS_WITHOUT_RULE = [PaperWithoutRule("P123", "why"), ...]` for papers of its family
that have no update rule to implement (theory, survey, analysis), so `rlfleet algos --papers` accounts for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from algorithms.options import Option


@dataclass(frozen=True)
class PriorRun:
    """An earlier run a rule's learning check starts from (e.g. P272's prior value estimate).

    `rlfleet verify` trains `rule` on `env` for `steps` env steps first and passes its run directory to the
    checked rule as the option `option`; those steps are not counted in the check's budget.
    """

    rule: str
    env: str
    steps: int
    option: str = "prior_checkpoint"


@dataclass(frozen=True)
class LearningCheck:
    """The smallest honest task that shows a rule learns: mean return >= threshold within `steps` env steps."""

    env: str
    steps: int
    threshold: float
    source: str  # where the threshold comes from (paper claim or well-known baseline)
    overrides: dict[str, Any] = field(default_factory=dict)
    prior: PriorRun | None = None  # a run to train first, whose run directory the check's rule is given
    # What "mean return" means (cluster/train.py, SCORES): "train_window" = the mean return of the last 100
    # training episodes (with the rule's exploration); "greedy_eval" = the mean return of `eval_episodes` greedy
    # (explore=False) episodes on an RLlib evaluation EnvRunner, every `eval_interval` iterations, as the DQN paper
    # and RL-Baselines3-Zoo score value-based agents (their epsilon-greedy training episodes understate the policy).
    score: str = "train_window"
    eval_episodes: int = 10
    eval_interval: int = 2


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    paper_ids: tuple[str, ...]
    summary: str
    config_class: type  # an AlgorithmConfig subclass whose __init__ holds the rule's defaults
    options: tuple[Option, ...]  # what `--set` may change
    learning_check: LearningCheck
    # Options that make the smoke test (tests/test_rules_ray.py) one cheap iteration on the check's env.
    smoke_overrides: dict[str, Any] = field(default_factory=dict)
    # Rules that do not train through `rlfleet train` on env steps (preference rules learning from a queue of
    # labelled pairs, reward models, ...) name their learning-check runner, "package.module:function" taking
    # (rule, seeds) and returning a verify row (see algorithms/preference/loop.py: run_learning_check).
    check_runner: str | None = None

    @property
    def trains_on_env_steps(self) -> bool:
        """True for rules `rlfleet train` runs (an RLlib Algorithm on an env); False for own-loop rules."""
        return self.check_runner is None

    def option_names(self) -> list[str]:
        return [o.name for o in self.options]


@dataclass(frozen=True)
class PaperWithoutRule:
    paper_id: str
    reason: str
