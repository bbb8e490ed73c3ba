"""Training metrics exported through Ray's metrics agent, once per training iteration.

`TrainingMetrics.export(result, record)` turns one RLlib result dict (and its metrics.jsonl record) into
`ray.util.metrics` gauges, counters and a histogram named ``rlfleet_<area>_<what>_<unit>``, each labelled
``run_id`` (the run directory's name), ``algo`` and ``env``. Prometheus sees them with the ``ray_`` prefix
Ray's metrics agent adds (``ray_rlfleet_train_episode_return_mean_reward``); the Grafana dashboards in
deploy/grafana/ query those names. The driver exports them: it holds the result dict, and Ray's agent
serves a driver's metrics like an actor's.

Ray 2.60's metrics agent drops a gauge that was not set again within two export intervals (20 s by default),
so an exporter re-sets its latest values from a background thread (and re-reads the replay table) every
export interval until `close()`: a run whose iterations take minutes keeps continuous series, and a
finished run's gauges go stale instead of showing old values as current.

An off-policy run's Redis replay table is exported on the same call (services/replay/metrics.py), so its
gauges follow the run's iterations; their ``namespace`` label is the run id (cluster/train.py names the
table's namespace after the run directory).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cluster.checkpoints import list_checkpoints

RUN_LABELS = ("run_id", "algo", "env")
ALL_MODULES = "__all_modules__"  # RLlib's learner-results key for what is not per module

# name -> (description, labels beyond RUN_LABELS). Gauges hold the latest iteration's value.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rlfleet_train_episode_return_mean_reward": ("Mean return of the episodes finished in the iteration", ()),
    "rlfleet_train_episode_return_min_reward": ("Lowest return of the episodes finished in the iteration", ()),
    "rlfleet_train_episode_return_max_reward": ("Highest return of the episodes finished in the iteration", ()),
    "rlfleet_train_episode_return_smoothed_reward": ("Mean return over the last 100 episodes (the stop criterion)", ()),
    "rlfleet_train_episode_length_mean_steps": ("Mean length of the episodes finished in the iteration", ()),
    "rlfleet_train_env_steps_per_second": ("Env steps sampled per second of the iteration's wall time", ()),
    "rlfleet_train_env_runners_healthy_count": ("EnvRunner actors RLlib counts as healthy", ()),
    "rlfleet_train_env_runner_restarts_count": ("EnvRunner actors Ray restarted since the run (re)started", ()),
    "rlfleet_train_weight_sync_lag_updates": (
        "Learner weight versions the EnvRunners' sampling weights are behind (1 is normal when synchronous)", ()),
    "rlfleet_train_weight_sync_time_seconds": ("Time the iteration spent pushing weights to EnvRunners", ()),
    "rlfleet_train_checkpoint_age_seconds": ("Seconds since the run's newest checkpoint was written", ()),
    "rlfleet_train_checkpoint_timestamp_seconds": ("Unix time the run's newest checkpoint was written", ()),
    "rlfleet_learner_update_time_seconds": ("Time the iteration spent in learner updates", ()),
    "rlfleet_learner_loss_value": ("A loss term (or loss diagnostic) the rule's learner reports", ("module", "loss")),
    "rlfleet_learner_gradient_global_norm": (
        "Global L2 norm of the gradients, before clipping", ("module", "optimizer")),
}
COUNTERS: dict[str, str] = {
    "rlfleet_train_env_steps_total": "Env steps sampled",
    "rlfleet_train_iterations_total": "Training iterations finished",
}
ITERATION_HISTOGRAM = "rlfleet_train_iteration_duration_seconds"
ITERATION_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 600.0]
logger = logging.getLogger(__name__)
GRAD_NORM_PREFIX, GRAD_NORM_SUFFIX = "gradients_", "_global_norm"  # RLlib: gradients_<optimizer>_global_norm


@functools.cache
def _ray_metrics() -> dict[str, Any]:
    """The metric objects, made once per process (a second run in the same process reuses them)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    made: dict[str, Any] = {
        name: Gauge(name, description=desc, tag_keys=RUN_LABELS + extra) for name, (desc, extra) in GAUGES.items()
    }
    made.update({name: Counter(name, description=desc, tag_keys=RUN_LABELS) for name, desc in COUNTERS.items()})
    made[ITERATION_HISTOGRAM] = Histogram(
        ITERATION_HISTOGRAM, description="Wall time of one training iteration", boundaries=ITERATION_BUCKETS_S,
        tag_keys=RUN_LABELS,
    )
    return made


def _number(value: Any) -> float | None:
    """A finite float, or None for what Prometheus should not be shown (missing, NaN, not a number)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def learner_values(result: Mapping[str, Any], loss_keys: Iterable[str]) -> list[tuple[str, dict[str, str], float]]:
    """(metric name, extra labels, value) for each module's reported losses and gradient norms."""
    out: list[tuple[str, dict[str, str], float]] = []
    wanted = set(loss_keys)
    for module, stats in (result.get("learners") or {}).items():
        if module == ALL_MODULES or not isinstance(stats, Mapping):
            continue
        for key, raw in stats.items():
            value = _number(raw)
            if value is None:
                continue
            if key in wanted or key.endswith("_loss"):
                out.append(("rlfleet_learner_loss_value", {"module": str(module), "loss": key}, value))
            elif key.startswith(GRAD_NORM_PREFIX) and key.endswith(GRAD_NORM_SUFFIX):
                optimizer = key[len(GRAD_NORM_PREFIX):-len(GRAD_NORM_SUFFIX)]
                out.append(("rlfleet_learner_gradient_global_norm", {"module": str(module), "optimizer": optimizer},
                            value))
    return out


