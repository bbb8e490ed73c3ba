"""Optional API key over real HTTP: a wrong or missing key gets 401 and nothing else; a mounted app shares it."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.policy import LoadedPolicy
from services.serving import API_KEY_ENV, asgi_application, deploy_policies, running_config, shutdown_serving

KEY = "k3y-for-tests-only"
OBS = [[0.0, 0.1, 0.02, -0.3]]
ACT = "/v1/policies/cartpole/act"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_session: None, ppo_cartpole_checkpoint: Path) -> Iterator[str]:
    # The key comes from the environment, as in a deployment (docker-compose sets RLFLEET_API_KEY).
    before = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = KEY
    try:
        extra = {"/v1/extra": asgi_application("extra-echo", _echo_builder())}
        yield deploy_policies({"cartpole": ppo_cartpole_checkpoint}, port=_free_port(), extra_apps=extra).url
    finally:
        if before is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = before
        shutdown_serving()


def _echo_builder():  # noqa: ANN202  (the stand-in for an app mounted next to the policies)
    # A nested function travels to the replica by value (this test module is not importable there).
    def build():  # noqa: ANN202
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def echo(request):  # noqa: ANN001, ANN202
            return JSONResponse({"path": request.url.path, "mounted": True})

        return Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])

    return build


@pytest.fixture(scope="module")
def local(ppo_cartpole_checkpoint: Path) -> LoadedPolicy:
    return LoadedPolicy.from_checkpoint(ppo_cartpole_checkpoint)


BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": "Bearer"},
    {"Authorization": KEY},
    {"X-API-Key": "wrong-key"},
    {"X-API-Key": ""},
    {"X-Api-Key": KEY[:-1]},
]
# Requests that would get 200, 400, 404, 405, 413 or 422 with the key: without it, all are 401.
REQUESTS = [
    ("GET", "/v1/policies", {}),
    ("POST", ACT, {"json": {"observations": OBS}}),
    ("POST", "/v1/policies/cartpole/value", {"json": {"observations": OBS}}),
    ("POST", "/v1/policies/cartpole/versions/1/act", {"json": {"observations": OBS}}),
    ("POST", "/v1/policies/nope/act", {"json": {"observations": OBS}}),
    ("POST", ACT, {"content": b"{not json"}),
    ("POST", ACT, {"json": {"observations": [[0, 0, 0, 0]] * 5000}}),
    ("GET", ACT, {}),
    ("GET", "/no/such/route", {}),
    ("POST", "/v1/extra/anything", {"json": {}}),
]


@pytest.mark.parametrize("headers", BAD_CREDENTIALS, ids=lambda h: json.dumps(h))
@pytest.mark.parametrize(("method", "path", "kwargs"), REQUESTS, ids=lambda x: str(x)[:40])
def test_wrong_or_missing_key_gets_401_and_nothing_else(
    url: str, headers: dict, method: str, path: str, kwargs: dict
) -> None:
    r = httpx.request(method, url + path, headers=headers, timeout=60, **kwargs)
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                 "'X-API-Key: <key>'"}
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY}"},
                                     {"X-API-Key": KEY}])
def test_right_key_in_either_header_is_served(url: str, local: LoadedPolicy, headers: dict) -> None:
    r = httpx.post(url + ACT, json={"observations": OBS}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"actions": local.act(local.validate_observations(OBS), True), "version": "1"}
    assert httpx.get(url + "/v1/policies", headers=headers, timeout=60).json()["policies"][0]["name"] == "cartpole"
    # With the key, bad input gets its usual 4xx again (the key check comes first, not instead).
    assert httpx.post(url + ACT, content=b"{not json", headers=headers, timeout=60).status_code == 400
    mounted = httpx.post(url + "/v1/extra/hello", json={}, headers=headers, timeout=60)
    assert mounted.status_code == 200 and mounted.json()["mounted"] is True


def test_healthz_needs_no_key(url: str) -> None:
    # Liveness probes (Kubernetes, docker-compose) carry no secrets.
    assert httpx.get(url + "/healthz", timeout=60).json() == {"status": "ok"}


def test_the_key_itself_is_not_kept_in_serve_config(url: str) -> None:
    config = running_config()
    assert config is not None and config["api_key_sha256"] and KEY not in json.dumps(config)


def test_a_rollout_without_the_key_keeps_auth_on(url: str, ppo_cartpole_checkpoint: Path) -> None:
    before = os.environ.pop(API_KEY_ENV)
    try:
        deploy_policies({"cartpole": ppo_cartpole_checkpoint}, versions={"cartpole": "again"})
    finally:
        os.environ[API_KEY_ENV] = before
    assert httpx.post(url + ACT, json={"observations": OBS}, timeout=60).status_code == 401
    r = httpx.post(url + ACT, json={"observations": OBS}, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "again"
