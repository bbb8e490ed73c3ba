"""The deployment assets hold together: docker-compose.yml, deploy/prometheus, deploy/grafana, deploy/k8s.

No Docker engine or Kubernetes runs here, so these are structural checks against the files and the code they
name: services and pinned images, the workers dialling the head's address, mounts pointing at files that exist,
Prometheus reading the volume the head writes Ray's service-discovery file to, dashboards with unique ids, the
provisioned datasource and units, metric names the code exports, KubeRay manifests with rlfleet entrypoints.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
RAY_NODES = ("ray-head", "ray-worker-1", "ray-worker-2")
PINNED = re.compile(r"^[a-z0-9][\w./-]*:v?\d+\.\d+(\.\d+)?[\w.+-]*$")  # a version tag, never latest
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S = {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def flags(command: str | list[str]) -> dict[str, str]:
    """`--name=value` / `--name value` / bare `--name` options of a command line."""
    if isinstance(command, str):
        # Keep compose's ${VAR:?message} references whole: their messages contain spaces.
        refs = re.findall(r"\$\{[^}]*\}", command)
        for i, ref in enumerate(refs):
            command = command.replace(ref, f"@ref{i}@", 1)
        args = [re.sub(r"@ref(\d+)@", lambda m: refs[int(m.group(1))], a) for a in shlex.split(command)]
    else:
        args = list(command)
    out: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
            out[name] = value
    return out


def mounts(service: str) -> dict[str, str]:
    """{container path: source} of a compose service's volumes (short syntax)."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


# ---- docker-compose.yml -------------------------------------------------------------------------------------


def test_compose_has_the_services_and_pins_every_image() -> None:
    assert set(SERVICES) == {*RAY_NODES, "redis", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        assert PINNED.match(service["image"]), f"{name}: image {service['image']!r} is not pinned to a version"
    dockerfile = ROOT / SERVICES["ray-head"]["build"]["dockerfile"]
    base = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-cpu"  # the Ray the project pins, its Python
    assert f"ray{ray.__version__}" in SERVICES["ray-head"]["image"]
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", dockerfile.read_text(), re.M):
        assert (ROOT / line).exists(), f"the Dockerfile copies {line}, which does not exist"
    assert {SERVICES[n]["image"] for n in RAY_NODES} == {SERVICES["ray-head"]["image"]}  # one image for all nodes


def test_workers_join_the_head() -> None:
    head = flags(SERVICES["ray-head"]["command"])
    assert "head" in head and head["port"] and head["metrics-export-port"]
    head_host = SERVICES["ray-head"].get("hostname", "ray-head")
    assert head_host == "ray-head"  # a service name: resolvable on the compose network
    for worker in ("ray-worker-1", "ray-worker-2"):
        opts = flags(SERVICES[worker]["command"])
        assert opts["address"] == f"{head_host}:{head['port']}", worker
        assert opts["metrics-export-port"] == head["metrics-export-port"]
        assert "block" in opts and "head" not in opts
        assert "ray-head" in SERVICES[worker]["depends_on"]
    for node in RAY_NODES:
        env = SERVICES[node]["environment"]
        assert env["RAY_ADDRESS"] == f"{head_host}:{head['port']}"
        assert env["RLFLEET_API_KEY"].startswith("${RLFLEET_API_KEY:?")  # required, never a default
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_redis_is_persistent_and_password_protected() -> None:
    redis = SERVICES["redis"]
    opts = flags(redis["command"])
    assert opts["appendonly"] == "yes"
    password = opts["requirepass"]
    assert password.startswith("${REDIS_PASSWORD:?")
    assert mounts("redis")["/data"] in COMPOSE["volumes"]
    for node in RAY_NODES:
        url = SERVICES[node]["environment"]["REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0", node
    assert "redis" in SERVICES["ray-worker-1"]["depends_on"]


def test_bind_mounts_point_at_files_that_exist_and_volumes_are_declared() -> None:
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} is not declared"


def test_prometheus_reads_the_heads_service_discovery_file() -> None:
    prom = mounts("prometheus")
    config_path = flags(SERVICES["prometheus"]["command"])["config.file"]
    assert (ROOT / prom[config_path]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [sd_file] = jobs["ray"]["file_sd_configs"][0]["files"]
    assert Path(sd_file).name == "prom_metrics_service_discovery.json"
    # The directory Prometheus reads it from is the volume the head uses as Ray's temp dir.
    sd_dir = str(Path(sd_file).parent)
    head_temp = flags(SERVICES["ray-head"]["command"])["temp-dir"]
    assert prom[sd_dir] == mounts("ray-head")[head_temp]
    assert SERVICES["prometheus"]["volumes"][[v.split(":")[1] for v in SERVICES["prometheus"]["volumes"]].index(
        sd_dir)].endswith(":ro")
    [http_glob] = jobs["rlfleet-http"]["file_sd_configs"][0]["files"]
    targets_dir = str(Path(http_glob).parent)
    for path in (ROOT / prom[targets_dir]).glob(Path(http_glob).name):
        assert isinstance(json.loads(path.read_text()), list)  # file_sd format


def test_grafana_is_provisioned_from_deploy() -> None:
    graf = mounts("grafana")
    provisioning = ROOT / graf["/etc/grafana/provisioning"]
    assert provisioning.resolve() == DEPLOY / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{SERVICES['prometheus']['ports'][0].split(':')[1]}"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "rlfleet.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (ROOT / graf[dashboards_dir]).resolve() == DEPLOY / "grafana" / "dashboards"
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).relative_to(dashboards_dir)).exists()
    for panel in (p for path in DASHBOARD_FILES for p in json.loads(path.read_text())["panels"]):
        assert panel["datasource"]["uid"] == datasource["uid"]


