"""Training runs as Ray Jobs: submit `rlfleet train` to a cluster's job server, list, follow and stop jobs.

The job server is the head node's dashboard (http://HEAD:8265). The project travels with each job as the
runtime environment's working_dir; the job's driver runs on the head node, so its run directory lands there
(under `--runs-dir`, ~/rlfleet/runs by default: point it at a shared volume on a real cluster).

Ray 2.60 token auth: the token comes from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token (Ray's own order); it is sent as `Authorization: Bearer <token>` unless RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rlfleet.errors import UserError

PROBE_TIMEOUT_S = 10.0  # a black-holed address must not hang the CLI for minutes
DEFAULT_RUNS_DIR = "~/rlfleet/runs"  # on the head node; `~` is expanded by the job's shell there
# Never uploaded: the venv, the git store, local runs, caches. Ray also honours the project's .gitignore.
UPLOAD_EXCLUDES = [".venv/", ".git/", "runs/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/"]
UPLOAD_SKIP_DIRS = {p.rstrip("/") for p in UPLOAD_EXCLUDES if "*" not in p}  # not searched for large files
LARGE_FILE_BYTES = 10 * 1024**2  # files this big stay home (Ray warns at this size; its package limit is ~500 MiB)
# `rlfleet stop` sends SIGINT, which `rlfleet train` answers by saving a final checkpoint; give it time to.
# Ray's default is 3 s before SIGKILL; saving took 60 s on a 2-core machine under heavy load.
STOP_ENV_VARS = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "300"}
# `--num-learners` etc. are rule options like any `--set`: the flag names the option it sets.
RESOURCE_OPTIONS = {"num_env_runners": "--num-env-runners", "num_learners": "--num-learners",
                    "num_gpus_per_learner": "--gpus-per-learner"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Cluster:
    """A connected job server: the Ray client plus the URL, for messages."""

    client: Any  # ray.job_submission.JobSubmissionClient
    url: str


# ---- address and token ---------------------------------------------------------------------------------------

def job_server_url(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS, as an http(s) URL of the job server."""
    raw = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not raw:
        raise UserError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    url = raw if "://" in raw else f"http://{raw}"
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https") or raw == "auto":
        raise UserError(f"{raw!r} is not a job server address: give the head node's dashboard, "
                        "e.g. http://HEAD:8265")
    return url.rstrip("/")


def auth_token() -> tuple[str | None, str]:
    """The cluster token and where it came from (Ray's order), or (None, why not)."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_text = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_text:
        token = _read_token(Path(path_text).expanduser())
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_text} cannot be read or is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path_text}"
    default = Path.home() / ".ray" / "auth_token"
    token = _read_token(default)
    return (token, str(default)) if token else (None, f"no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {default}")


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


_TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token; "
               "`ray get-auth-token` on the head node prints it")


def _refusal(url: str, status: int, token_source: str) -> str:
    if status == 401:
        return f"the Ray cluster at {url} wants a token and none was sent ({token_source}): {_TOKEN_HELP}"
    return f"the Ray cluster at {url} refused the token from {token_source}: {_TOKEN_HELP}"


def _unreachable(url: str, exc: Exception) -> str:
    text = str(exc)
    if "refused" in text.lower():
        why = "connection refused"
    elif "resolve" in text.lower() or "name or service" in text.lower():
        why = "unknown host"
    elif "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        why = f"no answer within {PROBE_TIMEOUT_S:g} s"
    else:
        why = "no connection"
    return (f"cannot reach the Ray job server at {url} ({why}): is the cluster up, and is this the head node's "
            "dashboard port (8265 by default)?")


def connect(address: str | None) -> Cluster:
    """Check the job server answers (with the token) before Ray's client, whose checks have no timeout."""
    import requests

    url = job_server_url(address)
    token, source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.InvalidURL as exc:
        raise UserError(f"bad job server address {url!r}: {exc}") from None
    except requests.exceptions.RequestException as exc:
        raise UserError(_unreachable(url, exc)) from None
    if answer.status_code in (401, 403):
        raise UserError(_refusal(url, answer.status_code, source))
    try:
        version = answer.json()["ray_version"] if answer.ok else None
    except (ValueError, KeyError, TypeError):
        version = None
    if version is None:
        raise UserError(f"{url} is not a Ray job server (GET /api/version answered HTTP {answer.status_code}): "
                        "give the head node's dashboard address, e.g. http://HEAD:8265")
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK pins its loggers to INFO ("Uploading package ...", "WebSocket closed ..."): the CLI says less.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with job_server_errors(url, token_source=source):
        return Cluster(JobSubmissionClient(url, headers=headers), url)


