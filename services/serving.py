"""HTTP serving of trained policies with Ray Serve: several policies, each in several versions, batched.

Routes (all answers are JSON; every error is {"error": "<what is wrong>"} with a 4xx status):

    GET  /healthz                                           -> {"status": "ok"}
    GET  /v1/policies                                       -> {"policies": [{"name", "version", "latest", ...}]}
    POST /v1/policies/{name}/act                            latest version of {name}
    POST /v1/policies/{name}/value
    POST /v1/policies/{name}/versions/{version}/act         one version ("latest" is accepted too)
    POST /v1/policies/{name}/versions/{version}/value

act: {"observations": [[...], ...], "deterministic": true} -> {"actions": [...], "version": "..."};
value: {"observations": [[...], ...]} -> {"values": [...], "version": "..."}.

The policy table (names, versions, checkpoints, which version is latest) is the deployment's `user_config`,
applied by `PolicyServer.reconfigure`. Rolling a new checkpoint in redeploys the app with the new table;
`max_surge_percent=100` makes Serve start the new replicas before it gracefully stops the old ones, so no
request is dropped. Other names and older versions stay served; `keep_versions` bounds how many.

Optional API key: when RLFLEET_API_KEY is set (or `api_key=` is given), every route but /healthz needs
`Authorization: Bearer <key>` or `X-API-Key: <key>`; otherwise 401 before anything else is read.
Request bodies are parsed with json.loads only; nothing from HTTP is unpickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME as CONTROLLER_NAME
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.deployment import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from cluster.local import ensure_ray
from rlfleet.errors import UserError
from services.policy import LoadedPolicy, ObservationError, TooManyObservationsError, space_to_json

APP_NAME = "rlfleet-policies"
LATEST = "latest"
API_KEY_ENV = "RLFLEET_API_KEY"
MAX_BODY_BYTES = 32 * 1024 * 1024  # 1024 rows of a few hundred floats fit easily
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ROUTES = (
    "GET /healthz, GET /v1/policies, POST /v1/policies/<name>/{act,value}, "
    "POST /v1/policies/<name>/versions/<version>/{act,value}"
)
_ACT_FIELDS = {"observations", "deterministic"}
_VALUE_FIELDS = {"observations"}
# Notes (Serve on 2 cores): the default max_ongoing_requests=5 and the access log cut throughput ~5x.
_NO_ACCESS_LOG = {"enable_access_log": False}
_LATENCY_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
_UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"

logger = logging.getLogger("ray.serve")

# Where this process started Serve (Ray node id, host, port), so a second call with another
# host/port fails loudly instead of Serve silently keeping the old HTTP options.
_serving_at: tuple[str, str, int] | None = None
_started_ray = False

# Ray 2.60's throughput-optimised Serve: HAProxy takes the HTTP port and forwards straight to the ingress
# replicas (direct ingress), user code runs on the replica's main loop. Measured on 2 cores (docs/bench-serve.md)
# it gives ~5x the requests/s of the Python HTTP proxy. Read when Ray starts, so it applies to the Ray
# cluster this module starts itself; set either variable to 0 to opt out, or set them on a cluster's nodes.
FAST_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def prefer_fast_serve_env() -> None:
    """Default the Serve fast-path variables before this process starts a Ray cluster (never overrides)."""
    for key, value in FAST_SERVE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class ServeTuning:
    """The knobs `rlfleet bench serve` measured (docs/bench-serve.md); defaults are its best on 2 cores."""

    max_batch_size: int = 64
    # No waiting: under load requests queue up while a forward pass runs and form the next batch anyway;
    # a wait only adds latency (a 2 ms wait made a single client's p50 3.6 ms instead of ~1.5 ms).
    batch_wait_timeout_s: float = 0.0
    max_ongoing_requests: int = 256
    num_replicas: int = 1

    def check(self) -> None:
        for field in ("max_batch_size", "max_ongoing_requests", "num_replicas"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{field} must be an integer >= 1, got {value!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or not 0 <= self.batch_wait_timeout_s <= 1:
            raise UserError(f"batch_wait_timeout_s must be in [0, 1] seconds, got {self.batch_wait_timeout_s!r}")


class HTTPError(Exception):
    """An error answer: status code, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# ---- API key ------------------------------------------------------------------------------------


