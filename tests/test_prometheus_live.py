"""A real Prometheus scrapes a real Ray cluster that trains, fills a replay table and a preference queue, and
serves a policy; every panel query of every Grafana dashboard (deploy/grafana/dashboards/) then returns data.

Two processes besides pytest:
- the cluster process (this file run as a script, `main()` below): an embedded Ray cluster with its dashboard
  (which writes Ray's Prometheus service-discovery file) and a fixed metrics export port; it trains PPO and DQN
  through `cluster.train.train`, drives a preference queue from a Ray actor, serves the PPO policy with Ray
  Serve and sends it good and bad HTTP requests, then prints READY and waits for its stdin to close;
- Debian's `prometheus` (installed with apt-get when missing), configured from deploy/prometheus/prometheus.yml
  with the paths and intervals of this test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SCRAPE_S = 2
# Template variables as Grafana sends them with "All" selected, and the interval macros as Grafana computes
# them for a 2 s step and a 2 s scrape interval ($__rate_interval = 4 x the scrape interval).
SUBSTITUTIONS = {"$__rate_interval": f"{4 * SCRAPE_S}s", "$__interval": f"{SCRAPE_S}s", "$__range": "1h"}
ALL = ".*"
STARTUP_LIMIT_S = 1200  # only keeps a broken cluster process from hanging; it takes 2-5 minutes on 2 shared cores


# ---- the cluster process ----------------------------------------------------------------------------------


def _traffic(url: str) -> dict[str, int]:
    """Concurrent good requests (so Serve batches them) and each kind of bad one; returns {status: count}."""
    from concurrent.futures import ThreadPoolExecutor

    obs = [[0.01, -0.02, 0.03, 0.04]]
    requests = [("POST", "/v1/policies/cartpole/act", json.dumps({"observations": obs * (1 + i % 3)}).encode())
                for i in range(48)]
    requests += [("POST", "/v1/policies/cartpole/value", json.dumps({"observations": obs}).encode())] * 8
    requests += [
        ("POST", "/v1/policies/cartpole/act", b"{not json"),                               # 400
        ("POST", "/v1/policies/nosuch/act", json.dumps({"observations": obs}).encode()),   # 404
        ("POST", "/v1/policies/cartpole/act", json.dumps({"observations": [[1.0]]}).encode()),  # 422
        ("GET", "/v1/policies", None),
        ("GET", "/healthz", None),
    ]

    def send(req: tuple[str, str, bytes | None]) -> int:
        method, path, body = req
        request = urllib.request.Request(url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, requests))
    return {str(s): statuses.count(s) for s in sorted(set(statuses))}


def _preference_owner(redis_url: str, namespace: str) -> Any:
    """A Ray actor owning a preference queue (like a learner): one round of add, label, read, reclaim, ack;
    then it exports the queue's metrics every second, as a long-running owner does, until it is killed."""
    import ray

    @ray.remote(num_cpus=0)
    class PreferenceOwner:
        def round_trip(self) -> dict[str, float]:
            import redis

            from services.preferences.metrics import PreferenceMetrics
            from services.preferences.queue import PreferenceQueue

            q = PreferenceQueue(redis.Redis.from_url(redis_url), namespace)
            ids = q.add([{"id": f"p{i}", "prompt": "2+2=", "responses": ["4", "5"], "policy_version": 1}
                         for i in range(6)])
            judge = q.judge("oracle")
            judge.label_many([(pair.pair_id, 0) for pair in judge.next(len(ids))])
            stalled, learner = q.learner("learner-a"), q.learner("learner-b")
            stalled.read(2)  # learner-a reads two pairs and never acks them
            used = learner.read(4)
            learner.ack(learner.claim(used))
            taken = learner.reclaim(2, min_idle_s=0)  # learner-b takes over what learner-a left
            learner.ack(learner.claim(taken))
            q.add([{"id": "p-pending", "prompt": "1+1=", "responses": ["2", "3"], "policy_version": 1}])
            self.metrics = PreferenceMetrics(q)
            values = self.metrics.export()
            threading.Thread(target=self._keep_exporting, daemon=True).start()
            return values

        def _keep_exporting(self) -> None:
            while True:
                time.sleep(1)
                self.metrics.export()

    return PreferenceOwner.remote()


