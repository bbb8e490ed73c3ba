"""Rolling a new checkpoint into a running server over real HTTP: no request fails, answers switch version."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from rlfleet.bench_serve import format_table, make_bench_checkpoint, run_serve_bench
from rlfleet.cli import main
from services.policy import LoadedPolicy
from services.serving import APP_NAME, deploy_policies, shutdown_serving

OBS = [[0.02 * i, -0.1 + 0.03 * i, 0.01 * (i % 5), 0.2 - 0.05 * i] for i in range(8)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hammer:
    """Clients that POST /act back to back until stopped, keeping every (status, answer) in order."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.answers: list[tuple[int, int, dict | str]] = []  # (observation index, status, body)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            i = seed
            while not self._stop.is_set():
                i = (i + 1) % len(OBS)
                try:
                    r = client.post("/v1/policies/cp/act", json={"observations": [OBS[i]]})
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
                    status = r.status_code
                except httpx.HTTPError as exc:  # a dropped connection counts as a failure too
                    status, body = -1, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.answers.append((i, status, body))

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for(self, predicate: Callable[[list], bool]) -> None:
        """Until predicate(answers so far) holds, or a request failed (then the asserts say which)."""
        while True:
            answers = self.snapshot()
            if predicate(answers) or any(status != 200 for _, status, _ in answers):
                return
            self._stop.wait(0.05)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.answers)


def _check_answers(answers: list, expected: dict[str, list]) -> list[str]:
    """Every answer is a 200 with the right action for its version; returns the versions in order."""
    failures = [(status, body) for _, status, body in answers if status != 200]
    assert not failures, f"{len(failures)} of {len(answers)} requests failed, e.g. {failures[:3]}"
    for i, _, body in answers:
        assert body["actions"] == [expected[body["version"]][i]], body
    return [body["version"] for _, _, body in answers]


def _expected(*checkpoints: Path) -> dict[str, list]:
    out = {}
    for version, ckpt in enumerate(checkpoints, start=1):
        policy = LoadedPolicy.from_checkpoint(ckpt)
        out[str(version)] = policy.act(policy.validate_observations(OBS), deterministic=True)
    return out


def _replicas_settled() -> bool:
    """Only the new replicas are left (the old ones have drained and stopped)."""
    deployment = serve.status().applications[APP_NAME].deployments["PolicyServer"]
    return set(deployment.replica_states) == {"RUNNING"}


@pytest.fixture(scope="module")
def checkpoints(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    # Three different weights for one CartPole policy (untrained, seeds 1-3: training adds nothing here).
    return tuple(make_bench_checkpoint(tmp_path_factory.mktemp(f"seed{seed}"), seed=seed) for seed in (1, 2, 3))


@pytest.fixture
def serving(ray_session: None) -> Iterator[None]:
    yield
    shutdown_serving()


def test_rollout_drops_no_request_and_switches_version(serving: None, checkpoints: tuple[Path, ...]) -> None:
    first, second, third = checkpoints
    expected = _expected(first, second, third)
    done = deploy_policies({"cp": first}, port=_free_port())
    assert done.started and done.versions == {"cp": "1"}
    with Hammer(done.url) as hammer:
        hammer.wait_for(lambda a: len(a) >= 20)
        rolled = deploy_policies({"cp": second})  # no host/port: into the running server
        assert not rolled.started and rolled.versions == {"cp": "2"} and rolled.url == done.url
        while not _replicas_settled() and all(status == 200 for _, status, _ in hammer.snapshot()):
            hammer.wait_for(lambda a, n=hammer.count(): len(a) > n)
        settled = hammer.count()
        hammer.wait_for(lambda a: len(a) >= settled + 40)
        answers = hammer.snapshot()
    versions = _check_answers(answers, expected)
    assert versions[0] == "1" and set(versions[settled:]) == {"2"}, "answers did not switch to the new version"
    assert versions.index("2") > 0  # requests were answered while the rollout went on

    # The CLI rolls into the server running in this Ray session, and returns at once.
    assert main(["serve", str(third), "--name", "cp"]) == 0
    with httpx.Client(base_url=done.url, timeout=60) as client:
        listed = client.get("/v1/policies").json()["policies"]
        assert [(p["version"], p["latest"]) for p in listed] == [("1", False), ("2", False), ("3", True)]
        r = client.post("/v1/policies/cp/versions/2/act", json={"observations": OBS})  # old versions still served
        assert r.json() == {"actions": expected["2"], "version": "2"}
        assert client.post("/v1/policies/cp/act", json={"observations": OBS}).json()["version"] == "3"
    # The same checkpoint again changes nothing; a taken version label is refused.
    assert deploy_policies({"cp": third}).versions == {"cp": "3"}
    assert main(["serve", str(first), "--name", "cp", "--version", "3"]) == 2


@pytest.mark.slow  # a second Ray cluster: about 4 minutes on a busy 2-core machine
def test_cli_server_in_its_own_cluster_takes_a_rollout_from_another_process(
    checkpoints: tuple[Path, ...], tmp_path: Path
) -> None:
    """`rlfleet serve` as users run it (its own Ray, HAProxy in front), rolled into by a second `rlfleet serve`."""
    first, second, _ = checkpoints
    expected = _expected(first, second)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "rlfleet.cli", "serve", str(first), "--name", "cp",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                              start_new_session=True)
    try:
        lines = []
        for line in server.stdout:  # the server prints how to roll into it, then blocks
            lines.append(line)
            if "RAY_ADDRESS=" in line:
                break
        address = re.search(r"RAY_ADDRESS=(\S+)", "".join(lines))
        assert address, f"no rollout hint from `rlfleet serve`: {lines} {log.seek(0) or log.read()[-2000:]}"
        url = f"http://127.0.0.1:{port}"
        with Hammer(url) as hammer:
            hammer.wait_for(lambda a: len(a) >= 20)
            rollout = subprocess.run([sys.executable, "-m", "rlfleet.cli", "serve", str(second), "--name", "cp"],
                                     capture_output=True, text=True, env={**env, "RAY_ADDRESS": address[1]})
            assert rollout.returncode == 0, rollout.stderr
            assert "rolled 'cp' version 2 into the server at" in rollout.stdout
            hammer.wait_for(lambda a: sum(1 for *_, b in a if isinstance(b, dict) and b.get("version") == "2") >= 40)
            answers = hammer.snapshot()
        versions = _check_answers(answers, expected)
        assert versions[0] == "1" and versions[-1] == "2"
        server.send_signal(signal.SIGINT)  # Ctrl-C: stops Serve and its Ray cluster
        assert server.wait(timeout=300) == 0  # the timeout only keeps a hang from lasting forever
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_bench_serve_measures_serve_and_the_bare_server(serving: None, checkpoints: tuple[Path, ...]) -> None:
    """`rlfleet bench serve`, briefly: both servers answer every request, and the ratios are printed."""
    result = run_serve_bench(str(checkpoints[0]), seconds=0.5, rounds=1, concurrency=(1, 4))
    assert {(r["server"], r["clients"]) for r in result["rows"]} == {(s, c) for s in ("bare", "serve") for c in (1, 4)}
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in result["rows"]), result["rows"]
    assert 0 < result["floor"]["p50_ms"] <= result["floor"]["p99_ms"]
    assert [e["clients"] for e in result["summary"]] == [1, 4]
    assert all(e["throughput_ratio"] > 0 and e["p50_ratio"] > 0 for e in result["summary"])
    table = format_table(result)
    assert "Serve/bare req/s" in table and "forward pass (floor)" in table
