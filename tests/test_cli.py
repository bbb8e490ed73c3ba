"""Every user mistake of `rlfleet` ends in one line on stderr and exit code 2, with no traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet.cli import main

RLFLEET = [sys.executable, "-m", "rlfleet.cli"]


def run_main(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse mistakes exit from inside parse_args
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--algo", "ppx", "--env", "CartPole-v1", "--stop-steps", "10"], "unknown rule 'ppx' (did you mean ppo?); valid rules: "),
        (["train", "--algo", "ppo", "--env", "CartPol-v1", "--stop-steps", "10"], "unknown env 'CartPol-v1'"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "lrr=1"], "unknown option 'lrr' for rule ppo (did you mean lr?); valid:"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "lr=-1"], "lr=-1.0 is impossible: lr must be > 0"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "lr=fast"], "--set lr=fast: expected a number"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "lr"], "expected key=value"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "gamma=1.5"], "gamma must be in (0, 1]"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10", "--set", "minibatch_size=5000"], "`minibatch_size` (5000) must be <="),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "-5"], "--stop-steps must be a positive number"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1"], "give --stop-return, --stop-steps or both"),
        (["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "ten"], "argument --stop-steps: invalid int value: 'ten'"),
        (["train", "--resume", "/nonexistent/run"], "is not a run directory"),
        (["eval", "/nonexistent/checkpoint"], "checkpoint not found: /nonexistent/checkpoint does not exist"),
        (["serve", "/nonexistent/checkpoint"], "checkpoint not found"),
        (["serve", "/tmp", "--port", "70000"], "--port must be in 1..65535"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, argv, expected):
    code, err = run_main(capsys, argv)
    assert code == 2, err
    assert expected in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_eval_rejects_impossible_episode_count(capsys, ppo_cartpole_checkpoint):
    code, err = run_main(capsys, ["eval", str(ppo_cartpole_checkpoint), "--episodes", "0"])
    assert code == 2 and "episodes" in err and len(err.splitlines()) == 1


def test_algos_json_lists_the_three_rules_with_paper_ids(capsys):
    assert main(["algos", "--json"]) == 0
    rules = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"ppo", "trpo", "gae"} <= set(rules)
    assert [p["id"] for p in rules["ppo"]["papers"]] == ["P147", "P158"]
    assert rules["trpo"]["papers"][0] == {"id": "P145", "title": "Trust Region Policy Optimization"}
    assert [p["id"] for p in rules["gae"]["papers"]] == ["P158"]
    for rule in rules.values():
        assert rule["learning_check"]["env"] and rule["learning_check"]["steps"] > 0


def test_algos_papers_accounts_for_every_paper(capsys):
    assert main(["algos", "--papers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    papers_md = Path(__file__).resolve().parents[2] / "shared" / "papers.md"
    if papers_md.exists():  # the team catalogue, when it sits beside the checkout, must match our copy
        ids = [line.split("|")[1].strip() for line in papers_md.read_text().splitlines()
               if line.startswith("| P") and line.split("|")[1].strip()[1:].isdigit()]
        assert [r["id"] for r in rows] == ids
    by_id = {r["id"]: r for r in rows}
    assert by_id["P147"]["status"] == "implemented" and "ppo" in by_id["P147"]["rules"]
    assert "trpo" in by_id["P145"]["rules"]
    assert {"gae", "ppo", "trpo"} <= set(by_id["P158"]["rules"])  # every GAE-based rule cites P158
    assert by_id["P003"]["status"] == "no rule" and "outside RL" in by_id["P003"]["detail"]
    assert {r["status"] for r in rows} <= {"implemented", "no rule", "not yet"}


def test_console_script_error_has_no_traceback():
    proc = subprocess.run(RLFLEET + ["train", "--algo", "nope", "--env", "CartPole-v1", "--stop-steps", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlfleet: error: unknown rule 'nope'; valid rules: ")
    assert "ppo, " in lines[0] and "trpo" in lines[0]


def test_ctrl_c_saves_a_final_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        RLFLEET + ["train", "--algo", "ppo", "--env", "CartPole-v1", "--stop-steps", "10000000", "--runs-dir",
                   str(tmp_path), "--set", "train_batch_size=256", "--set", "minibatch_size=64", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        metrics = None
        while proc.poll() is None:  # wait for the first finished iteration, however slow the machine is
            found = list(tmp_path.glob("*/metrics.jsonl"))
            if found and found[0].read_text().strip():
                metrics = found[0]
                break
            time.sleep(0.5)
        assert metrics is not None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted" in out
    assert "Traceback" not in err
    run_dir = metrics.parent
    assert list((run_dir / "checkpoints").glob("iter_*/learner_group"))
    assert (run_dir / "curve.png").is_file()