def key_digest(key: str) -> str:
    """What the server keeps of an API key: its SHA-256 (the key itself never enters Serve's config)."""
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(header: Callable[[str], str | None]) -> str | None:
    """The key a request carries in `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    auth = header("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return header("x-api-key") or None


def key_matches(digest: str | None, key: str | None) -> bool:
    """True when no key is required, or `key` is the right one (constant-time comparison)."""
    if digest is None:
        return True
    return key is not None and hmac.compare_digest(key_digest(key), digest)


def unauthorized_response() -> JSONResponse:
    return JSONResponse({"error": _UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """ASGI middleware giving an extra app (see `asgi_application`) the same key check as the policies."""

    def __init__(self, app: Any, digest: str | None) -> None:
        self.app = app
        self.digest = digest

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.digest is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not key_matches(self.digest, presented_key(headers.get)):
                await unauthorized_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the policy table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One request's share of a batch."""

    policy: LoadedPolicy
    name: str
    version: str
    op: str  # "act" or "value"
    deterministic: bool
    obs: np.ndarray


class PolicyTable:
    """The loaded policies of one user_config: {name: {version: LoadedPolicy}} and each name's latest."""

    def __init__(self, config: Mapping[str, Any], cache: Mapping[str, LoadedPolicy] | None = None) -> None:
        old, used = cache or {}, {}  # reuse what is loaded; keep only what this table serves
        self.versions: dict[str, dict[str, LoadedPolicy]] = {}
        self.latest: dict[str, str] = {}
        self.listing: list[dict] = []
        for entry in config.get("policies", []):
            name = entry["name"]
            self.latest[name] = entry["latest"]
            loaded = self.versions.setdefault(name, {})
            for v in entry["versions"]:
                path = v["checkpoint"]
                policy = used.get(path) or old.get(path) or LoadedPolicy.from_checkpoint(path)
                used[path] = policy
                loaded[v["version"]] = policy
                self.listing.append({
                    "name": name,
                    "version": v["version"],
                    "latest": v["version"] == entry["latest"],
                    "env_id": policy.env_id,
                    "observation_shape": list(policy.observation_space.shape),
                    "action_space": space_to_json(policy.action_space),
                    "checkpoint": str(policy.checkpoint),
                })
        self.by_checkpoint: dict[str, LoadedPolicy] = used

    def resolve(self, name: str, version: str | None) -> tuple[str, LoadedPolicy]:
        if name not in self.versions:
            raise HTTPError(404, f"unknown policy '{name}'; known policies: {sorted(self.versions)}")
        if version is None or version == LATEST:
            version = self.latest[name]
        if version not in self.versions[name]:
            raise HTTPError(
                404, f"policy '{name}' has no version '{version}'; versions: {list(self.versions[name])}"
            )
        return version, self.versions[name][version]


def merge_policy(
    config: dict, name: str, checkpoint: str, version: str | None = None, keep_versions: int = 3
) -> tuple[dict, str]:
    """A copy of `config` with `checkpoint` deployed as `name`'s newest version (made latest); and that version.

    Re-deploying the checkpoint that is already latest changes nothing. Versions are "1", "2", ...
    unless given; at most `keep_versions` are kept per name (the oldest go first).
    """
    config = json.loads(json.dumps(config))  # deep copy of plain JSON data
    policies = config.setdefault("policies", [])
    entry = next((p for p in policies if p["name"] == name), None)
    if entry is None:
        entry = {"name": name, "versions": [], "latest": None}
        policies.append(entry)
    known = {v["version"]: v["checkpoint"] for v in entry["versions"]}
    if version is None:
        if entry["latest"] is not None and known[entry["latest"]] == checkpoint:
            return config, entry["latest"]
        numbers = [int(v) for v in known if v.isdigit()]
        version = str(max(numbers, default=0) + 1)
    elif version == LATEST or not _NAME_RE.fullmatch(version):
        raise UserError(
            f"invalid version {version!r}: use 1-64 letters, digits, '.', '_' or '-' (not '{LATEST}')"
        )
    elif version in known:
        if known[version] != checkpoint:
            raise UserError(f"policy '{name}' already has a version '{version}' ({known[version]}); pick another")
        entry["versions"] = [v for v in entry["versions"] if v["version"] != version]
    entry["versions"].append({"version": version, "checkpoint": checkpoint})
    entry["versions"] = entry["versions"][-keep_versions:]
    entry["latest"] = version
    return config, version


# ---- the Serve deployment -----------------------------------------------------------------------


