"""`rlfleet submit/jobs/logs/stop` against a real multi-node Ray cluster started on this machine.

The cluster is `ray start --block` processes (a head with no CPUs, so all actors land on workers, and workers
with 1 CPU each), each node with its own temp dir and free ports, token auth on with a token made for this
cluster. Teardown ends exactly the processes that carry that token in their environment, never `ray stop`,
which would end other people's Ray instances on this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from rlfleet.cli import main

RAY = Path(sys.executable).parent / "ray"
STARTUP_LIMIT_S = 300  # only against a hang: node start-up takes 10-30 s on a loaded 2-core machine
JOB_LIMIT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    """Nodes start with SIGINT at its default, as on a real cluster: a shell that runs pytest in the background
    (`pytest &`) hands SIG_IGN down the whole tree, Python then never raises KeyboardInterrupt, and a stopped
    job could not save its checkpoint (unless `rlfleet train` restores SIGINT's handler itself)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check, limit_s: float = STARTUP_LIMIT_S, every_s: float = 0.5):
    """Poll `check` until it returns something truthy (a guard against hangs, not a speed requirement)."""
    end = time.monotonic() + limit_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {limit_s} s")
        time.sleep(every_s)


class LocalRayCluster:
    """A head and worker nodes as separate `ray start --block` process trees, with token auth."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the job runs `python`
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}  # name -> `ray start` process
        self.node_manager_ports: dict[str, int] = {}
        self.node_args: dict[str, list[str]] = {}
        self.restarts = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _start(self, name: str, args: list[str]) -> None:
        self.node_args[name] = args
        port = free_port()
        ports = ["--node-manager-port", str(port), "--object-manager-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--min-worker-port", "0", "--max-worker-port", "0"]
        with open(self.root / f"{name}.log", "a") as log:
            self.nodes[name] = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / name),
                 "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats", *ports, *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_default_sigint)
        self.node_manager_ports[name] = port

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        # Workers may join once the GCS listens; the dashboard comes up meanwhile (see wait_ready).
        wait_for("the head's GCS", lambda: self._started("head") and _listening(self.gcs_port))

    def add_worker(self, name: str, wait: bool = True) -> None:
        self._start(name, ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "1"])
        if wait:
            self.wait_ready(name)

    def wait_ready(self, *workers: str) -> None:
        wait_for("the job server", lambda: self._started("head") and self._answers())
        for name in workers:
            wait_for(f"node {name}", lambda: self._started(name) and self.node_id(name))

    def _started(self, name: str) -> bool:
        """False while a node starts; a node whose `ray start` gave up is started again (a few times).

        `ray start` gives a raylet 30 s (hard-coded) to register: on a machine shared by many test runs that
        can pass, and the node is simply started again.
        """
        if self.nodes[name].poll() is None:
            return True
        if self.restarts >= 3:
            raise AssertionError(f"`ray start` for {name} failed 3 times: see {self.root / name}.log")
        self.restarts += 1
        self._kill(self.root / name)
        self._start(name, self.node_args[name])
        return False

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/api/version", headers=self.headers, timeout=5).ok
        except requests.RequestException:
            return False

    def node_id(self, name: str) -> str | None:
        """The Ray node id of an alive node (matched by its node-manager port)."""
        answer = requests.get(f"{self.url}/nodes?view=summary", headers=self.headers, timeout=10).json()
        for node in answer["data"]["summary"]:
            raylet = node["raylet"]
            if raylet.get("nodeManagerPort") == self.node_manager_ports[name] and raylet.get("state") == "ALIVE":
                return raylet["nodeId"]
        return None

    def actors(self, class_part: str, submission_id: str) -> list[dict]:
        """A job's actors whose class name contains `class_part`, from the dashboard's state API."""
        job = requests.get(f"{self.url}/api/jobs/{submission_id}", headers=self.headers, timeout=10).json()
        answer = requests.get(f"{self.url}/api/v0/actors", params={"limit": 10000, "detail": "true"},
                              headers=self.headers, timeout=30).json()
        return [a for a in answer["data"]["result"]["result"]
                if class_part in a["class_name"] and a["job_id"] == job["job_id"]]

    def _processes(self, under: Path, by_token: bool) -> list[psutil.Process]:
        """Processes with files or arguments under `under` (each node logs into its own temp dir), and with
        `by_token`, any carrying this cluster's token: exactly ours, wherever they were reparented."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid():
                    continue
                inside = str(under) + os.sep
                args = proc.cmdline()
                if ((by_token and proc.environ().get("RAY_AUTH_TOKEN") == self.token)
                        or str(under) in args or inside in " ".join(args)
                        or any(f.path.startswith(inside) for f in proc.open_files())):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _kill(self, under: Path, by_token: bool = False) -> None:
        """SIGKILL, in rounds until none is left: a SIGTERMed raylet may respawn its agents before it goes."""
        for _ in range(10):
            procs = self._processes(under, by_token)
            if not procs:
                return
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=10)
        raise AssertionError(f"processes under {under} outlived 10 rounds of SIGKILL")

    def kill_node(self, name: str) -> None:
        """A node crash: its raylet, agents and workers all die at once."""
        self._kill(self.root / name)
        self.nodes[name].wait()

    def shutdown(self) -> None:
        self._kill(self.root, by_token=True)  # a test cluster holds nothing worth a graceful goodbye
        for popen in self.nodes.values():
            popen.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    root = Path(tempfile.mkdtemp(prefix="rlfleet-jobs-", dir="/tmp"))  # short: Ray's socket paths have a limit
    cluster = LocalRayCluster(root)
    try:
        cluster.start_head()
        cluster.add_worker("worker1", wait=False)
        cluster.wait_ready("worker1")
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def client_env(cluster: LocalRayCluster, monkeypatch: pytest.MonkeyPatch) -> LocalRayCluster:
    """The CLI's environment: the cluster's token, and RAY_ADDRESS as the default address."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    monkeypatch.setenv("RAY_ADDRESS", cluster.url)
    return cluster


def run_main(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse mistakes exit from inside parse_args
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def submit(capsys: pytest.CaptureFixture, runs_dir: Path, *args: str) -> tuple[str, str]:
    """`rlfleet submit` a tiny PPO run; returns the job id and what submit printed."""
    code, out, err = run_main(capsys, ["submit", *TINY_PPO, *args, "--runs-dir", str(runs_dir)])
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("submitted "))
    return line.split()[1], out


def last_record(run_dir: Path) -> tuple[dict, Path]:
    """The run's last metrics.jsonl line and the checkpoint of that iteration."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1], run_dir / "checkpoints" / f"iter_{records[-1]['iteration']:06d}"