def weight_sync_lag(result: Mapping[str, Any]) -> float | None:
    """Newest learner weights version minus the version the EnvRunners sampled with (None if not reported)."""
    runner_seq = _number((result.get("env_runners") or {}).get("weights_seq_no"))
    learner_seqs = [
        _number(stats.get("weights_seq_no"))
        for module, stats in (result.get("learners") or {}).items()
        if module != ALL_MODULES and isinstance(stats, Mapping)
    ]
    learner_seqs = [s for s in learner_seqs if s is not None]
    if runner_seq is None or not learner_seqs:
        return None
    return max(0.0, max(learner_seqs) - runner_seq)


def iteration_values(result: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, float | None]:
    """The run-level gauges' values for one iteration (None: not reported by this rule or iteration)."""
    runners = result.get("env_runners") or {}
    timers = result.get("timers") or {}
    faults = result.get("fault_tolerance") or {}
    return {
        "rlfleet_train_episode_return_mean_reward": _number(runners.get("episode_return_mean")),
        "rlfleet_train_episode_return_min_reward": _number(runners.get("episode_return_min")),
        "rlfleet_train_episode_return_max_reward": _number(runners.get("episode_return_max")),
        "rlfleet_train_episode_return_smoothed_reward": _number(record.get("return_mean_100")),
        "rlfleet_train_episode_length_mean_steps": _number(runners.get("episode_len_mean")),
        "rlfleet_train_env_steps_per_second": _number(record.get("steps_per_s")),
        "rlfleet_train_env_runners_healthy_count": _number(faults.get("num_healthy_workers")),
        "rlfleet_train_env_runner_restarts_count": _number(faults.get("num_remote_worker_restarts")),
        "rlfleet_train_weight_sync_lag_updates": weight_sync_lag(result),
        "rlfleet_train_weight_sync_time_seconds": _number(timers.get("synch_weights")),
        "rlfleet_learner_update_time_seconds": _number(timers.get("learner_update_timer")),
    }


def _refresh_interval_s() -> float:
    """Ray's metrics export interval: re-setting gauges this often keeps them inside the agent's 2x TTL."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0


class TrainingMetrics:
    """One run's exporter. Make it after the Algorithm is built; `export` after every iteration; `close` at the end."""

    def __init__(self, run_dir: Path, algo_name: str, env_id: str, *, algo: Any = None,
                 loss_keys: Iterable[str] = (), refresh_s: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.labels = {"run_id": self.run_dir.name, "algo": algo_name, "env": env_id}
        self.loss_keys = tuple(loss_keys)
        self._metrics = _ray_metrics()
        self._latest: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # (name, tags) -> gauge value
        self._checkpoint_written: float | None = None
        self._lock = threading.Lock()
        self._replay = None
        table = getattr(algo, "replay_table", None)
        if table is not None:
            from services.replay.metrics import ReplayMetrics

            self._replay = ReplayMetrics(table, backend="ray")
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh_s or _refresh_interval_s(),),
                                           name="rlfleet-metrics", daemon=True)
        self._refresher.start()

    def export(self, result: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, float]:
        """Set every metric from one iteration; returns {metric name: value} of the run-level gauges set."""
        exported: dict[str, float] = {}
        with self._lock:
            for name, value in iteration_values(result, record).items():
                if value is not None:
                    self._set(name, value, self.labels)
                    exported[name] = value
            for name, extra, value in learner_values(result, self.loss_keys):
                self._set(name, value, {**self.labels, **extra})
            self._checkpoint_written = self._newest_checkpoint_time() or self._checkpoint_written
            exported.update(self._export_checkpoint_age())
            self._count(result)
            self._export_replay()
        return exported

    def close(self) -> None:
        """Stop refreshing: the run's gauges go stale in Prometheus within two export intervals."""
        self._stop.set()
        self._refresher.join(timeout=60)

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].set(value, tags=tags)
        self._latest[(name, tuple(sorted(tags.items())))] = value

    def _refresh_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                for (name, tags), value in self._latest.items():
                    self._metrics[name].set(value, tags=dict(tags))
                self._checkpoint_written = self._newest_checkpoint_time() or self._checkpoint_written
                self._export_checkpoint_age()
                self._export_replay()

    def _newest_checkpoint_time(self) -> float | None:
        checkpoints = list_checkpoints(self.run_dir)
        try:
            return checkpoints[-1].stat().st_mtime if checkpoints else None
        except OSError:  # pruned between listing and stat: the next iteration reports the newer one
            return None

    def _export_checkpoint_age(self) -> dict[str, float]:
        written = self._checkpoint_written
        if written is None:
            return {}
        values = {"rlfleet_train_checkpoint_timestamp_seconds": written,
                  "rlfleet_train_checkpoint_age_seconds": max(0.0, time.time() - written)}
        for name, value in values.items():
            self._metrics[name].set(value, tags=self.labels)
        return values

    def _export_replay(self) -> None:
        if self._replay is None:
            return
        try:
            self._replay.export()
        except Exception as exc:  # Redis away or the table dropped: metrics must never stop training
            logger.warning("replay metrics not exported: %s", exc)

    def _count(self, result: Mapping[str, Any]) -> None:
        self._metrics["rlfleet_train_iterations_total"].inc(1, tags=self.labels)
        steps = _number((result.get("env_runners") or {}).get("num_env_steps_sampled"))
        if steps:  # Ray counters only go up: an iteration that sampled nothing adds nothing
            self._metrics["rlfleet_train_env_steps_total"].inc(steps, tags=self.labels)
        duration = _number(result.get("time_this_iter_s"))
        if duration is not None:
            self._metrics[ITERATION_HISTOGRAM].observe(duration, tags=self.labels)