@serve.deployment(
    name="PolicyServer",
    max_ongoing_requests=256,
    # No CPU reservation: inference is light, and a training job in the same Ray session
    # must not be able to starve the replica of a schedulable CPU.
    ray_actor_options={"num_cpus": 0},
    # A redeploy starts the new replicas first and only then drains the old ones: no gap.
    max_surge_percent=100,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=30,
)
class PolicyServer:
    """Ingress: checks the key, validates requests, routes them by name/version, batches inference."""

    def __init__(self) -> None:
        from ray.util import metrics  # inside the replica: the metrics agent of its node exports them

        self._table = PolicyTable({})
        self._key_digest: str | None = None
        self._requests = metrics.Counter(
            "rlfleet_serve_requests_total", "HTTP requests answered, by policy, version, route and status.",
            tag_keys=("policy", "version", "route", "status"),
        )
        self._latency = metrics.Histogram(
            "rlfleet_serve_request_latency_seconds", "Time from request start to answer, in seconds.",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("policy", "version", "route"),
        )
        self._batch_rows = metrics.Histogram(
            "rlfleet_serve_batch_size_observations", "Observations per forward pass (rows of batched requests).",
            boundaries=_BATCH_BUCKETS, tag_keys=("policy", "version"),
        )

    async def reconfigure(self, config: dict) -> None:
        # Load in a thread so the replica keeps answering with the old table meanwhile; swap at once.
        self._table = await asyncio.to_thread(PolicyTable, config, self._table.by_checkpoint)
        self._key_digest = config.get("api_key_sha256")
        tuning = ServeTuning(**config.get("tuning", {}))
        self._infer.set_max_batch_size(tuning.max_batch_size)
        self._infer.set_batch_wait_timeout_s(tuning.batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        tags = {"policy": "", "version": "", "route": "other"}
        try:
            response = JSONResponse(await self._route(request, tags))
        except HTTPError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # a bug, not bad input: keep serving and say so in JSON
            logger.exception("internal error on %s %s", request.method, request.url.path)
            response = JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
        self._requests.inc(1, tags={**tags, "status": str(response.status_code)})
        self._latency.observe(time.perf_counter() - start, tags=tags)
        return response

    async def _route(self, request: Request, tags: dict[str, str]) -> dict:
        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz":
            tags["route"] = "healthz"
            _require_method(request, "GET")
            return {"status": "ok"}
        if not key_matches(self._key_digest, presented_key(request.headers.get)):
            raise HTTPError(401, _UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        parts = path.strip("/").split("/")
        if path == "/v1/policies":
            tags["route"] = "list"
            _require_method(request, "GET")
            return {"policies": self._table.listing}
        if parts[:2] != ["v1", "policies"] or parts[-1] not in ("act", "value"):
            raise HTTPError(404, f"no such route: {request.method} {path}; routes: {_ROUTES}")
        if len(parts) == 4:
            name, version = parts[2], None
        elif len(parts) == 6 and parts[3] == "versions":
            name, version = parts[2], parts[4]
        else:
            raise HTTPError(404, f"no such route: {request.method} {path}; routes: {_ROUTES}")
        op = tags["route"] = parts[-1]
        _require_method(request, "POST")
        version, policy = self._table.resolve(name, version)
        tags["policy"], tags["version"] = name, version  # only known names: bounded label values
        if op == "value" and not policy.has_value_function:
            raise HTTPError(404, f"policy '{name}' version '{version}' has no value function")
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
        result = await self._infer(_Job(policy, name, version, op, deterministic, obs))
        return {"actions" if op == "act" else "values": result, "version": version}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _infer(self, jobs: list[_Job]) -> list[list]:
        return run_batch(jobs, self._observe_batch)

    def _observe_batch(self, job: _Job, rows: int) -> None:
        self._batch_rows.observe(rows, tags={"policy": job.name, "version": job.version})


def run_batch(jobs: list[_Job], on_forward: Callable[[_Job, int], None] | None = None) -> list[list]:
    """Concatenate the rows of concurrent requests, one forward pass per (policy, op, mode), split back."""
    results: list[list] = [[] for _ in jobs]
    groups: dict[tuple[int, str, bool], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.policy), job.op, job.deterministic), []).append(i)
    for (_, op, deterministic), members in groups.items():
        first = jobs[members[0]]
        obs = np.concatenate([jobs[i].obs for i in members])
        out = first.policy.act(obs, deterministic) if op == "act" else first.policy.value(obs)
        if on_forward is not None:
            on_forward(first, len(obs))
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


# ---- extra apps next to the policies ------------------------------------------------------------


def asgi_application(name: str, build: Callable[[], Any], api_key: str | None = None) -> Application:
    """A Serve app around the ASGI app `build()` returns (built in the replica), behind the same API key.

    Mount it with `serve_policies(..., extra_apps={"/v1/preferences": asgi_application("feedback", build)})`.
    `api_key=None` reads RLFLEET_API_KEY, like the policies.
    """
    digest = api_key_digest(api_key)

    def build_guarded() -> Any:
        return ApiKeyMiddleware(build(), digest)

    deployment = serve.deployment(serve.ingress(build_guarded)(), name=name, ray_actor_options={"num_cpus": 0})
    return deployment.bind()


