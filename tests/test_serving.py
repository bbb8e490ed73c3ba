"""The Ray Serve policy server over real HTTP: routes, batching, and a JSON 4xx for every bad input."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from rlfleet.errors import UserError
from services.policy import LoadedPolicy
from services.serving import PolicyTable, _Job, merge_policy, run_batch, serve_policies, shutdown_serving

OBS = [[0.0, 0.1, 0.02, -0.3], [0.5, -1.0, 0.1, 0.7]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pendulum_run(make_ppo_checkpoint) -> Path:
    return make_ppo_checkpoint("Pendulum-v1")


@pytest.fixture(scope="module")
def server(ray_session: None, ppo_cartpole_checkpoint: Path, pendulum_run: Path) -> Iterator[httpx.Client]:
    url = serve_policies({"cartpole": ppo_cartpole_checkpoint, "pendulum": pendulum_run}, port=_free_port())
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    shutdown_serving()


@pytest.fixture(scope="module")
def local(ppo_cartpole_checkpoint: Path) -> LoadedPolicy:
    return LoadedPolicy.from_checkpoint(ppo_cartpole_checkpoint)


# ---- serve_policies arguments (before the server starts) ---------------------------------------


def test_busy_port_is_user_error(ray_session: None, ppo_cartpole_checkpoint: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="already in use"):
            serve_policies({"cartpole": ppo_cartpole_checkpoint}, port=busy.getsockname()[1])


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ({}, "no policies"),
        ({"bad/name": "x"}, "invalid policy name"),
        ({"ok": "/nonexistent/run"}, "does not exist"),
    ],
)
def test_bad_arguments_are_user_errors(policies: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        serve_policies(policies, port=_free_port())


# ---- good requests -----------------------------------------------------------------------------


def test_healthz(server: httpx.Client) -> None:
    r = server.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_list_policies(server: httpx.Client, local: LoadedPolicy) -> None:
    listed = {p["name"]: p for p in server.get("/v1/policies").json()["policies"]}
    assert listed["cartpole"] == {
        "name": "cartpole",
        "version": "1",
        "latest": True,
        "env_id": "CartPole-v1",
        "observation_shape": [4],
        "action_space": {"type": "Discrete", "n": 2},
        "checkpoint": str(local.checkpoint),
    }
    box = listed["pendulum"]["action_space"]
    assert box["type"] == "Box" and box["shape"] == [1] and box["low"] == [-2.0] and box["high"] == [2.0]


def test_act_matches_local_policy(server: httpx.Client, local: LoadedPolicy) -> None:
    expected = local.act(local.validate_observations(OBS), deterministic=True)
    for _ in range(3):  # deterministic is deterministic over HTTP too
        r = server.post("/v1/policies/cartpole/act", json={"observations": OBS, "deterministic": True})
        assert r.status_code == 200 and r.json() == {"actions": expected, "version": "1"}
    r = server.post("/v1/policies/cartpole/act", json={"observations": OBS})  # deterministic by default
    assert r.json() == {"actions": expected, "version": "1"}
    for version in ("1", "latest"):  # the versioned route reaches the same policy
        r = server.post(f"/v1/policies/cartpole/versions/{version}/act", json={"observations": OBS})
        assert r.status_code == 200 and r.json() == {"actions": expected, "version": "1"}
    sampled = server.post("/v1/policies/cartpole/act", json={"observations": OBS, "deterministic": False}).json()
    assert len(sampled["actions"]) == 2 and all(a in (0, 1) for a in sampled["actions"])


def test_value_matches_local_policy(server: httpx.Client, local: LoadedPolicy) -> None:
    r = server.post("/v1/policies/cartpole/value", json={"observations": OBS})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["values"], local.value(local.validate_observations(OBS)), rtol=1e-5)


def test_box_policy(server: httpx.Client) -> None:
    r = server.post("/v1/policies/pendulum/act", json={"observations": [[1.0, 0.0, 0.5]], "deterministic": False})
    assert r.status_code == 200
    [[action]] = r.json()["actions"]
    assert -2.0 <= action <= 2.0


def test_concurrent_requests_are_split_back_correctly(server: httpx.Client, local: LoadedPolicy) -> None:
    rng = np.random.default_rng(0)
    bodies = [rng.uniform(-0.2, 0.2, size=(int(rng.integers(1, 9)), 4)).round(4).tolist() for _ in range(24)]

    def call(i: int) -> httpx.Response:
        op = "value" if i % 2 else "act"
        return server.post(f"/v1/policies/cartpole/{op}", json={"observations": bodies[i]})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(len(bodies))))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        obs = local.validate_observations(bodies[i])
        if i % 2:
            np.testing.assert_allclose(r.json()["values"], local.value(obs), rtol=1e-4, atol=1e-6)
        else:
            assert r.json()["actions"] == local.act(obs, deterministic=True)


def test_batch_concatenates_rows_into_one_forward_pass_per_mode(local: LoadedPolicy) -> None:
    # @serve.batch itself cannot run outside a replica in Ray 2.60 (it reads the replica context),
    # so the batch body is tested directly; the concurrent HTTP test above covers the wiring.
    calls: list[tuple[str, bool, int]] = []
    spy = LoadedPolicy.__new__(LoadedPolicy)
    spy.__dict__.update(local.__dict__)
    spy.act = lambda obs, det: calls.append(("act", det, len(obs))) or local.act(obs, det)
    spy.value = lambda obs: calls.append(("value", True, len(obs))) or local.value(obs)

    kinds = [("act", True), ("act", False), ("value", True)]
    obs = [local.validate_observations([[0.01 * i, 0, 0, 0]] * (i + 1)) for i in range(9)]
    jobs = [_Job(spy, "cartpole", "1", *kinds[i % 3], o) for i, o in enumerate(obs)]
    forwards: list[int] = []
    results = run_batch(jobs, lambda job, rows: forwards.append(rows))

    # One forward pass per (op, mode) group, carrying all of that group's rows.
    expected_calls = [
        (op, det, sum(len(j.obs) for j in jobs if (j.op, j.deterministic) == (op, det))) for op, det in kinds
    ]
    assert sorted(calls) == sorted(expected_calls)
    assert sorted(forwards) == sorted(rows for _, _, rows in expected_calls)  # what the batch histogram sees
    for job, result in zip(jobs, results):
        assert len(result) == len(job.obs)
        if job.op == "value":
            np.testing.assert_allclose(result, local.value(job.obs), rtol=1e-5)
        elif job.deterministic:
            assert result == local.act(job.obs, True)


# ---- bad requests: always a JSON 4xx, and the server keeps serving ------------------------------

ACT = "/v1/policies/cartpole/act"
BAD_REQUESTS = [
    # (method, path, request kwargs, status, message fragment)
    ("POST", ACT, {"content": b"{not json"}, 400, "not valid JSON"),
    ("POST", ACT, {"content": b""}, 400, "not valid JSON"),
    ("POST", ACT, {"content": b"\xff\xfe\x00garbage"}, 400, "not valid JSON"),
    ("POST", ACT, {"content": b"[" * 100_000}, 400, "not valid JSON"),
    ("POST", ACT, {"json": [[0, 0, 0, 0]]}, 400, "must be a JSON object"),
    ("POST", ACT, {"json": "hello"}, 400, "must be a JSON object"),
    ("POST", ACT, {"json": {}}, 422, 'missing field "observations"'),
    ("POST", ACT, {"json": {"obs": OBS}}, 422, "unknown field(s) ['obs']"),
    ("POST", ACT, {"json": {"observations": "1,2,3,4"}}, 422, "observations must be a list"),
    ("POST", ACT, {"json": {"observations": {"a": 1}}}, 422, "observations must be a list"),
    ("POST", ACT, {"json": {"observations": OBS, "deterministic": "yes"}}, 422, '"deterministic" must be true or'),
    ("POST", ACT, {"json": {"observations": OBS, "deterministic": 1}}, 422, '"deterministic" must be true or'),
    ("POST", ACT, {"json": {"observations": []}}, 422, "observations is empty"),
    ("POST", ACT, {"json": {"observations": [[0, 0, 0]]}}, 422, "observations[0] has shape (3,), expected (4,) for"),
    ("POST", ACT, {"json": {"observations": [[0, 0, 0, 0], [0, 0, 0, 0, 0]]}}, 422, "observations[1] has shape (5,)"),
    ("POST", ACT, {"json": {"observations": [0, 0, 0, 0]}}, 422, "observations[0] is a number"),
    ("POST", ACT, {"json": {"observations": [[0, 0, True, 0]]}}, 422, "observations[0][2] is a boolean"),
    ("POST", ACT, {"json": {"observations": [[0, "0", 0, 0]]}}, 422, "observations[0][1] is a string"),
    ("POST", ACT, {"json": {"observations": [[0, 0, 0, None]]}}, 422, "observations[0][3] is null"),
    ("POST", ACT, {"content": b'{"observations": [[0, NaN, 0, 0]]}'}, 422, "observations[0][1] is nan"),
    ("POST", ACT, {"content": b'{"observations": [[Infinity, 0, 0, 0]]}'}, 422, "observations[0][0] is inf"),
    ("POST", ACT, {"json": {"observations": [[9.5, 0, 0, 0]]}}, 422, "outside the observation space bounds"),
    ("POST", ACT, {"json": {"observations": [[0, 0, 0, 0]] * 1025}}, 413, "at most 1024"),
    ("POST", "/v1/policies/cartpole/value", {"json": {"observations": OBS, "deterministic": 1}}, 422, "unknown field"),
    ("POST", "/v1/policies/nope/act", {"json": {"observations": OBS}}, 404, "known policies: ['cartpole', 'pendulum']"),
    ("POST", "/v1/policies/cartpole/versions/7/act", {"json": {"observations": OBS}}, 404,
     "no version '7'; versions: ['1']"),
    ("POST", "/v1/policies/cartpole/versions/act", {"json": {"observations": OBS}}, 404, "no such route"),
    ("POST", "/v1/policies/cartpole/v/1/act", {"json": {"observations": OBS}}, 404, "no such route"),
    ("GET", "/v1/policies/cartpole/versions/1/value", {}, 405, "use POST"),
    ("GET", "/nope", {}, 404, "no such route"),
    ("POST", "/v1/policies/cartpole/predict", {"json": {"observations": OBS}}, 404, "no such route"),
    ("GET", ACT, {}, 405, "use POST"),
    ("PUT", ACT, {"json": {"observations": OBS}}, 405, "use POST"),
    ("POST", "/healthz", {}, 405, "use GET"),
    ("DELETE", "/v1/policies", {}, 405, "use GET"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "message"), BAD_REQUESTS)
def test_bad_request_gets_json_4xx(
    server: httpx.Client, method: str, path: str, kwargs: dict, status: int, message: str
) -> None:
    r = server.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error"} and message in r.json()["error"]
    if status == 405:
        assert r.headers["allow"] in ("GET", "POST")


def test_server_still_serves_after_bad_requests(server: httpx.Client, local: LoadedPolicy) -> None:
    for method, path, kwargs, _, _ in BAD_REQUESTS:  # replay them all, then a good one
        assert 400 <= server.request(method, path, **kwargs).status_code < 500
    r = server.post(ACT, json={"observations": OBS})
    assert r.status_code == 200
    assert r.json() == {"actions": local.act(local.validate_observations(OBS), deterministic=True), "version": "1"}
    assert server.get("/healthz").json() == {"status": "ok"}


# ---- the policy table (what a rollout changes) --------------------------------------------------


def test_merge_policy_numbers_versions_keeps_the_newest_and_ignores_a_repeat() -> None:
    config, version = merge_policy({}, "cp", "/ck/a")
    assert version == "1"
    assert config["policies"] == [{"name": "cp", "versions": [{"version": "1", "checkpoint": "/ck/a"}], "latest": "1"}]
    same, version = merge_policy(config, "cp", "/ck/a")  # the latest checkpoint again: nothing changes
    assert version == "1" and same == config
    for i, path in enumerate(["/ck/b", "/ck/c", "/ck/d"], start=2):
        config, version = merge_policy(config, "cp", path, keep_versions=3)
        assert version == str(i)
    [entry] = config["policies"]
    assert [v["version"] for v in entry["versions"]] == ["2", "3", "4"] and entry["latest"] == "4"
    config, version = merge_policy(config, "cp", "/ck/b", version="stable")  # a named version is latest too
    assert version == "stable" and config["policies"][0]["latest"] == "stable"
    config, _ = merge_policy(config, "other", "/ck/x")
    assert [p["name"] for p in config["policies"]] == ["cp", "other"]


@pytest.mark.parametrize(("version", "message"), [("latest", "invalid version"), ("a/b", "invalid version"),
                                                  ("2", "already has a version '2'")])
def test_merge_policy_refuses_bad_or_taken_versions(version: str, message: str) -> None:
    config, _ = merge_policy({}, "cp", "/ck/a")
    config, _ = merge_policy(config, "cp", "/ck/b")
    with pytest.raises(UserError, match=message):
        merge_policy(config, "cp", "/ck/c", version=version)


def test_policy_table_resolves_latest_and_named_versions(ppo_cartpole_checkpoint: Path, local: LoadedPolicy) -> None:
    ckpt = str(local.checkpoint)
    config, _ = merge_policy({}, "cp", ckpt)
    config, _ = merge_policy(config, "cp", ckpt, version="pinned")
    table = PolicyTable(config)
    assert table.resolve("cp", None)[0] == "pinned" and table.resolve("cp", "latest")[0] == "pinned"
    assert table.resolve("cp", "1")[0] == "1"
    assert table.resolve("cp", "1")[1] is table.resolve("cp", "pinned")[1]  # one checkpoint is loaded once
    assert [(e["version"], e["latest"]) for e in table.listing] == [("1", False), ("pinned", True)]


# ---- metrics, through Ray's metrics agent as Prometheus scrapes them ------------------------------


def _scrape_rlfleet_serve(port: int) -> dict[str, list[dict[str, str]]]:
    """{metric name: [labels of each sample]} for the rlfleet_serve_* samples the node's agent exports."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    samples: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line.startswith("ray_rlfleet_serve_"):
            name, _, rest = line.partition("{")
            samples.setdefault(name, []).append(dict(re.findall(r'(\w+)="([^"]*)"', rest)))
    return samples


