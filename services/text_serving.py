"""HTTP serving of text policies with optional guided decoding (GenARM P065, VAS P208).

Routes, under the mount prefix (TEXT_PREFIX = /v1/text next to the policies; every answer is JSON, every error
{"error": "..."} with a 4xx status):

    GET  /policies                     -> {"policies": [{"name", "task", "guide": {"kind", "strength", "top_k"}}]}
    POST /policies/{name}/generate     {"prompt": "307>", "guide"?: null | {"kind": "genarm" | "vas",
                                        "strength"?: number >= 0}, "temperature"?: number in [0, 10],
                                        "seed"?: integer >= 0}
                                       -> {"response": "703", "guide": {"kind", "strength"} | null}

A text policy is a run directory written by `algorithms.preference.guided_loop.save_guided_run`: the frozen
base LM and one guide, read from JSON + safetensors only (no pickle). Without "guide" the base is sampled as
is; with it, the base is decoded with its guide at "strength" (default: the run's). A guide of another kind
than the run's is a 422 (a run carries one guide). Temperature 0 is greedy decoding. Bodies are parsed with
json.loads only. `text_policies_app` wraps the app as a Serve app behind the policies' API key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlfleet.errors import UserError
from services.serving import _NAME_RE, HTTPError, _read_json_object, asgi_application

TEXT_PREFIX = "/v1/text"
PROMPT_CHARS = frozenset("0123456789>")
MAX_STRENGTH = 100.0  # far past any useful guidance; bounds the scores
MAX_TEMPERATURE = 10.0
_GENERATE_FIELDS = {"prompt", "guide", "temperature", "seed"}
_GUIDE_FIELDS = {"kind", "strength"}
_ROUTES = "GET /policies, POST /policies/<name>/generate"


def _number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise HTTPError(422, f'"{field}" must be a number in [{low:g}, {high:g}], got {json.dumps(value)}')
    return float(value)


class TextPolicy:
    """One served run: its GuidedRun, task and the longest prompt that leaves room for a full response."""

    def __init__(self, run: Any) -> None:
        from envs.text_tasks import make_task

        self.run = run
        self.task = make_task(run.task)
        positions = int(run.lm.get("n_positions", run.lm.get("max_position_embeddings", 32)))
        self.max_prompt_chars = positions - 1 - self.task.max_new_tokens  # bos + prompt + response must fit

    def describe(self, name: str) -> dict[str, Any]:
        return {"name": name, "task": self.run.task, "max_prompt_chars": self.max_prompt_chars,
                "guide": {"kind": self.run.kind, "strength": self.run.strength, "top_k": self.run.top_k}}

    def parse(self, body: dict[str, Any]) -> tuple[str, float | None, float, int]:
        """(prompt, guide strength or None, temperature, seed) from a request body, or a 422 saying why."""
        unknown = sorted(set(body) - _GENERATE_FIELDS)
        if unknown:
            raise HTTPError(422, f"unknown field(s) {unknown}; allowed: {sorted(_GENERATE_FIELDS)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not 1 <= len(prompt) <= self.max_prompt_chars:
            raise HTTPError(422, f'"prompt" must be a string of 1-{self.max_prompt_chars} characters, '
                                 f"got {json.dumps(prompt)[:80]}")
        bad = sorted(set(prompt) - PROMPT_CHARS)
        if bad:
            raise HTTPError(422, f'"prompt" may only hold digits and ">", got {json.dumps("".join(bad))}')
        strength = None
        guide = body.get("guide")
        if guide is not None:
            if not isinstance(guide, dict):
                raise HTTPError(422, f'"guide" must be null or an object like {{"kind": "{self.run.kind}", '
                                     f'"strength": 1.0}}, got {json.dumps(guide)[:80]}')
            unknown = sorted(set(guide) - _GUIDE_FIELDS)
            if unknown:
                raise HTTPError(422, f'unknown field(s) {unknown} in "guide"; allowed: {sorted(_GUIDE_FIELDS)}')
            if guide.get("kind") != self.run.kind:
                raise HTTPError(422, f'"guide.kind" must be "{self.run.kind}" (the guide this policy was trained '
                                     f"with), got {json.dumps(guide.get('kind'))}")
            strength = _number(guide.get("strength", self.run.strength), "guide.strength", 0.0, MAX_STRENGTH)
        temperature = _number(body.get("temperature", 1.0), "temperature", 0.0, MAX_TEMPERATURE)
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise HTTPError(422, f'"seed" must be an integer in [0, 2^63), got {json.dumps(seed)}')
        return prompt, strength, temperature, seed

    def generate(self, prompt: str, strength: float | None, temperature: float, seed: int) -> str:
        from algorithms.preference.generation import sample_texts

        model = self.run.base if strength is None else self.run.decoder(strength)
        return sample_texts(model, self.task, [prompt], temperature, torch.Generator().manual_seed(seed))[0]


def _json_errors(handler):  # noqa: ANN001, ANN202  (Starlette endpoint -> endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    return wrapped


def create_text_app(policies: Mapping[str, Any], prefix: str = "") -> Starlette:
    """The text-generation endpoint over {name: GuidedRun} as an ASGI app, routes under `prefix`."""
    served = {name: TextPolicy(run) for name, run in policies.items()}

    @_json_errors
    async def listing(request: Request) -> Response:
        return JSONResponse({"policies": [p.describe(name) for name, p in served.items()]})

    @_json_errors
    async def generate(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in served:
            raise HTTPError(404, f"unknown text policy {name!r}; known: {sorted(served)}")
        policy = served[name]
        prompt, strength, temperature, seed = policy.parse(await _read_json_object(request))
        response = await run_in_threadpool(policy.generate, prompt, strength, temperature, seed)
        guide = None if strength is None else {"kind": policy.run.kind, "strength": strength}
        return JSONResponse({"response": response, "guide": guide})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return JSONResponse({"error": f"method {request.method} not allowed on {request.url.path}"},
                                status_code=405, headers=exc.headers)
        return JSONResponse({"error": f"no such route: {request.method} {request.url.path}; routes: {_ROUTES}"},
                            status_code=exc.status_code)

    return Starlette(
        routes=[Route(f"{prefix}/policies", listing, methods=["GET"]),
                Route(f"{prefix}/policies/{{name:str}}/generate", generate, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
    )


def load_text_policies(policies: Mapping[str, str | Path]) -> dict[str, Any]:
    """{name: run dir} -> {name: GuidedRun}; a bad name or directory is a UserError."""
    from algorithms.preference.guided_loop import load_guided_run

    if not policies:
        raise UserError("no text policies to serve: give at least one name=run_dir")
    loaded = {}
    for name, path in policies.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise UserError(f"invalid text policy name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        try:
            loaded[name] = load_guided_run(path)
        except ValueError as exc:
            raise UserError(f"text policy {name!r}: {exc}") from None
    return loaded


def text_policies_app(policies: Mapping[str, str | Path], api_key: str | None = None) -> Any:
    """The text endpoint over {name: run dir} as an extra Serve app (mount at TEXT_PREFIX), behind the same API
    key as the policies. The directories are checked here; each replica loads them again from disk."""
    paths = {name: str(Path(path).resolve()) for name, path in policies.items()}
    load_text_policies(paths)  # a bad directory is a UserError now, not a replica crash-loop

    def build() -> Any:  # in the replica
        import torch as torch_

        from services.text_serving import create_text_app as create, load_text_policies as load

        torch_.set_num_threads(1)  # a tiny model per request: more threads only fight over the cores
        return create(load(paths))

    return asgi_application("TextPolicies", build, api_key)