@contextmanager
def job_server_errors(url: str, job_id: str | None = None, token_source: str = "") -> Iterator[None]:
    """Ray's client raises RuntimeError/ConnectionError with HTTP bodies; turn them into one line each."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        status = 401 if "required" in str(exc).lower() else 403
        raise UserError(_refusal(url, status, token_source or auth_token()[1])) from None
    except (requests.exceptions.ConnectionError, ConnectionError, aiohttp.ClientConnectionError) as exc:
        raise UserError(_unreachable(url, exc)) from None
    except aiohttp.ClientResponseError as exc:  # the log stream's websocket handshake was turned down
        raise UserError(f"the job server at {url} refused the log stream: HTTP {exc.status} {exc.message}") from None
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if job_id is not None and "status code 404" in text:
            raise UserError(f"unknown job {job_id!r} on {url}; `rlfleet jobs` lists them") from None
        if "WebSocket" in text:
            raise UserError(f"lost the log stream from {url} ({text[:200]}); the job goes on: "
                            f"`rlfleet logs {job_id} --follow` picks it up again") from None
        raise UserError(f"the job server at {url} refused: {text[:300]}") from None


# ---- submit ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingRequest:
    algo: str
    env_id: str
    seed: int = 0
    stop_steps: int | None = None
    stop_return: float | None = None
    overrides: tuple[tuple[str, str], ...] = ()  # (option, text) as `--set` gives them
    checkpoint_every: int = 10
    runs_dir: str = DEFAULT_RUNS_DIR


def with_resources(overrides: dict[str, str], num_env_runners: int | None, num_learners: int | None,
                   gpus_per_learner: float | None) -> dict[str, str]:
    """`--set` options plus the resource flags, each of which names a rule option."""
    merged = dict(overrides)
    for name, value in (("num_env_runners", num_env_runners), ("num_learners", num_learners),
                        ("num_gpus_per_learner", gpus_per_learner)):
        if value is None:
            continue
        if value < 0:
            raise UserError(f"{RESOURCE_OPTIONS[name]} must be >= 0, got {value:g}")
        text = str(int(value)) if float(value).is_integer() else str(value)
        if name in merged and merged[name] != text:
            raise UserError(f"{RESOURCE_OPTIONS[name]} {text} and --set {name}={merged[name]} disagree: give one")
        merged[name] = text
    return merged


def check_request(request: TrainingRequest) -> None:
    """Everything `rlfleet train` would reject, rejected here, before anything is uploaded."""
    from algorithms.registry import build_config, get_rule
    from cluster.train import check_stop_values
    from envs import ensure_env

    if request.stop_steps is None and request.stop_return is None:
        raise UserError("give --steps, --stop-return or both, so the job has an end")
    check_stop_values(request.stop_return, request.stop_steps, request.checkpoint_every)
    if not (request.runs_dir.startswith("~/") or os.path.isabs(request.runs_dir)):
        raise UserError(f"--runs-dir {request.runs_dir!r} is a path on the head node: give it absolute or "
                        "starting with ~/")
    rule = get_rule(request.algo)
    missing = [name for name, _ in request.overrides if name in RESOURCE_OPTIONS and name not in rule.option_names()]
    if missing:
        flag = RESOURCE_OPTIONS[missing[0]]
        raise UserError(f"{flag}: rule {rule.name} has no option {missing[0]!r}; its options: "
                        f"{', '.join(rule.option_names())}")
    ensure_env(request.env_id)
    build_config(rule, request.env_id, request.seed, dict(request.overrides))


def _shell_path(path: str) -> str:
    """Quote a path for the job's shell, leaving a leading `~/` to be expanded on the head node."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def train_entrypoint(request: TrainingRequest) -> str:
    """The job's shell command: `rlfleet train` from the uploaded project, without a progress bar."""
    words = ["python", "-m", "rlfleet.cli", "train", "--algo", request.algo, "--env", request.env_id,
             "--seed", str(request.seed), "--checkpoint-every", str(request.checkpoint_every), "--no-progress"]
    if request.stop_steps is not None:
        words += ["--stop-steps", str(request.stop_steps)]
    if request.stop_return is not None:
        words += ["--stop-return", repr(request.stop_return)]
    for name, value in request.overrides:
        words += ["--set", f"{name}={value}"]
    return " ".join(shlex.quote(w) for w in words) + " --runs-dir " + _shell_path(request.runs_dir)


