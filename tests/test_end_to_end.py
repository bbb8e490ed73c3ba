"""The newcomer's path: train PPO on CartPole-v1 to >= 150, checkpoint, resume, serve, query, evaluate."""

import json
import socket

import httpx
import pytest

from cluster.checkpoints import list_checkpoints
from cluster.evaluate import evaluate
from cluster.train import read_history, train
from services.serving import serve_policies, shutdown_serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(ray_session, tmp_path_factory):
    # No step cap in the sense of a test limit: the cap only ends a run that fails to learn.
    result = train("ppo", "CartPole-v1", stop_return=150.0, stop_steps=100_000, seed=0,
                   runs_dir=tmp_path_factory.mktemp("runs"), progress=False)
    return result


def test_ppo_reaches_150_and_writes_a_complete_run_directory(trained_run):
    assert trained_run.reached_return, f"mean return {trained_run.episode_return_mean} after {trained_run.env_steps}"
    assert trained_run.episode_return_mean >= 150
    run_dir = trained_run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == "ppo" and config["env"] == "CartPole-v1" and config["options"]["clip_param"] == 0.2
    history = read_history(run_dir)
    assert [h["iteration"] for h in history] == list(range(1, len(history) + 1))
    assert all({"env_steps", "episode_return_mean", "steps_per_s", "losses"} <= set(h) for h in history)
    assert {"policy_loss", "vf_loss", "entropy"} <= set(history[-1]["losses"])
    assert (run_dir / "curve.png").stat().st_size > 1000
    assert list_checkpoints(run_dir)[-1] == trained_run.checkpoint


def test_resume_continues_from_the_last_checkpoint(trained_run):
    before = read_history(trained_run.run_dir)
    resumed = train(resume=trained_run.run_dir, stop_steps=before[-1]["env_steps"] + 2048, stop_return=1e9,
                    progress=False)
    after = read_history(trained_run.run_dir)
    assert len(after) == len(before) + 1
    assert after[-1]["iteration"] == before[-1]["iteration"] + 1
    assert after[-1]["env_steps"] == before[-1]["env_steps"] + 2048  # lifetime counters were restored
    # A restored policy keeps its skill (random weights on the EnvRunner would give ~22).
    assert after[-1]["episode_return_mean"] > 100
    assert resumed.checkpoint.name == f"iter_{after[-1]['iteration']:06d}"


def test_serve_query_and_reject_bad_input(trained_run):
    url = serve_policies({"cartpole": str(trained_run.run_dir)}, port=free_port())
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            assert [p["name"] for p in client.get("/v1/policies").json()["policies"]] == ["cartpole"]
            obs = [[0.0, 0.1, 0.02, -0.1], [0.1, -0.5, -0.2, 0.3]]
            act = client.post("/v1/policies/cartpole/act", json={"observations": obs, "deterministic": True})
            assert act.status_code == 200 and len(act.json()["actions"]) == 2
            assert all(a in (0, 1) for a in act.json()["actions"])
            # Pole falling right (angle > 0, angular velocity > 0): a trained policy pushes right (action 1).
            assert client.post("/v1/policies/cartpole/act",
                               json={"observations": [[0.0, 0.0, 0.15, 1.0]]}).json()["actions"] == [1]
            values = client.post("/v1/policies/cartpole/value", json={"observations": obs}).json()["values"]
            assert len(values) == 2 and values[0] > 5  # a trained critic expects many more steps upright

            bad = [
                (b"not json", 400), (b'{"observations": [[1, 2, 3]]}', 422), (b'{"observations": [[NaN, 0, 0, 0]]}', 422),
                (b'{"obs": [[0, 0, 0, 0]]}', 422), (b'[1, 2]', 422), (b'{"observations": [["a", 0, 0, 0]]}', 422),
            ]
            for body, status in bad:
                response = client.post("/v1/policies/cartpole/act", content=body,
                                       headers={"content-type": "application/json"})
                assert 400 <= response.status_code < 500, (body, response.status_code)
                assert response.json()["error"], body
            assert client.post("/v1/policies/nope/act", json={"observations": obs}).status_code == 404
            again = client.post("/v1/policies/cartpole/act", json={"observations": obs, "deterministic": True})
            assert again.json() == act.json()  # still serving, and deterministic
    finally:
        shutdown_serving()


def test_eval_reports_mean_and_std_of_the_greedy_policy(trained_run):
    result = evaluate(trained_run.run_dir, episodes=3, seed=0)
    assert result["episodes"] == 3 and len(result["returns"]) == 3
    assert result["mean"] > 100 and result["std"] >= 0
