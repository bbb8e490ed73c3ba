"""Text policies with guided decoding over HTTP, and the human-feedback endpoint mounted next to the policies
(`rlfleet serve --feedback`): request validation on the ASGI app, then a real Serve server with an API key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from algorithms.common.sequence import build_causal_lm
from algorithms.preference import vas
from algorithms.preference.base import TINY_LM
from algorithms.preference.guided_loop import GuidedRun, save_guided_run
from conftest_replay import replay_server  # noqa: F401
from rlfleet.errors import UserError
from services.preferences import PreferenceQueue
from services.serving import API_KEY_ENV, FEEDBACK_PREFIX, deploy_policies, feedback_app, shutdown_serving
from services.text_serving import TEXT_PREFIX, create_text_app, load_text_policies, text_policies_app

with warnings.catch_warnings():  # starlette 1.x prefers httpx2; the pinned httpx 0.28 works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

KEY = "text-k3y-for-tests"
GEN = "/policies/rev/generate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GenARM-style and a VAS-style run directory (untrained tiny models: serving does not care)."""
    torch.manual_seed(0)
    base = build_causal_lm(TINY_LM)
    root = tmp_path_factory.mktemp("text-runs")
    genarm = GuidedRun("genarm", dict(TINY_LM), dict(TINY_LM), "reverse-digits", base, build_causal_lm(TINY_LM), 1.0)
    value = vas.build_value_model(TINY_LM, base)
    with torch.no_grad():
        value.get_output_embeddings().weight.normal_()  # a value that changes the decoding
    vas_run = GuidedRun("vas", dict(TINY_LM), {**TINY_LM, "tie_word_embeddings": False}, "reverse-digits", base,
                        value, 3.0, 2)
    return {"rev": save_guided_run(genarm, root / "genarm"), "val": save_guided_run(vas_run, root / "vas")}


@pytest.fixture(scope="module")
def http(run_dirs: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_text_app(load_text_policies(run_dirs))) as client:
        yield client


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_generate_unguided_and_guided(http: TestClient) -> None:
    listed = {p["name"]: p for p in http.get("/policies").json()["policies"]}
    assert listed["rev"]["guide"] == {"kind": "genarm", "strength": 1.0, "top_k": None}
    assert listed["val"]["guide"] == {"kind": "vas", "strength": 3.0, "top_k": 2}
    plain = http.post(GEN, json={"prompt": "307>", "seed": 3})
    assert plain.status_code == 200 and plain.json()["guide"] is None
    assert set(plain.json()["response"]) <= set("0123456789>_^")
    again = http.post(GEN, json={"prompt": "307>", "seed": 3})
    assert again.json() == plain.json()  # seeded: reproducible
    guided = http.post(GEN, json={"prompt": "307>", "guide": {"kind": "genarm", "strength": 2.5}})
    assert guided.status_code == 200 and guided.json()["guide"] == {"kind": "genarm", "strength": 2.5}
    default = http.post("/policies/val/generate", json={"prompt": "12>", "guide": {"kind": "vas"}, "temperature": 0})
    assert default.status_code == 200 and default.json()["guide"] == {"kind": "vas", "strength": 3.0}


def test_guide_strength_zero_is_the_base(http: TestClient) -> None:
    for seed in range(4):
        body = {"prompt": "918>", "seed": seed}
        plain = http.post(GEN, json=body).json()["response"]
        zero = http.post(GEN, json=body | {"guide": {"kind": "genarm", "strength": 0}}).json()["response"]
        assert plain == zero