def one_line_user_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


TINY_PPO = ["--algo", "ppo", "--env", "CartPole-v1", "--set", "train_batch_size=200", "--set", "num_epochs=1"]


def only_run_dir(runs_dir: Path) -> Path:
    run_dirs = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def test_submit_follow_and_list_a_training_job_on_two_nodes(client_env, capsys, tmp_path):
    cluster = client_env
    runs_dir = tmp_path / "runs"
    job_id, out = submit(capsys, runs_dir, "--steps", "200")
    assert job_id.startswith("rlfleet-ppo-cartpole-v1-s0-")
    assert f"rlfleet logs {job_id} --follow" in out

    code, out, err = run_main(capsys, ["logs", job_id, "--follow"])
    assert code == 0, out + err
    assert err.endswith(f"job {job_id}: SUCCEEDED")
    run_dir = only_run_dir(runs_dir)
    assert f"run directory: {run_dir}" in out  # the run's own summary came through the log stream
    assert "python -m rlfleet.cli train --algo ppo --env CartPole-v1" in out

    config = json.loads((run_dir / "config.json").read_text())
    assert (config["algo"], config["env"], config["stop_steps"]) == ("ppo", "CartPole-v1", 200)
    assert config["options"]["train_batch_size"] == 200 and config["options"]["num_epochs"] == 1
    record, checkpoint = last_record(run_dir)
    assert record["env_steps"] >= 200
    assert (checkpoint / "learner_group").is_dir(), sorted(p.name for p in run_dir.rglob("*"))
    assert f"checkpoint:    {checkpoint}" in out

    # The EnvRunner actor ran on the worker node: the head has no CPUs, so work really crossed nodes.
    runners = cluster.actors("EnvRunner", job_id)
    assert runners and {a["node_id"] for a in runners} == {cluster.node_id("worker1")}

    code, out, err = run_main(capsys, ["jobs", "--json"])
    assert code == 0, err
    row = next(r for r in json.loads(out) if r["id"] == job_id)
    assert row["status"] == "SUCCEEDED" and row["summary"] == "train ppo on CartPole-v1 (seed 0)"
    assert row["start"] != "-" and row["end"] != "-"
    code, out, err = run_main(capsys, ["jobs"])
    assert code == 0 and job_id in out and "SUCCEEDED" in out

    code, out, err = run_main(capsys, ["logs", job_id])  # without --follow: what the job printed
    assert code == 0 and f"run directory: {run_dir}" in out
    code, out, err = run_main(capsys, ["stop", job_id])
    assert code == 0 and "already ended (SUCCEEDED)" in out