def main(temp_dir: str, metrics_port: int, dashboard_port: int, serve_port: int, runs_dir: str) -> None:
    import logging

    import ray

    from cluster.local import quiet_ray_logs
    from cluster.train import train
    from services.replay.connection import embedded_server
    from services.serving import serve_policies, shutdown_serving

    quiet_ray_logs()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=dashboard_port,
             _temp_dir=temp_dir, _metrics_export_port=metrics_port, logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        ppo = train("ppo", "CartPole-v1", stop_steps=6 * 256, runs_dir=runs_dir, progress=False,
                    checkpoint_every=1,
                    overrides={"train_batch_size": "256", "minibatch_size": "128", "num_epochs": "1"})
        dqn = train("dqn", "CartPole-v1", stop_steps=600, runs_dir=runs_dir, progress=False, checkpoint_every=100,
                    overrides={"learning_starts": "100", "train_batch_size": "32"})
        owner = _preference_owner(embedded_server().url, "live-prefs")
        preference = ray.get(owner.round_trip.remote())
        url = serve_policies({"cartpole": ppo.run_dir}, "127.0.0.1", serve_port)
        statuses = []
        for _ in range(3):  # rounds a few scrapes apart: the rates over them are not zero
            statuses.append(_traffic(url))
            time.sleep(2 * SCRAPE_S)
        print("READY " + json.dumps({"ppo": ppo.run_dir.name, "dqn": dqn.run_dir.name,
                                     "preference": preference, "statuses": statuses}), flush=True)
        sys.stdin.read()  # until the test is done querying
        shutdown_serving()
    finally:
        ray.shutdown()


# ---- the test ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_binary() -> str:
    """Debian's prometheus; installed here when missing (needs root and apt, as in the CI image)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("prometheus is not installed and cannot be installed here: run `apt-get install -y prometheus`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)  # stale or missing package lists
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"apt-get install prometheus failed: {done.stderr.strip().splitlines()[-1:]}")
    found = shutil.which("prometheus")
    assert found, "apt-get installed prometheus but it is not on PATH"
    return found


def live_config(temp_dir: Path, targets_dir: Path, port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with this test's paths and a 2 s scrape interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"ray", "rlfleet-http", "prometheus"}
    [ray_sd] = jobs["ray"]["file_sd_configs"]
    assert ray_sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    ray_sd["files"] = [str(temp_dir / "prom_metrics_service_discovery.json")]
    [http_sd] = jobs["rlfleet-http"]["file_sd_configs"]
    http_sd["files"] = [str(targets_dir / "*.json")]
    for sd in (ray_sd, http_sd):
        sd["refresh_interval"] = f"{SCRAPE_S}s"
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    return config


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=60) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query (the latest values)."""
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """A range query, as Grafana sends for a panel whose time range is [start, end]."""
        return self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{SCRAPE_S}s")["result"]


