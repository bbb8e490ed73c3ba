"""HTTP serving of trained policies with Ray Serve: one ingress deployment that validates, routes and batches.

Routes (all answers are JSON; every error is {"error": "<what is wrong>"} with a 4xx status):

    GET  /healthz                     -> {"status": "ok"}
    GET  /v1/policies                 -> {"policies": [{"name", "env_id", "observation_shape", "action_space", "checkpoint"}]}
    POST /v1/policies/{name}/act      {"observations": [[...], ...], "deterministic": true} -> {"actions": [...]}
    POST /v1/policies/{name}/value    {"observations": [[...], ...]}                        -> {"values": [...]}

Request bodies are parsed with json.loads only; nothing from HTTP is unpickled.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from cluster.local import ensure_ray
from rlfleet.errors import UserError
from services.policy import LoadedPolicy, ObservationError, TooManyObservationsError, space_to_json

APP_NAME = "rlfleet-policies"
MAX_BODY_BYTES = 32 * 1024 * 1024  # 1024 rows of a few hundred floats fit easily
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ROUTES = "GET /healthz, GET /v1/policies, POST /v1/policies/<name>/act, POST /v1/policies/<name>/value"
_ACT_FIELDS = {"observations", "deterministic"}
_VALUE_FIELDS = {"observations"}
# Notes (Serve on 2 cores): the default max_ongoing_requests=5 and the access log cut throughput ~5x.
_NO_ACCESS_LOG = {"enable_access_log": False}

logger = logging.getLogger("ray.serve")

# Where this process started Serve (Ray node id, host, port), so a second call with another
# host/port fails loudly instead of Serve silently keeping the old HTTP options.
_serving_at: tuple[str, str, int] | None = None
_started_ray = False


class HTTPError(Exception):
    """An error answer: status code, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class _Job:
    """One request's share of a batch."""

    policy: str
    op: str  # "act" or "value"
    deterministic: bool
    obs: np.ndarray


