"""The people-in-the-loop HTTP endpoint against a real Redis: the happy path, leases, and every 4xx."""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

with warnings.catch_warnings():  # starlette 1.x prefers httpx2; the pinned httpx 0.28 works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from services.preferences import PreferenceQueue
from services.preferences.feedback_http import create_feedback_app
from services.replay.connection import EmbeddedRedis

URL = "/v1/feedback"
JSON = {"content-type": "application/json"}


def add_pairs(q: PreferenceQueue, n: int) -> None:
    q.add([{"id": f"p{i}", "prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"], "policy_version": 2} for i in range(n)])


@pytest.fixture
def queue(rclient: redis.Redis, namespace: str) -> PreferenceQueue:
    return PreferenceQueue(rclient, namespace, max_len=100)


@pytest.fixture
def http(queue: PreferenceQueue) -> Iterator[TestClient]:
    with TestClient(create_feedback_app(queue, lease_s=30), raise_server_exceptions=True) as client:
        yield client


def error(response, status: int) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def test_a_person_gets_a_pair_and_labels_it(http: TestClient, queue: PreferenceQueue) -> None:
    add_pairs(queue, 2)
    got = http.get(f"{URL}/next", params={"judge": "alice"})
    assert got.status_code == 200
    assert got.json() == {"id": "p0", "prompt": "q0", "responses": ["a0", "b0"], "policy_version": 2, "lease_s": 30}
    posted = http.post(f"{URL}/p0", json={"preferred": 1, "judge": "alice"})
    assert posted.status_code == 200
    answer = posted.json()
    assert answer.pop("entry_id") and answer == {"id": "p0", "preferred": 1, "judge_id": "human:alice"}
    tie = http.post(f"{URL}/p1", json={"preferred": "tie"})  # a pair never handed out can be labelled too
    assert tie.status_code == 200 and tie.json()["judge_id"] == "human"
    batch = queue.learner("l").read(5)
    assert [(b.pair_id, b.chosen, b.label.judge_id) for b in batch] == [
        ("p0", "b0", "human:alice"),
        ("p1", None, "human"),
    ]
    assert http.get(f"{URL}/next").status_code == 204  # nothing left to label
    assert queue.info()["labelled"] == 2