FEEDBACK_PREFIX = "/v1/feedback"


def feedback_app(namespace: str, *, lease_s: float = 300.0, redis_url: str | None = None,
                 api_key: str | None = None) -> Application:
    """The people-in-the-loop endpoint of `namespace`'s preference queue (services/preferences/feedback_http.py)
    as an extra app, behind the same API key as the policies: mount it at FEEDBACK_PREFIX,
    `deploy_policies(..., extra_apps={FEEDBACK_PREFIX: feedback_app("run-42")})`.

    Redis is `redis_url`, else REDIS_URL, else this process's embedded server (its unix socket). Checked here,
    so a bad namespace or an unreachable Redis is a UserError now, not a replica crash-loop later."""
    import redis

    from services.preferences.queue import PreferenceQueue
    from services.replay.connection import REDIS_URL_ENV, embedded_server

    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not lease_s > 0:
        raise UserError(f"feedback lease must be > 0 seconds, got {lease_s!r}")
    url = redis_url or os.environ.get(REDIS_URL_ENV) or embedded_server().url
    try:
        PreferenceQueue(redis.Redis.from_url(url), namespace).pending()  # bad namespace: a UserError
    except redis.RedisError as exc:
        raise UserError(f"cannot reach the preference queue's Redis at {url}: {exc}") from None

    def build() -> Any:  # runs in the replica: connect there, nothing but strings travels
        import redis as redis_client

        from services.preferences.feedback_http import create_feedback_app
        from services.preferences.queue import PreferenceQueue as Queue

        queue = Queue(redis_client.Redis.from_url(url), namespace)
        return create_feedback_app(queue, lease_s=float(lease_s), prefix="")  # Serve strips the route prefix

    return asgi_application("PreferenceFeedback", build, api_key)


# ---- driver side --------------------------------------------------------------------------------


def api_key_digest(api_key: str | None = None) -> str | None:
    """The digest an app checks keys against: of `api_key`, else of RLFLEET_API_KEY; None = no key needed.

    Call it in the driver (where the variable is set) and hand the digest to the replica, e.g. to wrap an
    extra app's ASGI app in `ApiKeyMiddleware(app, digest)`.
    """
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    return key_digest(key) if key else None


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy does not fail fast on a busy port; probe it so the user gets a clear error.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror}; choose another port") from None


def running_config() -> dict | None:
    """The policy table of the app running in this Ray cluster (the controller's target), or None.

    Read from the Serve controller, not from a replica: during a rollout a replica may still hold the old
    table, and a handle call from a driver fails when Serve runs its router on the caller's event loop.
    """
    from ray.serve.context import _get_global_client  # what serve.status() reads; there is no public getter
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = ServeInstanceDetails(**client.get_serve_details()).applications.get(APP_NAME)
    if app is None or app.status == "DELETING" or "PolicyServer" not in app.deployments:
        return None
    return app.deployments["PolicyServer"].deployment_config.user_config


def _base_url(host: str, port: int) -> str:
    url_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard is not dialable
    if ":" in url_host:  # IPv6 literal
        url_host = f"[{url_host}]"
    return f"http://{url_host}:{port}"


@dataclass(frozen=True)
class Deployed:
    """What `serve_policies` did: the base URL, {name: version now latest}, and whether Serve was started."""

    url: str
    versions: dict[str, str]
    started: bool


def serve_policies(
    policies: Mapping[str, str | Path], host: str | None = None, port: int | None = None, **options: Any
) -> str:
    """Deploy {name: run dir or checkpoint} over HTTP; return the base URL. Options: see `deploy_policies`."""
    return deploy_policies(policies, host, port, **options).url


