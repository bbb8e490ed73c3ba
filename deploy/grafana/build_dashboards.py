"""Writes the rlfleet Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

    python deploy/grafana/build_dashboards.py          # rewrite the JSON files
    python deploy/grafana/build_dashboards.py --check  # exit 1 if a file differs from what this script writes

The JSON files are what Grafana provisions (provisioning/dashboards/rlfleet.yml); this script keeps their
ids, grid positions and datasource references consistent. Metric names are the ones Prometheus stores:
everything recorded with `ray.util.metrics` carries Ray's `ray_` prefix (ray_rlfleet_train_..., see
cluster/metrics.py, services/replay/metrics.py, services/serving.py and the preference queue).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "rlfleet-prometheus"}  # provisioning/datasources/prometheus.yml
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
RUN = '{run_id=~"$run_id", algo=~"$algo", env=~"$env"}'
NS = '{namespace=~"$namespace"}'
SERVE = '{policy=~"$policy", version=~"$version"}'


def m(name: str) -> str:
    """A metric's name as Prometheus stores it (Ray's metrics agent adds `ray_`)."""
    return "ray_" + name


@dataclass
class Panel:
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8
    options: dict = field(default_factory=dict)


def stat(title: str, unit: str, expr: str, legend: str, description: str) -> Panel:
    return Panel(title, unit, [(expr, legend)], description, kind="stat", width=6, height=4)


def variable(name: str, query: str, label: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


RUN_VARIABLES = [
    variable("algo", f"label_values({m('rlfleet_train_iterations_total')}, algo)", "rule"),
    variable("env", f'label_values({m("rlfleet_train_iterations_total")}{{algo=~"$algo"}}, env)', "env"),
    variable("run_id", f'label_values({m("rlfleet_train_iterations_total")}{{algo=~"$algo", env=~"$env"}}, run_id)',
             "run"),
]


def by_run(metric: str, extra: str = "") -> str:
    """One series per run (and `extra` labels): Ray adds worker/session labels that would split it."""
    keys = "run_id" + (", " + extra if extra else "")
    return f"max by ({keys}) ({m(metric)}{RUN})"


TRAINING = [
    stat("Iterations", "none", f"max by (run_id) ({m('rlfleet_train_iterations_total')}{RUN})", "{{run_id}}",
         "Training iterations finished (per run, since its driver started)."),
    stat("Env steps sampled", "short", f"sum by (run_id) ({m('rlfleet_train_env_steps_total')}{RUN})", "{{run_id}}",
         "Env steps sampled since the run's driver started."),
    stat("Checkpoint age", "s",
         f"time() - max by (run_id) ({m('rlfleet_train_checkpoint_timestamp_seconds')}{RUN})", "{{run_id}}",
         "Time since the run's newest checkpoint was written (grows while a run is stuck or stopped)."),
    stat("EnvRunner restarts", "none", by_run("rlfleet_train_env_runner_restarts_count"), "{{run_id}}",
         "EnvRunner actors Ray restarted after they died (since the run's driver started)."),
    Panel("Episode return", "none", [
        (by_run("rlfleet_train_episode_return_mean_reward"), "{{run_id}} mean"),
        (by_run("rlfleet_train_episode_return_min_reward"), "{{run_id}} min"),
        (by_run("rlfleet_train_episode_return_max_reward"), "{{run_id}} max"),
        (by_run("rlfleet_train_episode_return_smoothed_reward"), "{{run_id}} last 100 episodes"),
    ], "Returns of the episodes finished in each iteration, and the 100-episode mean the stop criterion uses."),
    Panel("Episode length", "suffix: steps", [(by_run("rlfleet_train_episode_length_mean_steps"), "{{run_id}}")],
          "Mean length of the episodes finished in each iteration."),
    Panel("Env steps per second", "suffix: steps/s", [
        (by_run("rlfleet_train_env_steps_per_second"), "{{run_id}} last iteration"),
        (f"sum by (run_id) (rate({m('rlfleet_train_env_steps_total')}{RUN}[{RATE}]))", "{{run_id}} averaged"),
    ], "Sampling throughput: per iteration (its wall time), and averaged over the rate window."),
    Panel("Iteration duration", "s", [
        (f"histogram_quantile({q}, sum by (le, run_id) "
         f"(rate({m('rlfleet_train_iteration_duration_seconds_bucket')}{RUN}[{RATE}])))", f"{{{{run_id}}}} p{p}")
        for q, p in ((0.5, 50), (0.95, 95))
    ], "Wall time of one training iteration (sampling, learner update, weight sync)."),
]

ACTORS_LEARNERS = [
    Panel("Loss terms", "none",
          [(by_run("rlfleet_learner_loss_value", "module, loss"), "{{run_id}} {{module}} {{loss}}")],
          "Each loss term (and diagnostic such as entropy or KL) the rule's learner reports, per RLModule."),
    Panel("Gradient global norm", "none",
          [(by_run("rlfleet_learner_gradient_global_norm", "module, optimizer"),
            "{{run_id}} {{module}} {{optimizer}}")],
          "Global L2 norm of the gradients per optimizer, before clipping."),
    Panel("Learner update time", "s", [(by_run("rlfleet_learner_update_time_seconds"), "{{run_id}}")],
          "Time each iteration spent in learner updates."),
    Panel("Weight-sync lag", "suffix: updates", [(by_run("rlfleet_train_weight_sync_lag_updates"), "{{run_id}}")],
          "Learner weight versions the EnvRunners sampled behind; 1 is normal for synchronous on-policy rules."),
    Panel("Weight-sync time", "s", [(by_run("rlfleet_train_weight_sync_time_seconds"), "{{run_id}}")],
          "Time each iteration spent pushing the new weights to the EnvRunners."),
    Panel("EnvRunners: healthy and restarted", "none", [
        (by_run("rlfleet_train_env_runners_healthy_count"), "{{run_id}} healthy"),
        (by_run("rlfleet_train_env_runner_restarts_count"), "{{run_id}} restarts"),
    ], "EnvRunner actors RLlib counts as healthy, and how many Ray restarted."),
    Panel("CPU by Ray component", "percent",
          [("sum by (Component) (ray_component_cpu_percentage)", "{{Component}}")],
          "CPU use of Ray's processes (raylet, EnvRunner and learner actors, Serve replicas), from Ray's node agents."),
    Panel("Memory (RSS) by Ray component", "decmbytes",
          [("sum by (Component) (ray_component_rss_mb)", "{{Component}}")],
          "Resident memory of Ray's processes, from Ray's node agents."),
]


def replay(metric: str) -> str:
    return f"max by (namespace, table) ({m(metric)}{NS})"


def queue_rate(metric: str) -> str:
    return f"sum by (namespace) (rate({m(metric)}{NS}[{RATE}]))"


REPLAY_QUEUES = [
    Panel("Replay size and capacity", "short", [
        (replay("rlfleet_replay_size_items"), "{{namespace}}/{{table}} size"),
        (replay("rlfleet_replay_capacity_items"), "{{namespace}}/{{table}} capacity"),
    ], "Items in each replay table, against its max_size."),
    Panel("Replay insert and sample rate", "suffix: items/s", [
        (replay("rlfleet_replay_insert_rate_items_per_second"), "{{namespace}}/{{table}} insert"),
        (replay("rlfleet_replay_sample_rate_items_per_second"), "{{namespace}}/{{table}} sample"),
    ], "Items inserted and sampled per second between two exports (one per training iteration)."),
    Panel("Replay items inserted, sampled, evicted", "short", [
        (replay("rlfleet_replay_inserted_items"), "{{namespace}}/{{table}} inserted"),
        (replay("rlfleet_replay_sampled_items"), "{{namespace}}/{{table}} sampled"),
        (replay("rlfleet_replay_evicted_items"), "{{namespace}}/{{table}} evicted"),
    ], "Totals since each table was created (shared counters in Redis, all writers and learners)."),
    Panel("Rate-limiter waits and timeouts", "short", [
        (replay("rlfleet_replay_insert_waits_calls"), "{{namespace}}/{{table}} insert waits"),
        (replay("rlfleet_replay_sample_waits_calls"), "{{namespace}}/{{table}} sample waits"),
        (replay("rlfleet_replay_insert_timeouts_calls"), "{{namespace}}/{{table}} insert timeouts"),
        (replay("rlfleet_replay_sample_timeouts_calls"), "{{namespace}}/{{table}} sample timeouts"),
    ], "Insert and sample calls that waited for the samples-per-insert limiter, and those that gave up."),
    Panel("Time waiting for the rate limiter", "s", [
        (replay("rlfleet_replay_insert_wait_seconds"), "{{namespace}}/{{table}} inserts"),
        (replay("rlfleet_replay_sample_wait_seconds"), "{{namespace}}/{{table}} samples"),
    ], "Total seconds insert and sample calls spent blocked by the rate limiter."),
    Panel("Preference pairs pending", "short", [
        (f"max by (namespace, stream) ({m('rlfleet_preference_queue_pending_pairs')}{NS})", "{{namespace}} {{stream}}"),
    ], "Pairs in each preference stream not yet acknowledged by the learner."),
    Panel("Preference pairs flow", "suffix: pairs/s", [
        (queue_rate("rlfleet_preference_pairs_added_total"), "{{namespace}} added"),
        (queue_rate("rlfleet_preference_pairs_labelled_total"), "{{namespace}} labelled"),
        (queue_rate("rlfleet_preference_pairs_acked_total"), "{{namespace}} acked"),
        (queue_rate("rlfleet_preference_pairs_reclaimed_total"), "{{namespace}} reclaimed"),
    ], "Pairs added by producers, labelled by judges, acknowledged by learners, and reclaimed from dead consumers."),
]

SERVE_REQUESTS = m("rlfleet_serve_requests_total")


def quantiles(metric: str, by: str, unit_legend: str = "") -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({m(metric + '_bucket')}{SERVE}[{RATE}])))",
         f"{{{{{by.split(', ')[0]}}}}} p{p}{unit_legend}")
        for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
    ]


SERVING = [
    stat("Requests per second", "reqps", f"sum(rate({SERVE_REQUESTS}{SERVE}[{RATE}]))", "all",
         "HTTP requests answered per second, every route and status."),
    stat("Error ratio (4xx and 5xx)", "percentunit",
         f'(sum(rate({SERVE_REQUESTS}{{policy=~"$policy", version=~"$version", status=~"[45].."}}[{RATE}])) '
         f"or vector(0)) / sum(rate({SERVE_REQUESTS}{SERVE}[{RATE}]))", "errors",
         "Share of answers with a 4xx or 5xx status."),
    Panel("Requests per second by status", "reqps",
          [(f"sum by (status) (rate({SERVE_REQUESTS}{SERVE}[{RATE}]))", "{{status}}")],
          "Answers per second by HTTP status: 2xx served, 4xx refused input (400, 401, 404, 413, 422), 5xx bugs."),
    Panel("Requests per second by policy and route", "reqps",
          [(f"sum by (policy, version, route) (rate({SERVE_REQUESTS}{SERVE}[{RATE}]))",
            "{{policy}} v{{version}} {{route}}")],
          "Answers per second per policy version and route (act, value, list, healthz, other)."),
    Panel("Request latency", "s", quantiles("rlfleet_serve_request_latency_seconds", "policy"),
          "Time from a request's start to its answer inside the replica (p50, p95, p99)."),
    Panel("Batch size", "suffix: observations", [
        *quantiles("rlfleet_serve_batch_size_observations", "policy, version"),
        (f"sum by (policy, version) (rate({m('rlfleet_serve_batch_size_observations_sum')}{SERVE}[{RATE}])) / "
         f"sum by (policy, version) (rate({m('rlfleet_serve_batch_size_observations_count')}{SERVE}[{RATE}]))",
         "{{policy}} v{{version}} mean"),
    ], "Observations per forward pass: the rows of the requests Serve batched together."),
    Panel("Forward passes per second", "ops",
          [(f"sum by (policy, version) (rate({m('rlfleet_serve_batch_size_observations_count')}{SERVE}[{RATE}]))",
            "{{policy}} v{{version}}")],
          "Batched forward passes per second per policy version."),
]

DASHBOARDS = {
    "training-overview": ("rlfleet-training", "rlfleet / Training overview", TRAINING, RUN_VARIABLES),
    "actors-learners": ("rlfleet-actors-learners", "rlfleet / Actors and learners", ACTORS_LEARNERS, RUN_VARIABLES),
    "replay-queues": ("rlfleet-replay-queues", "rlfleet / Replay and queues", REPLAY_QUEUES,
                      [variable("namespace", "label_values(namespace)", "namespace")]),
    "serving": ("rlfleet-serving", "rlfleet / Serving", SERVING, [
        variable("policy", f"label_values({SERVE_REQUESTS}, policy)", "policy"),
        variable("version", f'label_values({SERVE_REQUESTS}{{policy=~"$policy"}}, version)', "version"),
    ]),
}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {**options, **panel.options},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             "range": True}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard_json(uid: str, title: str, panels: list[Panel], variables: list[dict]) -> dict:
    laid_out, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:  # next row
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(panel_json(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": uid,
        "title": title,
        "tags": ["rlfleet"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": laid_out,
    }


def render() -> dict[Path, str]:
    """{path: file text} of every dashboard."""
    return {
        OUT_DIR / f"{stem}.json": json.dumps(dashboard_json(uid, title, panels, variables), indent=2) + "\n"
        for stem, (uid, title, panels, variables) in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    files = render()
    if argv[1:] == ["--check"]:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"out of date: {path} (run python deploy/grafana/build_dashboards.py)")
        return 1 if stale else 0
    OUT_DIR.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
