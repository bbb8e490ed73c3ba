"""Each rule's learning check: its mean return reaches the threshold within the step budget.

Three cheap checks run in the default suite (CI); the others are slow and run by `pytest -m slow` or
`rlfleet verify`, which also writes the measured table (docs/verification/). Preference rules' checks (win rate
under the scripted judge) are in tests/test_preference_loop.py.
"""

import pytest

from algorithms.registry import RULES
from cluster.train import train
from rlfleet.verify import check_overrides

# CartPole-v1 within 100k steps each, about a minute for the three on an idle 2-core machine.
CI_CHECKS = ("ppo", "gae", "trpo")


def _check(name: str, tmp_path) -> None:
    check = RULES[name].learning_check
    overrides, _ = check_overrides(RULES[name], 0, tmp_path)
    result = train(name, check.env, stop_return=check.threshold, stop_steps=check.steps, seed=0,
                   runs_dir=tmp_path, progress=False, overrides=overrides, score=check.score,
                   eval_episodes=check.eval_episodes, eval_interval=check.eval_interval)
    assert result.reached_return, (
        f"{name} on {check.env}: mean return {result.episode_return_mean:.1f} after {result.env_steps} steps, "
        f"needs {check.threshold} within {check.steps}"
    )


@pytest.mark.parametrize("name", CI_CHECKS)
def test_learning_check_in_ci(name, ray_session, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if n not in CI_CHECKS and r.family != "preference"))
def test_learning_check(name, ray_session, tmp_path):
    _check(name, tmp_path)
