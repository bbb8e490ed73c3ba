"""`rlfleet verify`: run rules' learning checks and write the verification table of what was measured."""

from __future__ import annotations

import datetime
import importlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from algorithms.registry import RULES, Rule
from rlfleet.errors import UserError

# A family name given to --family selects these registry families.
FAMILY_GROUPS = {
    "on-policy": ("on-policy", "trust-region", "optimizer"),
    "trust-region": ("trust-region",),
    "off-policy": ("off-policy", "value-based"),
}


def rules_for_family(family: str | None) -> list[Rule]:
    if family is None:
        return list(RULES.values())
    families = FAMILY_GROUPS.get(family, (family,))
    selected = [r for r in RULES.values() if r.family in families]
    if not selected:
        known = sorted(set(FAMILY_GROUPS) | {r.family for r in RULES.values()})
        raise UserError(f"no rules in family {family!r}; valid families: {', '.join(known)}")
    return selected


def check_overrides(rule: Rule, seed: int, runs_dir: Path, progress: bool = False) -> tuple[dict[str, str], Any]:
    """The options a learning check runs with; when the check starts from a prior run, that run is trained first
    (same seed, its own budget) and its run directory becomes the rule's option. Returns (options, prior result)."""
    from cluster.train import train

    check = rule.learning_check
    overrides = {k: str(v) for k, v in check.overrides.items()}
    if check.prior is None:
        return overrides, None
    prior = train(check.prior.rule, check.prior.env, stop_steps=check.prior.steps, seed=seed,
                  runs_dir=Path(runs_dir) / "priors", progress=progress)
    overrides[check.prior.option] = str(prior.run_dir)
    return overrides, prior


def run_check(rule: Rule, seeds: int, runs_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Train `rule` on its learning check once per seed; it passes when every seed reaches the threshold."""
    if not rule.trains_on_env_steps:  # its own loop (e.g. labelled pairs through the preference queue)
        module_name, _, function_name = rule.check_runner.partition(":")
        return getattr(importlib.import_module(module_name), function_name)(rule, seeds)
    from cluster.train import train

    check = rule.learning_check
    per_seed = []
    for seed in range(seeds):
        prior_start = time.perf_counter()
        overrides, prior = check_overrides(rule, seed, runs_dir, progress)
        start = time.perf_counter()
        result = train(rule.name, check.env, stop_return=check.threshold, stop_steps=check.steps, seed=seed,
                       runs_dir=runs_dir, progress=progress, overrides=overrides, score=check.score,
                       eval_episodes=check.eval_episodes, eval_interval=check.eval_interval)
        row = {"seed": seed, "reached": result.reached_return, "return": result.episode_return_mean,
               "env_steps": result.env_steps, "wall_s": time.perf_counter() - start, "run_dir": str(result.run_dir)}
        if check.score != "train_window" and result.history:  # the training window's mean too, for comparison
            row["train_window_return"] = result.history[-1].get("return_mean_100")
        if prior is not None:
            row |= {"prior_run_dir": str(prior.run_dir), "prior_env_steps": prior.env_steps,
                    "prior_wall_s": start - prior_start}
        per_seed.append(row)
    returns = [s["return"] for s in per_seed]
    return {
        "rule": rule.name, "papers": list(rule.paper_ids), "env": check.env, "budget": check.steps,
        "threshold": check.threshold, "source": check.source, "seeds": seeds, "score": score_label(check),
        "return_mean": statistics.fmean(returns), "return_min": min(returns),
        "passed": all(s["reached"] for s in per_seed), "wall_s": sum(s["wall_s"] for s in per_seed),
        "per_seed": per_seed,
    }


def score_label(check) -> str:
    """How a check's return is measured, as the table names it."""
    if check.score == "greedy_eval":
        return f"greedy_eval ({check.eval_episodes} episodes every {check.eval_interval} iterations)"
    return check.score


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"# Verification: {title}",
        "",
        "Measured by `rlfleet verify`: each rule trained on its learning check once per seed, stopping at the",
        "threshold or the step budget. Pass = every seed reached the threshold within the budget.",
        "The return is the mean of the last 100 training episodes (with the rule's exploration) unless the rule's",
        "line below says `score: greedy_eval`: then it is the mean of that many greedy (explore=False) evaluation",
        "episodes on an RLlib evaluation EnvRunner, run every few iterations, as the DQN paper and",
        "RL-Baselines3-Zoo score value-based agents; the check stops at the first evaluation at the threshold.",
        "Rules with their own loop (preference rules) say what their score is in their line below (e.g. the win rate",
        "against the SFT reference under the scripted judge, a reward model's held-out accuracy, or a control task's",
        "true return after learning only from preferences); their budget counts labelled pairs or env steps.",
        "",
        "| rule | paper | env | budget (steps) | seeds | return reached (mean / min) | threshold | pass | wall time "
        "| measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {', '.join(r['papers'])} | {r['env']} | {r['budget']:,} | {r['seeds']} | "
            f"{_score_text(r['return_mean'])} / {_score_text(r['return_min'])} | {r['threshold']:g} | "
            f"{'pass' if r['passed'] else 'FAIL'} | {r['wall_s']:.0f} s | {r.get('date', '?')} {r.get('commit', '')} |"
        )
    lines += ["", "Thresholds and where they come from:", ""]
    lines += [f"- {r['rule']}: {_score_note(r)}{r['source']}" for r in rows]
    return "\n".join(lines) + "\n"


