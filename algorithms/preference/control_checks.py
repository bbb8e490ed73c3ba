"""The learning check of the control-task preference rules: the env's TRUE return after learning from preferences.

PrefReach-v0 (7x7 grid, 16 steps, reward -Manhattan distance to the goal / 6 per step), measured over 500 seeded
episodes on 2026-11-21: the uniform random policy returns -12.36, the optimal policy (greedy on the exact Q*)
-1.82. The threshold, -3.9, is 80 % of the way from random to optimal; `rlfleet verify` evaluates the final
greedy policy on 200 held-out seeded episodes with the true reward, which the learner never saw.
"""

from __future__ import annotations

from algorithms.rule import LearningCheck
from envs.pref_reach import ENV_ID

RANDOM_RETURN = -12.36
OPTIMAL_RETURN = -1.82
REACH_THRESHOLD = -3.9  # RANDOM + 0.8 (OPTIMAL - RANDOM) = -3.93, rounded up


def reach_check(paper_id: str, env_steps: int, what: str) -> LearningCheck:
    """`steps` counts env steps collected; `threshold` is the true mean return to reach."""
    return LearningCheck(
        env=ENV_ID, steps=env_steps, threshold=REACH_THRESHOLD,
        source=(f"{paper_id}: learning only from segment preferences ({what}), the final greedy policy's TRUE "
                f"return on PrefReach-v0 must close 80 % of the gap from the uniform random policy "
                f"({RANDOM_RETURN}) to the optimal one ({OPTIMAL_RETURN}): the papers' claim that preference-learned "
                f"policies approach the true-reward optimum (see docs/preference-control.md for PPO on the true "
                f"reward with the same budget)"),
    )
