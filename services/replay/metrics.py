"""Export a replay table's counters as gauges named ``rlfleet_replay_<what>_<unit>``.

In any process connected to Ray (an EnvRunner or learner actor, or a training driver) the gauges are
`ray.util.metrics.Gauge`s, which Ray's metrics agent serves to Prometheus under Ray's prefix
(``ray_rlfleet_replay_size_items``), like every other rlfleet training metric; cluster/metrics.py
exports an off-policy run's table this way once per iteration. In a process Ray does not manage (or
when a registry is given) they are `prometheus_client` gauges (in the default registry unless one is
given; serve it with `prometheus_client.start_http_server(port)`, which deploy/prometheus/prometheus.yml
scrapes as the ``rlfleet-http`` job). Each gauge carries the labels ``namespace`` and ``table``.

The counters are the table's shared ones (kept in Redis, summed over every writer and learner), so
any one process exporting them reports the whole table. Rates are computed between two `export()`
calls from the counters and Redis's clock (0 on the first call).
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Protocol

from services.replay.table import Table

# Exported gauge name -> description.
METRICS: dict[str, str] = {
    "rlfleet_replay_size_items": "Items in the replay table now",
    "rlfleet_replay_capacity_items": "The table's max_size",
    "rlfleet_replay_inserted_items": "Items inserted since the table was created",
    "rlfleet_replay_sampled_items": "Items sampled since the table was created",
    "rlfleet_replay_evicted_items": "Items the FIFO remover evicted at max_size",
    "rlfleet_replay_insert_rate_items_per_second": "Items inserted per second since the previous export",
    "rlfleet_replay_sample_rate_items_per_second": "Items sampled per second since the previous export",
    "rlfleet_replay_insert_waits_calls": "Insert calls that waited for the rate limiter",
    "rlfleet_replay_sample_waits_calls": "Sample calls that waited for the rate limiter",
    "rlfleet_replay_insert_wait_seconds": "Seconds insert calls spent waiting for the rate limiter",
    "rlfleet_replay_sample_wait_seconds": "Seconds sample calls spent waiting for the rate limiter",
    "rlfleet_replay_insert_timeouts_calls": "Insert calls that gave up (RateLimiterTimeout)",
    "rlfleet_replay_sample_timeouts_calls": "Sample calls that gave up (RateLimiterTimeout)",
}
LABELS = ("namespace", "table")

Backend = Literal["auto", "ray", "prometheus"]


def ray_connected() -> bool:
    """True in a process connected to Ray (driver or worker). Ray is not imported for this check."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def in_ray_actor() -> bool:
    """True inside a Ray actor."""
    if not ray_connected():
        return False
    import ray

    return ray.get_runtime_context().get_actor_id() is not None


class _Gauges(Protocol):
    def set(self, name: str, value: float, labels: dict[str, str]) -> None: ...


class _RayGauges:
    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self._gauges = {name: Gauge(name, description=desc, tag_keys=LABELS) for name, desc in METRICS.items()}

    def set(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._gauges[name].set(value, tags=labels)


_prom_cache: dict[int, dict[str, Any]] = {}  # id(registry) -> gauges (a registry refuses a name twice)


class _PromGauges:
    def __init__(self, registry: Any = None) -> None:
        import prometheus_client

        registry = registry if registry is not None else prometheus_client.REGISTRY
        gauges = _prom_cache.get(id(registry))
        if gauges is None:
            gauges = {
                name: prometheus_client.Gauge(name, desc, labelnames=LABELS, registry=registry)
                for name, desc in METRICS.items()
            }
            _prom_cache[id(registry)] = gauges
        self._gauges = gauges

    def set(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._gauges[name].labels(**labels).set(value)


class ReplayMetrics:
    """Gauges for one table; call `export()` periodically (e.g. once per training iteration)."""

    def __init__(self, table: Table, backend: Backend = "auto", registry: Any = None) -> None:
        if backend not in ("auto", "ray", "prometheus"):
            raise ValueError(f"backend must be 'auto', 'ray' or 'prometheus', not {backend!r}")
        # A given registry means the caller serves it; otherwise Ray's agent carries the gauges when it can.
        use_ray = backend == "ray" or (backend == "auto" and registry is None and ray_connected())
        self.backend: str = "ray" if use_ray else "prometheus"
        self.table = table
        self._gauges: _Gauges = _RayGauges() if use_ray else _PromGauges(registry)
        self._labels = {"namespace": table.namespace, "table": table.name}
        self._last: tuple[float, int, int] | None = None

    def export(self) -> dict[str, float]:
        """Read the table's counters, set every gauge, return {metric name: value}."""
        info = self.table.info()
        now, inserts, samples = info["server_time"], info["inserts"], info["samples"]
        insert_rate = sample_rate = 0.0
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            insert_rate, sample_rate = (inserts - self._last[1]) / dt, (samples - self._last[2]) / dt
        self._last = (now, inserts, samples)
        values = {
            "rlfleet_replay_size_items": info["size"],
            "rlfleet_replay_capacity_items": info["max_size"],
            "rlfleet_replay_inserted_items": inserts,
            "rlfleet_replay_sampled_items": samples,
            "rlfleet_replay_evicted_items": info["evicted"],
            "rlfleet_replay_insert_rate_items_per_second": insert_rate,
            "rlfleet_replay_sample_rate_items_per_second": sample_rate,
            "rlfleet_replay_insert_waits_calls": info["insert_waits"],
            "rlfleet_replay_sample_waits_calls": info["sample_waits"],
            "rlfleet_replay_insert_wait_seconds": info["insert_wait_s"],
            "rlfleet_replay_sample_wait_seconds": info["sample_wait_s"],
            "rlfleet_replay_insert_timeouts_calls": info["insert_timeouts"],
            "rlfleet_replay_sample_timeouts_calls": info["sample_timeouts"],
        }
        for name, value in values.items():
            self._gauges.set(name, float(value), self._labels)
        return {k: float(v) for k, v in values.items()}