def _score_text(value: float) -> str:
    """Returns to one decimal; small scores (win rates, accuracies, returns of a few units) to three."""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _score_note(row: dict[str, Any]) -> str:
    score = row.get("score", "train_window")
    return "" if score == "train_window" else f"(score: {score}) "


def _measured_at() -> dict[str, str]:
    """When and on which commit a row was measured, so a resumed table says which rows are older."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.date().isoformat(), "measured_at": now.isoformat(timespec="seconds"), "commit": commit}


def newer_row(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The later measurement of two rows of one rule (by `measured_at`; a row without it is older than one with
    it, and between two such rows `b` wins), so a rule re-measured after a fix replaces its old row."""
    if a is None or b is None:
        return b if a is None else a
    return a if a.get("measured_at", "") > b.get("measured_at", "") else b


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run (its JSON sidecar), by rule name; a missing or unreadable file gives none."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(rows, list):
        return {}
    return {r["rule"]: r for r in rows if isinstance(r, dict) and "rule" in r}


def verify(family: str | None, seeds: int = 1, out_dir: str | Path = "docs/verification",
           runs_dir: str | Path | None = None, progress: bool = False,
           only: str | None = None, resume: bool = False) -> tuple[list[dict[str, Any]], Path]:
    """Run the learning checks of a family (or of every rule, or of the one rule `only`) and write the table.

    The table goes to <out_dir>/<family>.md (<out_dir>/<rule>.md for a single rule, so a one-rule run never
    overwrites the family's table), its rows to <name>.json beside it, both rewritten after every rule so a long
    run that is stopped keeps what it measured. With `resume`, rules that already have a row measured with the
    same seeds, env, budget, threshold and score, in this table's JSON or in the rule's own (`--algo`) JSON (the
    later of the two), are not run again (their row keeps its date and commit)."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if only is not None:
        from algorithms.registry import get_rule

        rules = [get_rule(only)]
    else:
        rules = rules_for_family(family)
    runs = Path(runs_dir) if runs_dir else Path(tempfile.mkdtemp(prefix="rlfleet-verify-"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = only or family or "all"
    path, rows_path = out / f"{name}.md", out / f"{name}.json"
    earlier: dict[str, dict[str, Any]] = {}
    if resume:  # rows of earlier runs of this table and of single-rule runs (<rule>.json): the later one wins
        earlier = load_rows(rows_path)
        for rule in rules:
            single = load_rows(out / f"{rule.name}.json").get(rule.name)
            if single is not None:
                earlier[rule.name] = newer_row(earlier.get(rule.name), single)
    rows: list[dict[str, Any]] = []
    for rule in rules:
        row = earlier.get(rule.name)
        check = rule.learning_check
        same_check = row is not None and (row.get("seeds"), row.get("env"), row.get("budget"), row.get("threshold"),
                                          row.get("score", "train_window")) \
            == (seeds, check.env, check.steps, check.threshold, score_label(check))
        if not same_check:
            row = {**run_check(rule, seeds, runs, progress), **_measured_at()}
        rows.append(row)
        rows_path.write_text(json.dumps(rows, indent=1) + "\n")
        path.write_text(format_table(rows, only or family or "all rules"))
    return rows, path
