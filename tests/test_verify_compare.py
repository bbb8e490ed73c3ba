"""`rlfleet verify` reports what it measured (pass and fail); `rlfleet compare` aligns curves over seeds."""

import dataclasses
import json
from pathlib import Path

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


def test_greedy_eval_configures_an_evaluation_env_runner_without_exploration():
    from algorithms.offpolicy.dqn import DQNRuleConfig
    from cluster.train import configure_greedy_eval, greedy_eval_return

    config = DQNRuleConfig()
    configure_greedy_eval(config, episodes=7, interval=3)
    evaluation = config.get_evaluation_config_object()
    assert evaluation.explore is False and config.explore is True  # training keeps its epsilon-greedy acting
    assert (config.evaluation_interval, config.evaluation_duration) == (3, 7)
    assert config.evaluation_duration_unit == "episodes"
    assert evaluation.metrics_num_episodes_for_smoothing == 7  # one evaluation's episodes, never older ones
    assert greedy_eval_return({"evaluation": {"env_runners": {"episode_return_mean": 12.5}}}) == 12.5
    assert greedy_eval_return({"env_runners": {"episode_return_mean": 12.5}}) is None  # no evaluation yet
    assert greedy_eval_return({"evaluation": {"env_runners": {"episode_return_mean": float("nan")}}}) is None


def test_verify_greedy_eval_scores_evaluation_episodes(ray_session, tmp_path, monkeypatch):
    from cluster.train import read_history

    smoke = {"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 1.0}
    check = LearningCheck("CartPole-v1", 2000, 1e9, "impossible", smoke, score="greedy_eval", eval_episodes=2,
                          eval_interval=1)
    greedy = dataclasses.replace(registry.RULES["dqn"], name="dqn-greedy", family="test-greedy",
                                 learning_check=check)
    monkeypatch.setitem(registry.RULES, "dqn-greedy", greedy)
    rows, path = verify("test-greedy", seeds=1, out_dir=tmp_path / "docs", runs_dir=tmp_path / "runs")
    row = rows[0]
    assert row["score"] == "greedy_eval (2 episodes every 1 iterations)" and not row["passed"]
    history = read_history(Path(row["per_seed"][0]["run_dir"]))
    scores = [h["greedy_return_mean"] for h in history]
    # Every iteration evaluated two whole CartPole episodes (each lasts 8 to 500 steps); the score is the last one,
    # not the training window's.
    assert len(scores) >= 2 and all(s is not None and 8 <= s <= 500 for s in scores)
    assert row["return_mean"] == scores[-1]
    assert row["per_seed"][0]["train_window_return"] == history[-1]["return_mean_100"]
    assert "(score: greedy_eval (2 episodes every 1 iterations))" in path.read_text()


def test_resume_keeps_the_later_of_a_family_row_and_a_single_rule_row() -> None:
    from rlfleet.verify import newer_row

    old = {"rule": "r", "return_mean": 1.0}  # measured before rows carried a time
    family = {"rule": "r", "return_mean": 2.0, "measured_at": "2026-11-21T10:00:00+00:00"}
    single = {"rule": "r", "return_mean": 3.0, "measured_at": "2026-11-21T12:00:00+00:00"}
    assert newer_row(family, single) is single and newer_row(single, family) is single
    assert newer_row(old, family) is family and newer_row(family, old) is family
    assert newer_row(old, dict(old)) is not old  # neither timed: the single-rule row (second) wins
    assert newer_row(None, family) is family and newer_row(family, None) is family