def upload_excludes(working_dir: Path) -> tuple[list[str], list[Path]]:
    """Ray's exclude patterns for the upload, and the large files they leave out (relative paths)."""
    large: list[Path] = []
    for root, dirs, files in os.walk(working_dir):
        dirs[:] = [d for d in dirs if d not in UPLOAD_SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            try:
                if path.is_file() and path.stat().st_size >= LARGE_FILE_BYTES:
                    large.append(path.relative_to(working_dir))
            except OSError:
                continue
    # A leading slash anchors a gitignore pattern at the working_dir root.
    return UPLOAD_EXCLUDES + [f"/{p.as_posix()}" for p in large], large


def default_working_dir() -> Path:
    """The project this rlfleet was loaded from (it holds rlfleet/, algorithms/, cluster/ ...)."""
    return Path(__file__).resolve().parent.parent


def submission_id(request: TrainingRequest) -> str:
    """A readable, unique, URL-safe job id: rlfleet-<rule>-<env>-s<seed>-<time>-<random>."""
    stem = re.sub(r"[^a-z0-9_.-]+", "-", f"{request.algo}-{request.env_id}".lower()).strip("-")
    return f"rlfleet-{stem}-s{request.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(cluster: Cluster, request: TrainingRequest, working_dir: Path) -> tuple[str, list[Path]]:
    """Submit the run; returns the job id and the large files left out of the upload."""
    working_dir = working_dir.expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {working_dir} is not a directory")
    excludes, large = upload_excludes(working_dir)
    runtime_env = {"working_dir": str(working_dir), "excludes": excludes, "env_vars": dict(STOP_ENV_VARS)}
    metadata = {"rlfleet_algo": request.algo, "rlfleet_env": request.env_id, "rlfleet_seed": str(request.seed),
                "rlfleet_runs_dir": request.runs_dir}
    job_id = submission_id(request)
    try:
        with job_server_errors(cluster.url):
            cluster.client.submit_job(entrypoint=train_entrypoint(request), submission_id=job_id,
                                      runtime_env=runtime_env, metadata=metadata)
    except ValueError as exc:  # Ray's packaging: e.g. the working_dir is over its size limit
        raise UserError(f"cannot package {working_dir} for the job: {' '.join(str(exc).split())[:300]}") from None
    return job_id, large


# ---- list, logs, stop -----------------------------------------------------------------------------------------

def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def _summary(job: Any) -> str:
    meta = job.metadata or {}
    if "rlfleet_algo" in meta:
        return f"train {meta['rlfleet_algo']} on {meta['rlfleet_env']} (seed {meta.get('rlfleet_seed', '?')})"
    entry = " ".join((job.entrypoint or "(driver)").split())
    return entry if len(entry) <= 60 else entry[:57] + "..."


def list_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first: id, status, summary, start and end times."""
    with job_server_errors(cluster.url):
        jobs = sorted(cluster.client.list_jobs(), key=lambda job: job.start_time or 0)
    return [{"id": job.submission_id or job.job_id, "status": _status(job), "summary": _summary(job),
             "start": _when(job.start_time), "end": _when(job.end_time), "message": job.message or ""}
            for job in jobs]


def format_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs on this cluster"
    width = max(len(r["id"]) for r in rows)
    lines = [f"{'ID':<{width}}  {'STATUS':<9}  {'START':<19}  {'END':<19}  WHAT"]
    lines += [f"{r['id']:<{width}}  {r['status']:<9}  {r['start']:<19}  {r['end']:<19}  {r['summary']}" for r in rows]
    return "\n".join(lines)


def job_status(cluster: Cluster, job_id: str) -> tuple[str, str]:
    """(status, message) of a job; an unknown id is a UserError."""
    with job_server_errors(cluster.url, job_id):
        info = cluster.client.get_job_info(job_id)
    return _status(info), info.message or ""


def print_logs(cluster: Cluster, job_id: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    job_status(cluster, job_id)  # an unknown id gets its own line, not an HTTP body
    with job_server_errors(cluster.url, job_id):
        out.write(cluster.client.get_job_logs(job_id))
    out.flush()


def follow_logs(cluster: Cluster, job_id: str, out: TextIO | None = None) -> tuple[str, str]:
    """Stream the job's output until it ends; returns its final (status, message)."""
    out = out or sys.stdout
    job_status(cluster, job_id)

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with job_server_errors(cluster.url, job_id):
        asyncio.run(tail())
    # The stream closes when the job ends; the status can trail it by a moment.
    status, message = job_status(cluster, job_id)
    for _ in range(50):
        if status in TERMINAL:
            break
        time.sleep(0.2)
        status, message = job_status(cluster, job_id)
    return status, message


def stop_job(cluster: Cluster, job_id: str) -> tuple[bool, str]:
    """Ask the job to stop (SIGINT: the run saves a final checkpoint). Returns (was running, status)."""
    status, _ = job_status(cluster, job_id)
    if status in TERMINAL:
        return False, status
    with job_server_errors(cluster.url, job_id):
        stopped = cluster.client.stop_job(job_id)
    return stopped, status
