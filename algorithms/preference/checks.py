"""The learning check of the pairwise rules: win rate of the trained policy against its SFT reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from algorithms.rule import LearningCheck, Rule

CHECK_TASK = "reverse-digits"
CHECK_PAIRS = 1536  # labelled pairs learned from (24 steps of 64)
CHECK_EVAL_PROMPTS = 512
WIN_RATE_THRESHOLD = 0.6


def preference_check(paper_id: str) -> LearningCheck:
    """`steps` counts labelled pairs; `threshold` is the win rate (judge's expected preference) to reach."""
    return LearningCheck(
        env=CHECK_TASK,
        steps=CHECK_PAIRS,
        threshold=WIN_RATE_THRESHOLD,
        source=(f"{paper_id}: the trained policy must beat its SFT reference under the scripted Bradley-Terry "
                f"judge (the paper's win-rate-vs-reference evaluation). 0.5 = no improvement; the standard error on "
                f"{CHECK_EVAL_PROMPTS} held-out prompts is about 0.011, so 0.6 is 9 SE above it. Measured "
                f"2026-11-21: DPO 0.736 / 0.669, IPO 0.733 / 0.679 (seeds 0 / 1)"),
    )


def verify_row(rule: Rule, per_seed: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A row in `rlfleet verify`'s format from the per-seed results ("return" is the check's score; "reached",
    "wall_s" per seed): passed when every seed reached the threshold."""
    check = rule.learning_check
    scores = [s["return"] for s in per_seed]
    return {
        "rule": rule.name, "papers": list(rule.paper_ids), "env": check.env, "budget": check.steps,
        "threshold": check.threshold, "source": check.source, "seeds": len(per_seed),
        "return_mean": float(np.mean(scores)), "return_min": min(scores),
        "passed": all(s["reached"] for s in per_seed), "wall_s": sum(s["wall_s"] for s in per_seed),
        "per_seed": per_seed, **extra,
    }


def check_row(rule: Rule, per_seed: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """`verify_row` of a win-rate check (the score is the win rate on CHECK_EVAL_PROMPTS held-out prompts)."""
    win_rate = float(np.mean([s["return"] for s in per_seed]))
    return verify_row(rule, per_seed, eval_prompts=CHECK_EVAL_PROMPTS, win_rate=win_rate, **extra)
