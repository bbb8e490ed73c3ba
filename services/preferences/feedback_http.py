"""People in the loop: an HTTP endpoint that hands unlabelled pairs to a person and takes the label.

    GET  /v1/feedback/next[?judge=<name>]  -> 200 {"id", "prompt", "responses": [r0, r1], "policy_version",
                                                    "prompt_id"?, "meta"?, "lease_s"}
                                              204 (no body) when no pair awaits a label
    POST /v1/feedback/{id}  {"preferred": 0 | 1 | "tie", "judge": "<name>"?}
                                           -> 200 {"id", "preferred", "judge_id", "entry_id"}

A pair handed out by `next` is leased for `lease_s` seconds: nobody else gets it meanwhile; after
that it can be handed to the next person. The first label posted for a pair wins, leased or not.
Errors are JSON {"error": "..."}: 404 unknown pair id or route, 405 wrong method, 409 already
labelled, 413 body too large, 415 not `application/json`, 422 malformed body, 503 Redis unreachable.
Bodies are parsed with json.loads only. Judge ids are ``human`` or ``human:<name>``.

Mounting next to the policies (Ray Serve): `feedback_deployment(namespace)` returns a bound Serve
application; run it as its own Serve app under the feedback prefix, beside the policy app at "/":

    serve.run(feedback_deployment("run-42"), name="rlfleet-feedback", route_prefix="/v1/feedback")

Serve sends the longest matching prefix to each app, so /v1/feedback/* reaches this one and the rest
the policies. Outside Serve, `create_feedback_app(queue)` is a plain ASGI (Starlette) app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.preferences.errors import AlreadyLabelled, PairNotFound, RecordError
from services.preferences.queue import PreferenceQueue
from services.preferences.schema import ID_RE, JUDGE_RE, check_preferred

PREFIX = "/v1/feedback"
HTTP_CONSUMER = "http"  # every person's lease is held by this one consumer of the judges' group
MAX_BODY_BYTES = 64 * 1024
_POST_FIELDS = ("preferred", "judge")
_ROUTES = f"GET {PREFIX}/next, POST {PREFIX}/<id>"


class _Error(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _judge_id(name: Any) -> str:
    if name is None or name == "":
        return "human"
    judge = f"human:{name}" if isinstance(name, str) else ""
    if not JUDGE_RE.fullmatch(judge):
        raise _Error(422, f'"judge" must be 1-120 of A-Z a-z 0-9 _ . : @ + -, got {json.dumps(name)}')
    return judge


async def _read_label(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise _Error(415, f"Content-Type must be application/json, got {ctype or 'none'}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _Error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        obj = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise _Error(422, f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Error(422, f'request body must be a JSON object like {{"preferred": 0}}, got {type(obj).__name__}')
    unknown = sorted(set(obj) - set(_POST_FIELDS))
    if unknown:
        raise _Error(422, f"unknown field(s) {unknown}; allowed: {list(_POST_FIELDS)}")
    if "preferred" not in obj:
        raise _Error(422, 'missing field "preferred" (0, 1 or "tie")')
    try:
        check_preferred(obj["preferred"])
    except RecordError as exc:
        raise _Error(422, str(exc)) from None
    return obj


def _json_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except _Error as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except redis.RedisError as exc:  # the server is down or unreachable: not the client's fault
            return JSONResponse({"error": f"preference queue unavailable: {type(exc).__name__}"}, status_code=503)

    return wrapped


def create_feedback_app(queue: PreferenceQueue, *, lease_s: float = 300.0, prefix: str = PREFIX) -> Starlette:
    """The feedback endpoint for `queue` as an ASGI app, its routes under `prefix` ("" under Serve)."""
    if not lease_s > 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s!r}")

    @_json_errors
    async def next_pair(request: Request) -> Response:
        unknown = sorted(set(request.query_params) - {"judge"})
        if unknown:
            raise _Error(422, f"unknown query parameter(s) {unknown}; allowed: ['judge']")
        _judge_id(request.query_params.get("judge"))  # checked now, used when the label arrives
        pairs = await run_in_threadpool(queue.lease, HTTP_CONSUMER, 1, lease_s=lease_s)
        if not pairs:
            return Response(status_code=204)
        return JSONResponse(pairs[0].to_obj() | {"lease_s": lease_s})

    @_json_errors
    async def post_label(request: Request) -> Response:
        pair_id = request.path_params["pair_id"]
        if pair_id == "next":  # the other route's path: say so rather than look for a pair named "next"
            raise _Error(405, f"method POST not allowed on {request.url.path}; use GET", {"Allow": "GET"})
        if not ID_RE.fullmatch(pair_id):
            raise _Error(404, f"no pair {pair_id!r}: pair ids are 1-128 of A-Z a-z 0-9 _ . : -")
        body = await _read_label(request)
        judge = _judge_id(body.get("judge"))
        try:
            entry = await run_in_threadpool(queue.label, pair_id, body["preferred"], judge)
        except PairNotFound:
            raise _Error(404, f"no pair {pair_id!r} in this preference queue") from None
        except AlreadyLabelled:
            raise _Error(409, f"pair {pair_id!r} is already labelled (the first label wins)") from None
        return JSONResponse({"id": pair_id, "preferred": body["preferred"], "judge_id": judge, "entry_id": entry})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return JSONResponse(
                {"error": f"method {request.method} not allowed on {request.url.path}"},
                status_code=405,
                headers=exc.headers,
            )
        return JSONResponse(
            {"error": f"no such route: {request.method} {request.url.path}; routes: {_ROUTES}"},
            status_code=exc.status_code,
        )

    return Starlette(
        routes=[
            Route(f"{prefix}/next", next_pair, methods=["GET"]),
            Route(f"{prefix}/{{pair_id:str}}", post_label, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


class _FeedbackReplica:
    """A Serve replica: connects to Redis and builds the app when the replica starts (nothing pickled)."""

    def __init__(self, namespace: str, redis_url: str, lease_s: float) -> None:
        self._config = (namespace, redis_url, lease_s)

    def __serve_build_asgi_app__(self) -> Starlette:
        namespace, redis_url, lease_s = self._config
        queue = PreferenceQueue(redis.Redis.from_url(redis_url), namespace)
        return create_feedback_app(queue, lease_s=lease_s, prefix="")  # Serve strips the route prefix


def feedback_deployment(
    namespace: str, *, lease_s: float = 300.0, redis_url: str | None = None, num_replicas: int = 1
) -> Any:
    """A bound Ray Serve application serving the feedback endpoint of `namespace`'s queue. Redis is
    `redis_url`, else `REDIS_URL`, else this process's embedded server (its unix socket URL)."""
    from ray import serve

    from services.replay.connection import REDIS_URL_ENV, embedded_server

    url = redis_url or os.environ.get(REDIS_URL_ENV) or embedded_server().url
    PreferenceQueue(redis.Redis.from_url(url), namespace)  # fail here, not in a replica crash-loop
    deployment = serve.deployment(
        name="PreferenceFeedback",
        num_replicas=num_replicas,
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0},  # light I/O work: never starve training of a CPU
    )(serve.ingress()(_FeedbackReplica))
    return deployment.bind(namespace, url, lease_s)
