"""`rlfleet bench serve`: rlfleet's Ray Serve deployment against a bare FastAPI+uvicorn server, same run.

Both answer `POST .../act` with one CartPole observation by the same code: `services.policy.LoadedPolicy`
validates the observations and runs the forward pass. The bare server is one uvicorn process (uvloop,
httptools, no access log) with no batching. Serve is what `rlfleet serve` runs: the `PolicyServer` replica(s)
with request batching behind Ray 2.60's HAProxy + direct ingress (services.serving.FAST_SERVE_ENV; set
RAY_SERVE_THROUGHPUT_OPTIMIZED=0 RAY_SERVE_ENABLE_HA_PROXY=0 to measure Serve's Python HTTP proxy instead).
The floor is the forward pass alone (`LoadedPolicy.act` on one validated row).

The load generator is a small asyncio HTTP/1.1 client (keep-alive, one connection per client) in this
process: C clients each send a request, wait for the answer, and send the next. Each level runs in rounds,
bare then Serve back to back, so each Serve/bare ratio compares two measurements under the same load.

`run_serve_bench` prints nothing; `format_table` renders its result.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the (string) annotations of the route here
from fastapi.responses import JSONResponse

from rlfleet.errors import UserError

CONCURRENCY = (1, 16, 64)
OBSERVATION = [0.01, -0.02, 0.03, 0.04]
BARE_PATH = "/act"
# Settings `--sweep` compares (docs/bench-serve.md); the first is ServeTuning's default.
SWEEP = [
    {"max_batch_size": 64, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 256, "num_replicas": 1},
    {"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 256, "num_replicas": 1},
    {"max_batch_size": 64, "batch_wait_timeout_s": 0.002, "max_ongoing_requests": 256, "num_replicas": 1},
    {"max_batch_size": 64, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 5, "num_replicas": 1},
    {"max_batch_size": 64, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 256, "num_replicas": 2},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bench_checkpoint(root: Path, seed: int = 0) -> Path:
    """A run directory with an untrained stock-PPO CartPole checkpoint (same network as a trained one)."""
    from ray.rllib.algorithms.ppo import PPOConfig

    algo = PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=0).debugging(seed=seed).build_algo()
    try:
        algo.save_to_path(root / "checkpoints" / "iter_000000")
    finally:
        algo.stop()
    (root / "config.json").write_text(json.dumps({"algo": "ppo", "env": "CartPole-v1", "seed": 0, "options": {}}))
    return root


def forward_floor(checkpoint: Path, n: int = 3000) -> dict[str, float]:
    """p50/p99 of `LoadedPolicy.act` on one validated row, in ms, single-threaded like the servers."""
    import torch

    from services.policy import LoadedPolicy

    torch.set_num_threads(1)
    policy = LoadedPolicy.from_checkpoint(checkpoint)
    obs = policy.validate_observations([OBSERVATION])
    times = []
    for i in range(n + 200):
        start = time.perf_counter()
        policy.act(obs, True)
        if i >= 200:  # warm-up excluded
            times.append(time.perf_counter() - start)
    return {"p50_ms": _pct(times, 50) * 1e3, "p99_ms": _pct(times, 99) * 1e3}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# ---- the bare server (a subprocess: python -m rlfleet.bench_serve --bare CKPT PORT) ------------------


def _bare_app(checkpoint: str) -> Any:
    import torch
    from fastapi import FastAPI

    from services.policy import LoadedPolicy, ObservationError

    torch.set_num_threads(1)
    policy = LoadedPolicy.from_checkpoint(checkpoint)
    app = FastAPI()

    @app.post(BARE_PATH)
    async def act(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            obs = policy.validate_observations(body["observations"])
        except (ValueError, KeyError, TypeError, ObservationError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse({"actions": policy.act(obs, body.get("deterministic", True))})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


def _bare_main(checkpoint: str, port: int) -> None:
    import uvicorn

    uvicorn.run(_bare_app(checkpoint), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


class BareServer:
    """The bare FastAPI+uvicorn server in a subprocess; a context manager that always stops it."""

    def __init__(self, checkpoint: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rlfleet.bench_serve", "--bare", str(checkpoint), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def __enter__(self) -> BareServer:
        deadline = time.monotonic() + 120  # only prevents a hang: imports take a few seconds
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise UserError(f"the bare server exited: {self._proc.stderr.read().decode()[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise UserError("the bare server did not start within 120 s")

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ---- the load generator --------------------------------------------------------------------------


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """One request/answer on a keep-alive connection: (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    if length is None:
        raise ConnectionError("answer without content-length")
    return status, await reader.readexactly(length)


async def _client(host: str, port: int, request: bytes, stop_at: float, measure_from: float,
                  latencies: list[float], errors: list[str]) -> None:
    writer = None
    try:
        while (start := time.perf_counter()) < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status, body = await _exchange(reader, writer, request)
                failure = None if status == 200 else f"{status} {body[:120]!r}"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                failure = f"{type(exc).__name__}: {exc}"  # a dropped connection counts, then reconnect
                if writer is not None:
                    writer.close()
                writer = None
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)
                if failure:
                    errors.append(failure)
    finally:
        if writer is not None:
            writer.close()