def deploy_policies(
    policies: Mapping[str, str | Path],
    host: str | None = None,
    port: int | None = None,
    *,
    versions: Mapping[str, str] | None = None,
    api_key: str | None = None,
    tuning: ServeTuning | None = None,
    keep_versions: int = 3,
    extra_apps: Mapping[str, Application] | None = None,
) -> Deployed:
    """Serve the given policies, or roll them into the server already running in this Ray cluster.

    Each policy becomes the latest version of its name (other names and older versions stay served).
    A new server listens on host:port (default 127.0.0.1:8000); a rollout goes to wherever the running one
    listens (an explicit, different host/port is an error). Non-blocking: Serve keeps running in the Ray
    cluster until shutdown_serving(). `api_key=None` reads RLFLEET_API_KEY; when rolling into a running
    server without either, its key is kept. `extra_apps` maps route prefixes to Serve apps deployed
    beside the policies (see `asgi_application`).
    """
    global _serving_at, _started_ray
    if not policies:
        raise UserError("no policies to serve: give at least one name=checkpoint")
    for name in policies:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise UserError(
                f"invalid policy name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
    if tuning is not None:
        tuning.check()
    if isinstance(keep_versions, bool) or not isinstance(keep_versions, int) or keep_versions < 1:
        raise UserError(f"keep_versions must be an integer >= 1, got {keep_versions!r}")
    if port is not None and not 0 < port < 65536:
        raise UserError(f"port must be in 1..65535, got {port}")
    for prefix in extra_apps or {}:
        if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", prefix):
            raise UserError(f"route prefix {prefix!r} of an extra app must look like /v1/name (not '/')")
    # Load every policy here first: a bad path is a UserError now, not a replica crash-loop later.
    checkpoints = {name: str(LoadedPolicy.from_checkpoint(path).checkpoint) for name, path in policies.items()}

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            prefer_fast_serve_env()
        ensure_ray()  # RAY_ADDRESS when set, else an embedded local cluster
        _started_ray = True
    node = ray.get_runtime_context().get_node_id()
    current = running_config()
    if _serving_at is not None and _serving_at[0] == node:
        running_at = list(_serving_at[1:])
    else:
        running_at = None if current is None else current["address"]
    if running_at is not None and [host or running_at[0], port or running_at[1]] != running_at:
        raise UserError(
            f"Serve already listens on {running_at[0]}:{running_at[1]} in this Ray cluster; roll policies in "
            "there (no host/port), or call shutdown_serving() first"
        )
    started = current is None
    if started:
        host, port = host or "127.0.0.1", port or 8000
        if _serving_at is None or _serving_at[0] != node:  # not started yet, or in an older Ray session
            _check_port_free(host, port)
            serve.start(http_options={"host": host, "port": port}, logging_config=_NO_ACCESS_LOG)
            _serving_at = (node, host, port)
        current = {"address": [host, port]}
    host, port = current["address"]

    config = dict(current)
    deployed: dict[str, str] = {}
    for name, checkpoint in checkpoints.items():
        config, deployed[name] = merge_policy(config, name, checkpoint, (versions or {}).get(name), keep_versions)
    digest = api_key_digest(api_key)
    if digest is not None or started:
        config["api_key_sha256"] = digest
    if tuning is None:  # keep what the running server was given
        tuning = ServeTuning(**current.get("tuning", {}))
    config["tuning"] = asdict(tuning)
    if config == current:
        return Deployed(_base_url(host, port), deployed, started)  # nothing to roll in

    for prefix, app in (extra_apps or {}).items():
        serve.run(app, name=f"rlfleet{prefix.replace('/', '-')}", route_prefix=prefix, logging_config=_NO_ACCESS_LOG)
    # Serve warns (and can never fill a batch) unless max_ongoing_requests >= max_batch_size.
    server = PolicyServer.options(
        user_config=config,
        max_ongoing_requests=max(tuning.max_ongoing_requests, tuning.max_batch_size),
        num_replicas=tuning.num_replicas,
    )
    serve.run(server.bind(), name=APP_NAME, route_prefix="/", logging_config=_NO_ACCESS_LOG)
    return Deployed(_base_url(host, port), deployed, started)


def build_app(args: dict | None = None) -> Application:
    """Entry point for Serve config files (`serve deploy`, KubeRay's RayService: `services.serving:build_app`).

    The policy table, the API-key digest and the tuning are the PolicyServer deployment's `user_config` in that
    file (the same shape `deploy_policies` writes); `args` is not used."""
    return PolicyServer.bind()


def _wait_controller_gone(limit_s: float = 60.0) -> None:
    # serve.shutdown() can return while the killed controller is still registered (slow with HAProxy);
    # a serve.start() meanwhile would attach to the dying one. The limit only keeps this from hanging.
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def leave_serving() -> None:
    """Disconnect from Ray if deploy_policies connected this process, leaving Serve running (a rollout)."""
    global _started_ray
    if _started_ray and ray.is_initialized():
        ray.shutdown()
    _started_ray = False


def shutdown_serving() -> None:
    """Stop Serve (and Ray, if serve_policies started it)."""
    global _serving_at, _started_ray
    if ray.is_initialized():
        serve.shutdown()
        if _started_ray:
            ray.shutdown()
        else:
            _wait_controller_gone()
    _serving_at = None
    _started_ray = False