# ---- dashboards ---------------------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every metric name the code exports, as Prometheus stores it (Ray's prefix, histogram/counter series)."""
    from cluster.metrics import COUNTERS, GAUGES, ITERATION_HISTOGRAM
    from services.replay.metrics import METRICS as REPLAY

    names = {*GAUGES, *COUNTERS, *REPLAY}
    serve_histograms = {"rlfleet_serve_request_latency_seconds", "rlfleet_serve_batch_size_observations"}
    serving = (ROOT / "services" / "serving.py").read_text()  # its metrics are made inside the replica
    for name in (*serve_histograms, "rlfleet_serve_requests_total"):
        assert f'"{name}"' in serving, f"services/serving.py no longer exports {name}"
    names.add("rlfleet_serve_requests_total")
    histograms = {ITERATION_HISTOGRAM, *serve_histograms}
    from services.preferences.metrics import COUNTER_METRICS, PENDING

    names |= {PENDING, *COUNTER_METRICS}
    names |= {f"{h}_{suffix}" for h in histograms for suffix in ("bucket", "sum", "count")}
    return {"ray_" + n for n in names}


def test_dashboards_are_generated_from_the_script() -> None:
    check = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "build_dashboards.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert {p.stem for p in DASHBOARD_FILES} == {"training-overview", "actors-learners", "replay-queues", "serving"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    board = json.loads(path.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "panel ids must be unique integers"
    occupied: set[tuple[int, int]] = set()
    known = exported_metric_names()
    for panel in panels:
        where = f"{path.name}: {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "rlfleet-prometheus"}, where
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert isinstance(unit, str) and unit.strip(), f"{where} has no unit"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        cells = {(x, y) for x in xs for y in ys}
        assert not cells & occupied, f"{where} overlaps another panel"
        occupied |= cells
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip() and target["legendFormat"], where
            for name in re.findall(r"\bray_rlfleet_\w+", target["expr"]):
                assert name in known, f"{where} queries {name}, which no rlfleet code exports"
    variables = board["templating"]["list"]
    for var in variables:
        assert var["datasource"]["uid"] == "rlfleet-prometheus"
    used = set(re.findall(r"\$(\w+)", json.dumps([t["expr"] for p in panels for t in p["targets"]])))
    assert used - {"__rate_interval"} <= {v["name"] for v in variables}, f"{path.name}: undefined variables"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARD_FILES]
    assert len(uids) == len(set(uids))


# ---- deploy/k8s ---------------------------------------------------------------------------------------------


def ray_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_ray_cluster(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    for container in ray_containers(spec):
        assert container["image"] == SERVICES["ray-head"]["image"], where  # the compose image, same tag
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080", where  # Prometheus scrapes it
    claims = {v["persistentVolumeClaim"]["claimName"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for v in g["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    assert claims <= {d["metadata"]["name"] for d in K8S["rlfleet-runs-pvc.yaml"]}, where
    secrets = {d["metadata"]["name"]: d["stringData"] for d in K8S["secrets.example.yaml"]}
    for container in ray_containers(spec):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], f"{where}: secret {ref} does not exist"


# Spec fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go): a typo would be dropped silently.
RAYJOB_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                 "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
                 "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                 "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYSERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                     "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc"}
GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
                "template", "scaleStrategy", "suspend", "numOfHosts", "serviceType", "headService", "enableIngress"}


def test_k8s_manifests_parse_with_kuberay_kinds() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for docs in K8S.values() for d in docs}
    assert ("ray.io/v1", "RayJob") in kinds and ("ray.io/v1", "RayService") in kinds
    [job], [service] = K8S["rayjob-train.yaml"], K8S["rayservice-serve.yaml"]
    assert set(job["spec"]) <= RAYJOB_FIELDS and set(service["spec"]) <= RAYSERVICE_FIELDS
    for spec in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert set(group) <= GROUP_FIELDS, set(group) - GROUP_FIELDS
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # a map of strings


def test_rayjob_runs_rlfleet_train() -> None:
    from rlfleet.cli import build_parser

    [job] = K8S["rayjob-train.yaml"]
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["rlfleet", "train"]
    args = build_parser().parse_args(entrypoint[1:])  # the CLI accepts it as written
    assert args.algo == "ppo" and args.env_id == "CartPole-v1"
    check_ray_cluster(job["spec"]["rayClusterSpec"], "RayJob")
    mount_paths = {m["mountPath"] for c in ray_containers(job["spec"]["rayClusterSpec"]) for m in c["volumeMounts"]}
    assert args.runs_dir in mount_paths  # runs land on the shared claim


def test_rayservice_serves_the_policy_server() -> None:
    [service] = K8S["rayservice-serve.yaml"]
    check_ray_cluster(service["spec"]["rayClusterConfig"], "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    module = importlib.import_module(module_name)
    assert hasattr(module, attr), f"{app['import_path']} does not exist: Serve could not build the app"
    target = getattr(module, attr)
    assert inspect.isfunction(target) and len(inspect.signature(target).parameters) == 1  # a Serve app builder
    [deployment] = app["deployments"]
    assert deployment["name"] == module.PolicyServer.name
    table = deployment["user_config"]
    for entry in table["policies"]:
        assert entry["latest"] in {v["version"] for v in entry["versions"]}
        assert all(v["checkpoint"].startswith("/mnt/rlfleet/runs/") for v in entry["versions"])
    module.ServeTuning(**table["tuning"]).check()  # the keys reconfigure() reads, with valid values
    assert set(table) <= {"policies", "api_key_sha256", "tuning"}
    assert config["http_options"]["port"] == 8000
