"""`rlfleet verify` reports what it measured (pass and fail); `rlfleet compare` aligns curves over seeds."""

import dataclasses
import json

import numpy as np

from algorithms import registry
from algorithms.registry import LearningCheck
from rlfleet.compare import compare, curve_on_grid
from rlfleet.verify import format_table, verify

TINY = {"train_batch_size": 256, "minibatch_size": 128, "num_epochs": 1}


def test_curve_on_grid_is_stepwise_by_hand():
    history = [{"env_steps": 100, "episode_return_mean": None}, {"env_steps": 200, "episode_return_mean": 10.0},
               {"env_steps": 400, "episode_return_mean": 30.0}]
    out = curve_on_grid(history, np.array([0, 150, 200, 399, 400, 1000]))
    np.testing.assert_array_equal(out, [np.nan, np.nan, 10.0, 10.0, 30.0, 30.0])


def test_verify_reports_pass_and_fail(ray_session, tmp_path, monkeypatch):
    easy = dataclasses.replace(registry.RULES["ppo"], name="ppo-easy", family="test-family",
                               learning_check=LearningCheck("CartPole-v1", 512, 1.0, "any return", TINY))
    hard = dataclasses.replace(registry.RULES["ppo"], name="ppo-hard", family="test-family",
                               learning_check=LearningCheck("CartPole-v1", 256, 1e9, "impossible", TINY))
    monkeypatch.setitem(registry.RULES, "ppo-easy", easy)
    monkeypatch.setitem(registry.RULES, "ppo-hard", hard)
    rows, path = verify("test-family", seeds=1, out_dir=tmp_path / "docs", runs_dir=tmp_path / "runs")
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["ppo-easy"]["passed"] and not by_rule["ppo-hard"]["passed"]
    assert by_rule["ppo-hard"]["per_seed"][0]["env_steps"] >= 256
    table = path.read_text()
    assert "| ppo-easy | P147, P158 | CartPole-v1 | 512 | 1 |" in table and "| pass |" in table and "| FAIL |" in table
    assert table == format_table(rows, "test-family")

    # --resume keeps the measured rows (same seeds) and runs only what is missing: drop one row, resume.
    sidecar = tmp_path / "docs" / "test-family.json"
    kept = [r for r in json.loads(sidecar.read_text()) if r["rule"] == "ppo-easy"]
    sidecar.write_text(json.dumps(kept))
    again, _ = verify("test-family", seeds=1, out_dir=tmp_path / "docs", runs_dir=tmp_path / "runs2", resume=True)
    assert [r["rule"] for r in again] == ["ppo-easy", "ppo-hard"]
    assert again[0] == kept[0]  # not re-run: same wall time, date and commit
    assert again[1]["per_seed"][0]["run_dir"].startswith(str(tmp_path / "runs2"))

    # A row measured by a single-rule run (`verify --algo`, <rule>.json) is taken too.
    (tmp_path / "docs" / "ppo-hard.json").write_text(json.dumps([again[1]]))
    sidecar.write_text(json.dumps([again[0]]))
    third, _ = verify("test-family", seeds=1, out_dir=tmp_path / "docs", runs_dir=tmp_path / "runs3", resume=True)
    assert third == again


def test_compare_two_rules_two_seeds(ray_session, tmp_path):
    summary = compare(["ppo", "trpo"], "CartPole-v1", steps=512, seeds=2, out_dir=tmp_path,
                      overrides={"train_batch_size": "256"})
    assert set(summary["rules"]) == {"ppo", "trpo"}
    for result in summary["rules"].values():
        assert len(result["finals"]) == 2 and len(result["curve_mean"]) == len(summary["grid"])
    out = tmp_path / next(p.name for p in tmp_path.iterdir())
    assert (out / "compare.png").stat().st_size > 1000
    assert "| ppo |" in (out / "compare.md").read_text()