def test_metrics_are_exported_with_their_names_and_labels(server: httpx.Client) -> None:
    import ray

    for _ in range(3):
        server.post("/v1/policies/cartpole/act", json={"observations": OBS})
    server.post("/v1/policies/cartpole/act", content=b"{not json")
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {"ray_rlfleet_serve_requests_total", "ray_rlfleet_serve_request_latency_seconds_bucket",
              "ray_rlfleet_serve_batch_size_observations_bucket"}
    deadline = time.monotonic() + 300  # the agent exports every few seconds; this only stops a hang
    samples = _scrape_rlfleet_serve(port)
    while not wanted <= set(samples) and time.monotonic() < deadline:
        time.sleep(2)
        samples = _scrape_rlfleet_serve(port)
    assert wanted <= set(samples), sorted(samples)
    requests = samples["ray_rlfleet_serve_requests_total"]
    ok = {"policy": "cartpole", "version": "1", "route": "act", "status": "200"}
    assert any(ok.items() <= s.items() for s in requests), requests
    assert any(s.get("status") == "400" and s.get("route") == "act" for s in requests)
    latency = samples["ray_rlfleet_serve_request_latency_seconds_bucket"]
    assert all({"policy", "version", "route"} <= set(s) for s in latency)
    assert any(s.get("policy") == "cartpole" and s.get("version") == "1"
               for s in samples["ray_rlfleet_serve_batch_size_observations_bucket"])