@pytest.mark.parametrize("command", [["logs", "rlfleet-no-such-job"], ["logs", "rlfleet-no-such-job", "--follow"],
                                     ["stop", "rlfleet-no-such-job"]])
def test_unknown_job_id_is_one_line(client_env, capsys, command):
    code, _, err = run_main(capsys, command)
    one_line_user_error(code, err, "unknown job 'rlfleet-no-such-job' on http://127.0.0.1:")


def test_wrong_or_missing_token_is_one_line(client_env, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    code, _, err = run_main(capsys, ["jobs"])
    one_line_user_error(code, err, "refused the token from RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # nothing sent: the cluster still wants one
    code, _, err = run_main(capsys, ["jobs"])
    one_line_user_error(code, err, "wants a token and none was sent")


def test_token_from_a_token_file(client_env, capsys, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(client_env.token + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    code, out, err = run_main(capsys, ["jobs"])
    assert code == 0, err
    token_file.write_text("")
    code, _, err = run_main(capsys, ["jobs"])
    one_line_user_error(code, err, f"RAY_AUTH_TOKEN_PATH={token_file} cannot be read or is empty")


def test_unreachable_cluster_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _, err = run_main(capsys, ["jobs"])
    one_line_user_error(code, err, "no Ray cluster given: pass --address")
    port = free_port()  # nothing listens there
    for command in (["jobs"], ["logs", "x"], ["stop", "x"],
                    ["submit", *TINY_PPO, "--steps", "200", "--runs-dir", "/tmp/r"]):
        code, _, err = run_main(capsys, [*command, "--address", f"http://127.0.0.1:{port}"])
        one_line_user_error(code, err, f"cannot reach the Ray job server at http://127.0.0.1:{port} "
                                       "(connection refused)")


def test_an_http_server_that_is_not_ray_is_one_line(capsys):
    class NotRay(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, _, err = run_main(capsys, ["jobs", "--address", f"127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    one_line_user_error(code, err, "is not a Ray job server (GET /api/version answered HTTP 404)")


@pytest.mark.parametrize("argv, expected", [
    (["submit", *TINY_PPO], "give --steps, --stop-return or both"),
    (["submit", *TINY_PPO, "--steps", "100", "--runs-dir", "runs"], "is a path on the head node"),
    # TRPO's natural-gradient step is not a minibatch average: it offers no num_learners
    (["submit", "--algo", "trpo", "--env", "CartPole-v1", "--steps", "100", "--num-learners", "2"],
     "rule trpo has no option 'num_learners'"),
    (["submit", *TINY_PPO, "--steps", "100", "--num-env-runners", "-1"], "--num-env-runners must be >= 0"),
    (["submit", *TINY_PPO, "--steps", "100", "--num-env-runners", "2", "--set", "num_env_runners=3"], "disagree"),
    (["submit", *TINY_PPO, "--steps", "100", "--set", "lr=-1"], "lr=-1.0 is impossible"),
    (["submit", "--algo", "ppx", "--env", "CartPole-v1", "--steps", "100"], "unknown rule 'ppx'"),
    (["submit", "--algo", "ppo", "--env", "CartPol-v1", "--steps", "100"], "unknown env 'CartPol-v1'"),
    (["jobs", "--address", "auto"], "'auto' is not a job server address"),
])
def test_submit_mistakes_are_caught_before_any_upload(capsys, monkeypatch, argv, expected):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # nothing is contacted: the mistake is found first
    code, _, err = run_main(capsys, argv)
    one_line_user_error(code, err, expected)


def wait_for_first_iteration(runs_dir: Path) -> Path:
    """The run directory once its first training iteration is in metrics.jsonl."""
    def first() -> Path | None:
        for run_dir in runs_dir.glob("*/"):
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():
                return run_dir
        return None

    return wait_for("the job's first training iteration", first, limit_s=JOB_LIMIT_S, every_s=0.2)


@pytest.mark.slow
def test_job_survives_losing_the_worker_node_of_its_env_runner(client_env, capsys, tmp_path):
    """A node crash mid-run: Ray restarts the EnvRunner actor on the other worker, RLlib restores it
    (restart_failed_env_runners, on by default), and the job still reaches its step budget."""
    cluster = client_env
    if "worker2" not in cluster.nodes:
        cluster.add_worker("worker2")
    runs_dir = tmp_path / "runs"
    job_id, _ = submit(capsys, runs_dir, "--steps", "2000", "--num-env-runners", "1")
    run_dir = wait_for_first_iteration(runs_dir)

    [runner] = cluster.actors("EnvRunner", job_id)
    workers = {name: cluster.node_id(name) for name in ("worker1", "worker2")}
    victim = next(name for name, node in workers.items() if node == runner["node_id"])
    survivor = next(name for name in workers if name != victim)
    cluster.kill_node(victim)

    code, out, err = run_main(capsys, ["logs", job_id, "--follow"])
    assert code == 0, out + err
    assert err.endswith(f"job {job_id}: SUCCEEDED")
    [after] = [a for a in cluster.actors("EnvRunner", job_id) if a["actor_id"] == runner["actor_id"]]
    assert int(after["num_restarts"]) >= 1
    assert after["node_id"] == workers[survivor]  # restarted on the node that was left
    record, checkpoint = last_record(run_dir)
    assert record["env_steps"] >= 2000 and (checkpoint / "learner_group").is_dir()


@pytest.mark.slow
def test_stop_saves_a_final_checkpoint(client_env, capsys, tmp_path):
    runs_dir = tmp_path / "runs"
    job_id, _ = submit(capsys, runs_dir, "--steps", "10000000", "--checkpoint-every", "100000")
    run_dir = wait_for_first_iteration(runs_dir)
    code, out, err = run_main(capsys, ["stop", job_id])
    assert code == 0 and f"stopping {job_id}" in out, err
    code, out, err = run_main(capsys, ["logs", job_id, "--follow"])
    assert code == 1 and err.startswith(f"job {job_id}: STOPPED"), out + err
    assert "interrupted: saving a final checkpoint" in out
    _, checkpoint = last_record(run_dir)  # --checkpoint-every is out of reach: this one came from the stop
    assert (checkpoint / "learner_group").is_dir(), "SIGINT should have made `rlfleet train` save a checkpoint"


def test_upload_leaves_out_large_files_and_the_venv(tmp_path):
    from rlfleet.jobs import LARGE_FILE_BYTES, upload_excludes

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"\0" * LARGE_FILE_BYTES)
    (tmp_path / "small.py").write_text("x = 1\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "huge.so").write_bytes(b"\0" * LARGE_FILE_BYTES)  # excluded as a folder, not listed
    excludes, large = upload_excludes(tmp_path)
    assert large == [Path("data/big.bin")]
    assert "/data/big.bin" in excludes and ".venv/" in excludes and "runs/" in excludes and ".git/" in excludes


def test_entrypoint_quotes_words_and_expands_home_on_the_head():
    from rlfleet.jobs import TrainingRequest, default_working_dir, train_entrypoint

    request = TrainingRequest(algo="ppo", env_id="CartPole-v1", stop_steps=100, runs_dir="~/my runs",
                              overrides=(("hidden_sizes", "64,64"), ("activation", "tanh; rm -rf /")))
    entry = train_entrypoint(request)
    assert entry.startswith("python -m rlfleet.cli train --algo ppo --env CartPole-v1 --seed 0 ")
    assert "--set 'activation=tanh; rm -rf /'" in entry and entry.endswith("--runs-dir ~/'my runs'")
    assert (default_working_dir() / "rlfleet" / "cli.py").is_file()