def run_load(url: str, path: str, concurrency: int, seconds: float, warmup_s: float = 1.0,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
    """`concurrency` closed-loop clients for warmup_s + seconds; stats over the last `seconds`."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"observations": [OBSERVATION], "deterministic": True}).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[str] = []

    async def main() -> None:
        now = time.perf_counter()
        measure_from, stop_at = now + warmup_s, now + warmup_s + seconds
        await asyncio.gather(*(_client(host, int(port), request, stop_at, measure_from, latencies, errors)
                               for _ in range(concurrency)))

    asyncio.run(main())
    if not latencies:
        raise UserError(f"no answer from {url}{path} in {seconds} s")
    return {"clients": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "per_s": len(latencies) / seconds,
            "p50_ms": _pct(latencies, 50) * 1e3, "p99_ms": _pct(latencies, 99) * 1e3}


def _wait_ready(url: str, limit_s: float = 120.0) -> None:
    """Until the server answers /healthz (a new Serve app can take a moment to reach its HTTP front)."""
    import httpx

    deadline = time.monotonic() + limit_s  # only prevents a hang
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"{url} did not become ready within {limit_s:g} s")


# ---- the benchmark -------------------------------------------------------------------------------


def run_serve_bench(checkpoint: str | None = None, seconds: float = 3.0, rounds: int = 3, sweep: bool = False,
                    concurrency: tuple[int, ...] = CONCURRENCY) -> dict[str, Any]:
    """Measure the floor, then the bare server and Serve (default tuning, or every SWEEP setting) in one run.

    Every level runs `rounds` times, bare and Serve back to back, so each ratio is taken between two
    measurements made under the same machine load; the reported numbers are medians over the rounds.
    """
    import ray

    from cluster.local import ensure_ray
    from services.serving import ServeTuning, deploy_policies, prefer_fast_serve_env, running_config, shutdown_serving

    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds}")
    if rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {rounds}")
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        prefer_fast_serve_env()
    ensure_ray(num_cpus=min(2, os.cpu_count() or 2))
    if running_config() is not None:  # never roll a bench policy into (or shut down) a server someone uses
        raise UserError("a policy server already runs in this Ray cluster; run the bench on a cluster of its own")
    serve_env = {k: os.environ.get(k, "") for k in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY")}
    settings = SWEEP if sweep else [asdict(ServeTuning())]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-serve-") as tmp:
        ckpt = Path(checkpoint) if checkpoint else make_bench_checkpoint(Path(tmp))
        floor = forward_floor(ckpt)
        try:
            with BareServer(ckpt) as bare:
                port = _free_port()
                for i, setting in enumerate(settings):
                    url = deploy_policies({"bench": ckpt}, port=port, tuning=ServeTuning(**setting)).url
                    _wait_ready(url)
                    for r in range(rounds):
                        for c in concurrency:
                            rows.append({"server": "bare", "setting": i, "round": r,
                                         **run_load(bare.url, BARE_PATH, c, seconds)})
                            rows.append({"server": "serve", "setting": i, "round": r,
                                         **run_load(url, "/v1/policies/bench/act", c, seconds)})
        finally:
            shutdown_serving()
    return {"floor": floor, "settings": settings, "rows": rows, "summary": summarize(rows, settings),
            "seconds": seconds, "rounds": rounds, "cpus": os.cpu_count(), "serve_env": serve_env}


def summarize(rows: list[dict[str, Any]], settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and client count: medians over rounds, and the median of the per-round Serve/bare ratios."""
    out = []
    for i, setting in enumerate(settings):
        for c in sorted({r["clients"] for r in rows if r["setting"] == i}):
            pick = {s: [r for r in rows if (r["setting"], r["clients"], r["server"]) == (i, c, s)]
                    for s in ("bare", "serve")}
            pairs = list(zip(pick["bare"], pick["serve"]))
            entry: dict[str, Any] = {"setting": i, "tuning": setting, "clients": c,
                                     "errors": sum(r["errors"] for s in pick.values() for r in s)}
            for s, measured in pick.items():
                for key in ("per_s", "p50_ms", "p99_ms"):
                    entry[f"{s}_{key}"] = statistics.median(r[key] for r in measured)
            entry["throughput_ratio"] = statistics.median(sv["per_s"] / b["per_s"] for b, sv in pairs)
            entry["p50_ratio"] = statistics.median(sv["p50_ms"] / b["p50_ms"] for b, sv in pairs)
            out.append(entry)
    return out


def _tuning_label(t: dict[str, Any]) -> str:
    return (f"max_batch_size {t['max_batch_size']}, batch_wait {t['batch_wait_timeout_s'] * 1e3:g} ms, "
            f"max_ongoing_requests {t['max_ongoing_requests']}, replicas {t['num_replicas']}")


def format_table(result: dict[str, Any]) -> str:
    """The floor, then per Serve setting a row per client count: bare, Serve, and Serve/bare."""
    floor = result["floor"]
    env = ", ".join(f"{k}={v or 'unset'}" for k, v in result["serve_env"].items())
    lines = [
        f"forward pass (floor): p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms, one thread",
        f"medians of {result['rounds']} rounds x {result['seconds']:g} s per level; {result['cpus']} CPUs; {env}",
    ]
    setting = None
    for e in result["summary"]:
        if e["setting"] != setting:
            setting = e["setting"]
            lines += [f"Serve: {_tuning_label(e['tuning'])}",
                      f"{'clients':>7} | {'bare req/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'Serve req/s':>11} "
                      f"{'p50 ms':>7} {'p99 ms':>7} | {'Serve/bare req/s':>16} {'p50':>6} {'p50/floor':>9}"]
        lines.append(
            f"{e['clients']:>7} | {e['bare_per_s']:>10.0f} {e['bare_p50_ms']:>7.2f} {e['bare_p99_ms']:>7.2f} | "
            f"{e['serve_per_s']:>11.0f} {e['serve_p50_ms']:>7.2f} {e['serve_p99_ms']:>7.2f} | "
            f"{e['throughput_ratio']:>15.2f}x {e['p50_ratio']:>5.2f}x {e['serve_p50_ms'] / floor['p50_ms']:>8.0f}x"
            + (f"  ({e['errors']} failed requests)" if e["errors"] else "")
        )
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--bare":
    _bare_main(sys.argv[2], int(sys.argv[3]))