BAD_BODIES = [
    ({}, 'prompt'),
    ({"prompt": ""}, "1-"),
    ({"prompt": "12a>"}, "only hold digits"),
    ({"prompt": "1" * 40}, "1-"),
    ({"prompt": 307}, '"prompt" must be a string'),
    ({"prompt": "307>", "extra": 1}, "unknown field"),
    ({"prompt": "307>", "guide": "genarm"}, '"guide" must be null or an object'),
    ({"prompt": "307>", "guide": {"kind": "vas"}}, '"guide.kind" must be "genarm"'),
    ({"prompt": "307>", "guide": {"strength": 1}}, '"guide.kind" must be "genarm"'),
    ({"prompt": "307>", "guide": {"kind": "genarm", "strength": -1}}, "guide.strength"),
    ({"prompt": "307>", "guide": {"kind": "genarm", "strength": True}}, "guide.strength"),
    ({"prompt": "307>", "guide": {"kind": "genarm", "strength": 1e9}}, "guide.strength"),
    ({"prompt": "307>", "guide": {"kind": "genarm", "beta": 1}}, "unknown field"),
    ({"prompt": "307>", "temperature": -0.5}, "temperature"),
    ({"prompt": "307>", "temperature": "hot"}, "temperature"),
    ({"prompt": "307>", "seed": -1}, "seed"),
    ({"prompt": "307>", "seed": 1.5}, "seed"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_bodies_are_422(http: TestClient, body: dict, message: str) -> None:
    assert message in error(http.post(GEN, json=body), 422)


def test_bad_requests_are_json_4xx(http: TestClient) -> None:
    assert "not valid JSON" in error(http.post(GEN, content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert "JSON object" in error(http.post(GEN, json=[1, 2]), 400)
    assert "unknown text policy" in error(http.post("/policies/nope/generate", json={"prompt": "1>"}), 404)
    assert "not allowed" in error(http.get(GEN), 405)
    assert "no such route" in error(http.get("/elsewhere"), 404)
    assert "larger than" in error(http.post(GEN, content=b" " * (33 * 1024 * 1024)), 413)


def test_bad_run_directories_are_user_errors(tmp_path: Path, run_dirs: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="guided.json is missing"):
        load_text_policies({"rev": tmp_path})
    with pytest.raises(UserError, match="invalid text policy name"):
        load_text_policies({"bad/name": run_dirs["rev"]})
    with pytest.raises(UserError, match="no text policies"):
        load_text_policies({})
    with pytest.raises(UserError, match="feedback lease"):
        feedback_app("ns", lease_s=0)


# ---- a real server: policies, feedback and text side by side, one API key --------------------------------


@pytest.fixture(scope="module")
def server(ray_session: None, ppo_cartpole_checkpoint: Path, run_dirs: dict[str, Path],
           replay_server) -> Iterator[tuple[str, PreferenceQueue]]:  # noqa: F811
    before = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = KEY
    queue = PreferenceQueue(replay_server.client(), namespace=f"serve-feedback-{os.getpid()}", max_len=100)
    try:
        extra = {FEEDBACK_PREFIX: feedback_app(queue.namespace, lease_s=30, redis_url=replay_server.url),
                 TEXT_PREFIX: text_policies_app(run_dirs)}
        url = deploy_policies({"cartpole": ppo_cartpole_checkpoint}, port=_free_port(), extra_apps=extra).url
        yield url, queue
    finally:
        if before is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = before
        shutdown_serving()
        queue.drop()


def test_feedback_and_text_next_to_the_policies(server: tuple[str, PreferenceQueue]) -> None:
    url, queue = server
    queue.add([{"id": "hf-1", "prompt": "307>", "responses": ["703", "7"], "policy_version": 0}])
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get(f"{FEEDBACK_PREFIX}/next").status_code == 401  # the policies' key guards it too
        assert client.post(f"{TEXT_PREFIX}{GEN}", json={"prompt": "1>"}).status_code == 401
        got = client.get(f"{FEEDBACK_PREFIX}/next", params={"judge": "alice"}, headers=auth)
        assert got.status_code == 200, got.text
        assert got.json()["id"] == "hf-1" and got.json()["responses"] == ["703", "7"]
        posted = client.post(f"{FEEDBACK_PREFIX}/hf-1", json={"preferred": 0, "judge": "alice"},
                             headers={"X-API-Key": KEY})
        assert posted.status_code == 200 and posted.json()["judge_id"] == "human:alice", posted.text
        assert client.post(f"{FEEDBACK_PREFIX}/hf-1", json={"preferred": 1}, headers=auth).status_code == 409
        assert client.get(f"{FEEDBACK_PREFIX}/next", headers=auth).status_code == 204
        text = client.post(f"{TEXT_PREFIX}{GEN}", json={"prompt": "307>", "guide": {"kind": "genarm"}}, headers=auth)
        assert text.status_code == 200 and text.json()["guide"] == {"kind": "genarm", "strength": 1.0}, text.text
        assert client.post(f"{TEXT_PREFIX}{GEN}", json={"prompt": "x"}, headers=auth).status_code == 422
        assert client.post("/v1/policies/cartpole/act", json={"observations": [[0.0, 0.1, 0.0, 0.2]]},
                           headers=auth).status_code == 200
    labelled = queue.learner("check").next_batch(10)
    assert [(p.pair.pair_id, p.label.preferred, p.label.judge_id) for p in labelled] == [("hf-1", 0, "human:alice")]


@pytest.mark.slow
def test_rlfleet_serve_mounts_feedback(ppo_cartpole_checkpoint: Path, replay_server, tmp_path: Path) -> None:  # noqa: F811
    """The command itself: `rlfleet serve RUN --feedback NS` in its own process (its own Ray), then HTTP."""
    port = _free_port()
    ns = f"cli-feedback-{os.getpid()}"
    queue = PreferenceQueue(replay_server.client(), namespace=ns)
    queue.add([{"id": "cli-1", "prompt": "12>", "responses": ["21", "2"], "policy_version": 0}])
    env = os.environ | {"REDIS_URL": replay_server.url, API_KEY_ENV: KEY, "RAY_ADDRESS": ""}
    rlfleet = str(Path(sys.executable).with_name("rlfleet"))  # the venv's console script
    proc = subprocess.Popen([rlfleet, "serve", str(ppo_cartpole_checkpoint), "--port", str(port), "--feedback", ns],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait for the server to say it is up (the process stays in the foreground)
            lines.append(line)
            if "Ctrl-C to stop" in line or proc.poll() is not None:
                break
        assert any("Ctrl-C to stop" in line for line in lines), "".join(lines[-20:])
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get(f"{FEEDBACK_PREFIX}/next").status_code == 401
            got = client.get(f"{FEEDBACK_PREFIX}/next", headers=auth)
            assert got.status_code == 200 and got.json()["id"] == "cli-1", got.text
            assert client.post(f"{FEEDBACK_PREFIX}/cli-1", json={"preferred": 1}, headers=auth).status_code == 200
        assert queue.pending() == {"unlabelled": 0, "labelled": 1}
    finally:
        proc.send_signal(signal.SIGINT)  # the command shuts Serve and its Ray down on Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        queue.drop()