def test_leases_hand_each_pair_to_one_person_until_they_expire(queue: PreferenceQueue) -> None:
    add_pairs(queue, 2)
    with TestClient(create_feedback_app(queue, lease_s=0.2)) as http:
        first, second = http.get(f"{URL}/next").json()["id"], http.get(f"{URL}/next").json()["id"]
        assert {first, second} == {"p0", "p1"}
        assert http.get(f"{URL}/next").status_code == 204  # both leased
        time.sleep(0.3)
        again = http.get(f"{URL}/next")
        assert again.status_code == 200 and again.json()["id"] in {"p0", "p1"}  # an expired lease is handed on
        assert http.post(f"{URL}/{again.json()['id']}", json={"preferred": 0}).status_code == 200
        assert http.post(f"{URL}/{again.json()['id']}", json={"preferred": 1}).status_code == 409


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"content": b'{"preferred": 0', "headers": JSON}, 422, "not valid JSON"),
        ({"content": b"\xff\xfe", "headers": JSON}, 422, "not valid JSON"),
        ({"json": [0]}, 422, "must be a JSON object"),
        ({"json": {}}, 422, 'missing field "preferred"'),
        ({"json": {"preferred": 2}}, 422, "preferred must be 0, 1"),
        ({"json": {"preferred": "1"}}, 422, "preferred must be 0, 1"),
        ({"json": {"preferred": True}}, 422, "preferred must be 0, 1"),
        ({"json": {"preferred": 1.0}}, 422, "preferred must be 0, 1"),
        ({"json": {"preferred": None}}, 422, "preferred must be 0, 1"),
        ({"json": {"preferred": 0, "why": "x"}}, 422, "unknown field"),
        ({"json": {"preferred": 0, "judge": "bad name!"}}, 422, '"judge" must be'),
        ({"json": {"preferred": 0, "judge": 5}}, 422, '"judge" must be'),
        ({"content": b"preferred=0", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "must be"),
        ({"content": b'{"preferred": 0}', "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        ({"content": b'{"preferred": 0}'}, 415, "none"),
        ({"content": b'{"preferred": 0, "x": "' + b"y" * 70_000 + b'"}', "headers": JSON}, 413, "larger"),
    ],
)
def test_malformed_labels_are_4xx_and_change_nothing(
    http: TestClient, queue: PreferenceQueue, kwargs: dict, status: int, message: str
) -> None:
    add_pairs(queue, 1)
    assert message in error(http.post(f"{URL}/p0", **kwargs), status)
    assert queue.pending() == {"unlabelled": 1, "labelled": 0}
    assert http.post(f"{URL}/p0", json={"preferred": 0}).status_code == 200  # the pair is still there to label


def test_bad_ids_double_labels_routes_and_methods(http: TestClient, queue: PreferenceQueue) -> None:
    add_pairs(queue, 1)
    assert "no pair 'nope'" in error(http.post(f"{URL}/nope", json={"preferred": 0}), 404)
    assert "no pair" in error(http.post(f"{URL}/bad%20id%21", json={"preferred": 0}), 404)
    assert "no pair" in error(http.post(f"{URL}/" + "x" * 200, json={"preferred": 0}), 404)
    assert http.post(f"{URL}/p0", json={"preferred": 0}).status_code == 200
    assert "already labelled" in error(http.post(f"{URL}/p0", json={"preferred": 1}), 409)
    assert queue.learner("l").read(5)[0].label.preferred == 0  # the first label stands
    assert "not allowed" in error(http.get(f"{URL}/p0"), 405)
    post_next = http.post(f"{URL}/next", json={"preferred": 0})
    assert "use GET" in error(post_next, 405) and post_next.headers["allow"] == "GET"
    assert http.delete(f"{URL}/p0").headers["allow"] == "POST"
    assert "no such route" in error(http.get("/v1/feedback"), 404)
    assert "no such route" in error(http.post(f"{URL}/a/b", json={"preferred": 0}), 404)
    assert "unknown query parameter" in error(http.get(f"{URL}/next", params={"lease": 5}), 422)
    assert '"judge" must be' in error(http.get(f"{URL}/next", params={"judge": "a b"}), 422)


def test_redis_down_is_503_not_500(tmp_path: Path, namespace: str) -> None:
    server = EmbeddedRedis(tmp_path / "gone.db", appendonly=False)
    client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))  # fail fast, no reconnect backoff
    queue = PreferenceQueue(client, namespace)
    add_pairs(queue, 1)
    server.stop()
    try:
        with TestClient(create_feedback_app(queue)) as http:
            assert "unavailable" in error(http.get(f"{URL}/next"), 503)
            assert "unavailable" in error(http.post(f"{URL}/p0", json={"preferred": 0}), 503)
    finally:
        client.close()


@pytest.mark.slow  # starts Ray Serve (about 25 s on 2 cores); `pytest -m slow` runs it
def test_mounted_as_a_serve_app_next_to_an_app_at_root(
    ray_session: None, replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str
) -> None:
    import httpx
    from ray import serve

    from services.preferences.feedback_http import feedback_deployment

    queue = PreferenceQueue(rclient, namespace, max_len=10)
    add_pairs(queue, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Root:  # stands in for the policy app, which owns "/"
        async def __call__(self, request):  # type: ignore[no-untyped-def]
            return {"root": request.url.path}

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(Root.bind(), name="root", route_prefix="/")
        app = feedback_deployment(namespace, lease_s=30, redis_url=replay_server.url)
        serve.run(app, name="rlfleet-feedback", route_prefix="/v1/feedback")
        base = f"http://127.0.0.1:{port}"
        got = httpx.get(f"{base}{URL}/next", timeout=60)
        assert got.status_code == 200 and got.json()["id"] == "p0"
        assert httpx.post(f"{base}{URL}/p0", json={"preferred": 1}, timeout=60).status_code == 200
        assert httpx.post(f"{base}{URL}/p0", json={"preferred": 0}, timeout=60).status_code == 409
        assert httpx.post(f"{base}{URL}/p0", content=b"{}", timeout=60).status_code == 415
        assert httpx.get(f"{base}/v1/policies", timeout=60).json() == {"root": "/v1/policies"}
        assert queue.learner("l").read(5)[0].label.preferred == 1
    finally:
        serve.shutdown()
