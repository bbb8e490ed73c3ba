"""Every seed paper with its status in rlfleet: implemented by which rule(s), no rule (and why), or not yet."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from algorithms.registry import PAPERS_WITHOUT_RULE, RULES

# Families whose papers carry no trainable update rule, and the reason shown for them.
NO_RULE_REASONS = {
    "theory-only": "theory: regret/complexity analysis with no update rule to implement",
    "benchmark/dataset": "benchmark or dataset paper: no update rule of its own",
    "non-RL": "outside RL: not a reinforcement-learning update",
}


@lru_cache(maxsize=1)
def load_papers() -> list[dict[str, str]]:
    """The project's copy of the paper catalogue (refreshed by tools/sync_papers.py)."""
    text = resources.files("rlfleet").joinpath("data/papers.json").read_text()
    return json.loads(text)


def paper_statuses() -> list[dict[str, Any]]:
    implemented: dict[str, list[str]] = {}
    for rule in RULES.values():
        for paper_id in rule.paper_ids:
            implemented.setdefault(paper_id, []).append(rule.name)
    rows = []
    for paper in load_papers():
        rules = sorted(implemented.get(paper["id"], []))
        if rules:
            status, detail = "implemented", ", ".join(rules)
        elif paper["id"] in PAPERS_WITHOUT_RULE:  # a rule family's own verdict, with its reason
            status, detail = "no rule", PAPERS_WITHOUT_RULE[paper["id"]].reason
        elif paper["rule"].startswith("no"):
            status = "no rule"
            detail = NO_RULE_REASONS.get(paper["family"].rstrip("?"), "the paper states no trainable update rule")
        else:
            status, detail = "not yet", f"{paper['family']} rule, priority {paper['priority']}"
        rows.append({**paper, "status": status, "rules": rules, "detail": detail})
    return rows


def paper_title(paper_id: str) -> str:
    for paper in load_papers():
        if paper["id"] == paper_id:
            return paper["title"]
    return "(not in the catalogue)"
