"""Each rule's learning check: its mean return reaches the threshold within the step budget (slow)."""

import pytest

from algorithms.registry import RULES
from cluster.train import train
from rlfleet.verify import check_overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RULES))
def test_learning_check(name, ray_session, tmp_path):
    check = RULES[name].learning_check
    overrides, _ = check_overrides(RULES[name], 0, tmp_path)
    result = train(name, check.env, stop_return=check.threshold, stop_steps=check.steps, seed=0,
                   runs_dir=tmp_path, progress=False, overrides=overrides)
    assert result.reached_return, (
        f"{name} on {check.env}: mean return {result.episode_return_mean:.1f} after {result.env_steps} steps, "
        f"needs {check.threshold} within {check.steps}"
    )