def _lines(stream: Any, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], work: Path, port: int) -> Iterator[Prometheus]:
    """A real Prometheus with `config` on 127.0.0.1:`port`, stopped on exit."""
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(work / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [_prometheus_binary(), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/-/ready", timeout=5).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("prometheus did not start:\n" + (work / "prometheus.log").read_text()[-2000:])
                    time.sleep(0.2)
            yield Prometheus(url)
        finally:
            process.terminate()
            process.wait(timeout=60)


@contextlib.contextmanager
def cluster_process(temp_dir: Path, runs: Path, log_path: Path) -> Iterator[dict[str, Any]]:
    """The cluster process (main() below) until it printed READY; yields what it reported; stops it on exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "RLFLEET_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["RAY_metrics_report_interval_ms"] = "2000"  # Ray's agent exports every 2 s here (10 s by default)
    with open(log_path, "w") as log:
        cluster = subprocess.Popen(
            [sys.executable, __file__, str(temp_dir), str(_free_port()), str(_free_port()), str(_free_port()),
             str(runs)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(cluster.stdout, lines), daemon=True).start()
        try:
            deadline = time.monotonic() + STARTUP_LIMIT_S
            while True:
                try:
                    line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    pytest.fail(f"the cluster process ended or hung before READY:\n{log_path.read_text()[-3000:]}")
                if line.startswith("READY "):
                    break
            yield json.loads(line[len("READY "):])
        finally:
            if cluster.poll() is None:
                cluster.stdin.close()  # main() shuts Serve and Ray down and exits
                try:
                    cluster.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    cluster.kill()
                    cluster.wait()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Prometheus, dict[str, Any]]]:
    work = Path(tempfile.mkdtemp(prefix="rlfp", dir="/tmp"))  # short: Ray's socket paths live under it
    temp_dir, targets, runs = work / "ray", work / "targets", work / "runs"
    for d in (temp_dir, targets, runs):
        d.mkdir()
    shutil.copy(ROOT / "deploy" / "prometheus" / "targets" / "rlfleet-http.json", targets)
    port = _free_port()
    try:
        with running_prometheus(live_config(temp_dir, targets, port), work, port) as prometheus:
            started = time.time()
            with cluster_process(temp_dir, runs, work / "cluster.log") as ready:
                # Ray's agent exports every 2 s, Prometheus scrapes every 2 s: a few rounds bring the last values in.
                time.sleep(4 * SCRAPE_S + 2)
                ready["start"], ready["end"] = started, time.time()
                yield prometheus, ready
    finally:
        shutil.rmtree(work, ignore_errors=True)


def substitute(expr: str) -> str:
    for macro, value in SUBSTITUTIONS.items():
        expr = expr.replace(macro, value)
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", ALL, expr)  # every dashboard variable at "All"


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title / refId, PromQL) of every target of every panel."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, f"{panel['title']} / {target['refId']}", target["expr"]))
    return out


def test_promtool_accepts_the_configs(tmp_path: Path) -> None:
    """The shipped config, and the one the live test derives from it, are valid Prometheus configs."""
    promtool = Path(_prometheus_binary()).with_name("promtool")
    (tmp_path / "live.yml").write_text(yaml.safe_dump(live_config(tmp_path, tmp_path, 9090)))
    for path in (PROMETHEUS_CONFIG, tmp_path / "live.yml"):
        check = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """Prometheus's own parser accepts every panel and variable query (the data comes in the slow test below)."""
    port = _free_port()
    config = {"global": {"scrape_interval": "15s"}, "scrape_configs": []}
    with running_prometheus(config, tmp_path, port) as prometheus:
        bad = []
        for name, title, expr in panel_queries():
            try:
                prometheus.query(substitute(expr))
            except urllib.error.HTTPError as exc:  # 400 with Prometheus's parse error
                bad.append(f"{name}: {title}: {json.load(exc).get('error')}")
        assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_every_panel_query_returns_data(live: tuple[Prometheus, dict[str, Any]]) -> None:
    prometheus, ready = live
    up = prometheus.query('up{job="ray"}')
    assert up and all(s["value"][1] == "1" for s in up), up  # Ray's service-discovery file found every target
    queries = panel_queries()
    assert len(queries) >= 40 and len(DASHBOARDS) == 4
    empty = [
        f"{name}: {title}: {expr}" for name, title, expr in queries
        if not prometheus.query_range(substitute(expr), ready["start"], ready["end"])
    ]
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


@pytest.mark.slow
def test_values_are_those_of_the_run(live: tuple[Prometheus, dict[str, Any]]) -> None:
    prometheus, ready = live
    ppo, dqn = ready["ppo"], ready["dqn"]
    iterations = prometheus.query(f'max by (run_id) (ray_rlfleet_train_iterations_total{{run_id="{ppo}"}})')
    assert [float(s["value"][1]) for s in iterations] == [6.0]
    # A finished run's gauges went stale (cluster/metrics.py stops refreshing them): look back over the test.
    assert prometheus.query(f'max_over_time(ray_rlfleet_train_episode_return_mean_reward{{algo="ppo", '
                            f'env="CartPole-v1", run_id="{ppo}"}}[1h])')
    replay = prometheus.query(f'max(max_over_time(ray_rlfleet_replay_inserted_items{{namespace="{dqn}"}}[1h]))')
    assert replay and float(replay[0]["value"][1]) >= 100
    served = prometheus.query("sum by (status) (ray_rlfleet_serve_requests_total)")  # every route, every policy
    by_status = {s["metric"]["status"]: float(s["value"][1]) for s in served}
    sent: dict[str, int] = {}
    for round_ in ready["statuses"]:
        for status, count in round_.items():
            sent[status] = sent.get(status, 0) + count
    assert by_status == sent, "Serve's request counter differs from the answers the client got"
    acked = prometheus.query('max(ray_rlfleet_preference_pairs_acked_total{namespace="live-prefs"})')
    assert acked and float(acked[0]["value"][1]) == ready["preference"]["rlfleet_preference_pairs_acked_total"]


@pytest.mark.slow
def test_template_variables_find_values(live: tuple[Prometheus, dict[str, Any]]) -> None:
    prometheus, _ = live
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            match = re.fullmatch(r"label_values\((?:(.+), )?(\w+)\)", var["query"]["query"])
            assert match, var
            selector, label = match.groups()
            if selector is None:
                values = prometheus.get(f"/api/v1/label/{label}/values")
            else:
                values = prometheus.query(f"count by ({label}) ({substitute(selector)})")
            assert values, f"{path.name}: variable {var['name']} has no values"


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
