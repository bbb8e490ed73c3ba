"""Export the preference queue's gauge and counters to Prometheus.

    rlfleet_preference_queue_pending_pairs{namespace, stream}   gauge: pairs in stream "unlabelled"
                                                                (awaiting a label) / "labelled" (awaiting an ack)
    rlfleet_preference_pairs_added_total{namespace}             counter: pairs added (unlabelled and imported)
    rlfleet_preference_pairs_labelled_total{namespace}          counter: labels written (judges and imports)
    rlfleet_preference_pairs_acked_total{namespace}             counter: pairs acked by learners after use
    rlfleet_preference_pairs_reclaimed_total{namespace}         counter: pairs a learner took over from another

As in `services/replay/metrics.py`: inside a Ray actor they are `ray.util.metrics` metrics served by
Ray's metrics agent, elsewhere `prometheus_client` metrics in the default registry (or the one given;
serve it with `prometheus_client.start_http_server(port)`). The values are the queue's shared counters
kept in Redis (summed over every producer, judge and learner), so export from one process per queue;
call `export()` periodically (e.g. once per training iteration).
"""

from __future__ import annotations

from typing import Any, Literal

from services.preferences.queue import PreferenceQueue
from services.replay.metrics import ray_connected

PENDING = "rlfleet_preference_queue_pending_pairs"
# Exported counter name -> (the queue counter it mirrors, description).
COUNTER_METRICS: dict[str, tuple[str, str]] = {
    "rlfleet_preference_pairs_added_total": ("added", "Pairs added to the preference queue"),
    "rlfleet_preference_pairs_labelled_total": ("labelled", "Preference labels written by judges or imported"),
    "rlfleet_preference_pairs_acked_total": ("acked", "Labelled pairs acknowledged by learners after an update"),
    "rlfleet_preference_pairs_reclaimed_total": ("reclaimed", "Labelled pairs reclaimed from a stalled learner"),
}
STREAMS = ("unlabelled", "labelled")

Backend = Literal["auto", "ray", "prometheus"]


def _base(name: str) -> str:
    """Both client libraries append `_total` to a counter's name themselves."""
    return name.removesuffix("_total")


class _PromCollector:
    """A prometheus_client collector reporting the last exported values of every queue (one per registry)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, float]] = {}  # namespace -> {metric: value}

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pending = GaugeMetricFamily(
            PENDING, "Preference pairs not yet consumed, per stream", labels=("namespace", "stream")
        )
        counters = {
            name: CounterMetricFamily(_base(name), desc, labels=("namespace",))
            for name, (_, desc) in COUNTER_METRICS.items()
        }
        for namespace, values in sorted(self.values.items()):
            for stream in STREAMS:
                pending.add_metric((namespace, stream), values[f"{PENDING}:{stream}"])
            for name, family in counters.items():
                family.add_metric((namespace,), values[name])
        yield pending
        yield from counters.values()

    def describe(self) -> list[Any]:
        return []  # no metrics at registration: values only exist after the first export


_collectors: dict[int, _PromCollector] = {}  # id(registry) -> collector (a registry refuses a name twice)


def _prom_collector(registry: Any) -> _PromCollector:
    import prometheus_client

    registry = registry if registry is not None else prometheus_client.REGISTRY
    collector = _collectors.get(id(registry))
    if collector is None:
        collector = _PromCollector()
        registry.register(collector)
        _collectors[id(registry)] = collector
    return collector


class _RayMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.pending = Gauge(PENDING, description="Preference pairs not yet consumed", tag_keys=("namespace", "stream"))
        self.counters = {
            name: Counter(_base(name), description=desc, tag_keys=("namespace",))
            for name, (_, desc) in COUNTER_METRICS.items()
        }
        self.last: dict[str, float] = {}

    def update(self, namespace: str, values: dict[str, float]) -> None:
        for stream in STREAMS:
            self.pending.set(values[f"{PENDING}:{stream}"], tags={"namespace": namespace, "stream": stream})
        for name, counter in self.counters.items():
            delta = values[name] - self.last.get(name, 0.0)
            if delta > 0:  # a Ray counter only goes up: add what happened since the last export
                counter.inc(delta, tags={"namespace": namespace})
            self.last[name] = values[name]


class PreferenceMetrics:
    """The metrics of one namespace's queue; `export()` reads the queue and updates them."""

    def __init__(self, queue: PreferenceQueue, backend: Backend = "auto", registry: Any = None) -> None:
        if backend not in ("auto", "ray", "prometheus"):
            raise ValueError(f"backend must be 'auto', 'ray' or 'prometheus', not {backend!r}")
        # A registry given means prometheus_client; otherwise a Ray-connected process exports through Ray.
        use_ray = backend == "ray" or (backend == "auto" and registry is None and ray_connected())
        self.backend: str = "ray" if use_ray else "prometheus"
        self.queue = queue
        self._ray = _RayMetrics() if use_ray else None
        self._prom = None if use_ray else _prom_collector(registry)

    def export(self) -> dict[str, float]:
        """Read the queue, update every metric; returns {name (":stream" for the gauge): value}."""
        info = self.queue.info()
        values = {f"{PENDING}:unlabelled": info["awaiting_label"], f"{PENDING}:labelled": info["awaiting_ack"]}
        values.update({name: info[counter] for name, (counter, _) in COUNTER_METRICS.items()})
        values = {k: float(v) for k, v in values.items()}
        if self._ray is not None:
            self._ray.update(self.queue.namespace, values)
        else:
            assert self._prom is not None
            self._prom.values[self.queue.namespace] = values
        return values