@serve.deployment(
    name="PolicyServer",
    max_ongoing_requests=256,
    # No CPU reservation: inference is light, and a training job in the same Ray session
    # must not be able to starve the replica of a schedulable CPU.
    ray_actor_options={"num_cpus": 0},
)
class PolicyServer:
    """Ingress: validates requests, routes them, and batches inference across concurrent requests."""

    def __init__(self, checkpoints: dict[str, str], max_batch_size: int = 64) -> None:
        self._policies = {name: LoadedPolicy.from_checkpoint(path) for name, path in checkpoints.items()}
        self._listing = [
            {
                "name": name,
                "env_id": p.env_id,
                "observation_shape": list(p.observation_space.shape),
                "action_space": space_to_json(p.action_space),
                "checkpoint": str(p.checkpoint),
            }
            for name, p in self._policies.items()
        ]
        self._infer.set_max_batch_size(max_batch_size)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except HTTPError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # a bug, not bad input: keep serving and say so in JSON
            logger.exception("internal error on %s %s", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    async def _route(self, request: Request) -> dict:
        path = request.url.path.rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if path == "/healthz":
            _require_method(request, "GET")
            return {"status": "ok"}
        if path == "/v1/policies":
            _require_method(request, "GET")
            return {"policies": self._listing}
        if len(parts) == 4 and parts[:2] == ["v1", "policies"] and parts[3] in ("act", "value"):
            _require_method(request, "POST")
            name, op = parts[2], parts[3]
            policy = self._policy(name)
            if op == "value" and not policy.has_value_function:
                raise HTTPError(404, f"policy '{name}' has no value function")
            body = await _read_json_object(request)
            allowed = _ACT_FIELDS if op == "act" else _VALUE_FIELDS
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise HTTPError(422, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
            if "observations" not in body:
                raise HTTPError(422, 'missing field "observations" (a list of observations)')
            deterministic = body.get("deterministic", True)
            if not isinstance(deterministic, bool):
                raise HTTPError(422, f'"deterministic" must be true or false, got {json.dumps(deterministic)}')
            try:
                obs = policy.validate_observations(body["observations"])
            except TooManyObservationsError as exc:
                raise HTTPError(413, str(exc)) from None
            except ObservationError as exc:
                raise HTTPError(422, str(exc)) from None
            result = await self._infer(_Job(name, op, deterministic, obs))
            return {"actions": result} if op == "act" else {"values": result}
        raise HTTPError(404, f"no such route: {request.method} {path}; routes: {_ROUTES}")

    def _policy(self, name: str) -> LoadedPolicy:
        if name not in self._policies:
            raise HTTPError(404, f"unknown policy '{name}'; known policies: {sorted(self._policies)}")
        return self._policies[name]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _infer(self, jobs: list[_Job]) -> list[list]:
        return run_batch(self._policies, jobs)


def run_batch(policies: dict[str, LoadedPolicy], jobs: list[_Job]) -> list[list]:
    """Concatenate the rows of concurrent requests, one forward pass per (policy, op, mode), split back."""
    results: list[list] = [[] for _ in jobs]
    groups: dict[tuple[str, str, bool], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.policy, job.op, job.deterministic), []).append(i)
    for (name, op, deterministic), members in groups.items():
        policy = policies[name]
        obs = np.concatenate([jobs[i].obs for i in members])
        out = policy.act(obs, deterministic) if op == "act" else policy.value(obs)
        start = 0
        for i in members:
            n = len(jobs[i].obs)
            results[i] = out[start : start + n]
            start += n
    return results


def _require_method(request: Request, method: str) -> None:
    if request.method != method:
        raise HTTPError(
            405, f"method {request.method} not allowed on {request.url.path}; use {method}", {"Allow": method}
        )


async def _read_json_object(request: Request) -> dict:
    """The body as a JSON object; 413 when too large, 400 when not JSON or not an object."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        parsed = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise HTTPError(
            400, f'request body must be a JSON object like {{"observations": [[...]]}}, got {type(parsed).__name__}'
        )
    return parsed


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy does not fail fast on a busy port; probe it so the user gets a clear error.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror}; choose another port") from None


def serve_policies(
    policies: dict[str, str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 64,
) -> str:
    """Deploy the given {name: run dir or checkpoint} policies over HTTP; return the base URL.

    Non-blocking: Serve keeps running in the current Ray session until shutdown_serving().
    """
    global _serving_at, _started_ray
    if not policies:
        raise UserError("no policies to serve: give at least one name=checkpoint")
    for name in policies:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise UserError(
                f"invalid policy name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise UserError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if not 0 < port < 65536:
        raise UserError(f"port must be in 1..65535, got {port}")
    # Load every policy here first: a bad path is a UserError now, not a replica crash-loop later.
    checkpoints = {name: str(LoadedPolicy.from_checkpoint(path).checkpoint) for name, path in policies.items()}

    if not ray.is_initialized():
        ensure_ray()  # RAY_ADDRESS when set, else an embedded local cluster
        _started_ray = True
    node = ray.get_runtime_context().get_node_id()
    if _serving_at is None or _serving_at[0] != node:  # not started yet, or in an older Ray session
        _check_port_free(host, port)
        serve.start(http_options={"host": host, "port": port}, logging_config=_NO_ACCESS_LOG)
        _serving_at = (node, host, port)
    elif _serving_at[1:] != (host, port):
        raise UserError(
            f"Serve already listens on {_serving_at[1]}:{_serving_at[2]} in this Ray session; "
            "call shutdown_serving() before serving on another address"
        )
    # Serve warns (and can never fill a batch) unless max_ongoing_requests >= max_batch_size.
    app = PolicyServer.options(max_ongoing_requests=max(256, max_batch_size)).bind(checkpoints, max_batch_size)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=_NO_ACCESS_LOG)
    url_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not dialable
    if ":" in url_host:  # IPv6 literal
        url_host = f"[{url_host}]"
    return f"http://{url_host}:{port}"


def shutdown_serving() -> None:
    """Stop Serve (and Ray, if serve_policies started it)."""
    global _serving_at, _started_ray
    if ray.is_initialized():
        serve.shutdown()
        if _started_ray:
            ray.shutdown()
    _serving_at = None
    _started_ray = False
