"""Metrics exported from a table's shared counters, and where the Redis connection comes from."""

from __future__ import annotations

from pathlib import Path

import prometheus_client
import pytest
import redis

from conftest_replay import namespace, rclient, replay_server, transition_schema, transitions  # noqa: F401
from services.replay import RateLimiter, RateLimiterTimeout, ReplayError, Table
from services.replay import connection
from services.replay.connection import EmbeddedRedis, redis_from_env
from services.replay.metrics import METRICS, ReplayMetrics, in_ray_actor


def test_prometheus_gauges_follow_the_counters(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), 8, rate_limiter=RateLimiter.min_size(2))
    registry = prometheus_client.CollectorRegistry()
    metrics = ReplayMetrics(table, registry=registry)
    assert metrics.backend == "prometheus" and not in_ray_actor()
    first = metrics.export()
    assert first["rlfleet_replay_insert_rate_items_per_second"] == 0.0  # no previous export yet
    with pytest.raises(RateLimiterTimeout):
        table.sample(1, timeout=0.05)
    table.insert(transitions(0, 6))
    table.insert(transitions(6, 4))  # 10 into 8 slots: 2 evicted
    table.sample(4)
    values = metrics.export()
    labels = {"namespace": namespace, "table": "t"}
    assert set(values) == set(METRICS)
    assert all(name.startswith("rlfleet_replay_") for name in METRICS)
    expected = {
        "rlfleet_replay_size_items": 8,
        "rlfleet_replay_capacity_items": 8,
        "rlfleet_replay_inserted_items": 10,
        "rlfleet_replay_sampled_items": 4,
        "rlfleet_replay_evicted_items": 2,
        "rlfleet_replay_sample_waits_calls": 1,
        "rlfleet_replay_sample_timeouts_calls": 1,
        "rlfleet_replay_insert_waits_calls": 0,
    }
    for name, value in expected.items():
        assert registry.get_sample_value(name, labels) == value, name
    assert registry.get_sample_value("rlfleet_replay_sample_wait_seconds", labels) >= 0.05
    assert values["rlfleet_replay_insert_rate_items_per_second"] > 0
    assert values["rlfleet_replay_sample_rate_items_per_second"] > 0
    # A second exporter on the same registry reuses the gauges (a registry refuses duplicate names).
    ReplayMetrics(table, registry=registry).export()


def test_redis_url_is_used_when_set(
    replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclient.set(f"rlfleet:{namespace}:probe", b"here")
    monkeypatch.setenv("REDIS_URL", replay_server.url)
    client = redis_from_env()
    assert client.get(f"rlfleet:{namespace}:probe") == b"here"
    client.close()


def test_embedded_server_is_started_lazily_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv(connection.DB_PATH_ENV, raising=False)
    monkeypatch.setattr(connection, "_embedded", None)
    client = redis_from_env(tmp_path / "one.db")
    try:
        assert client.config_get("appendonly")["appendonly"] == "yes"  # persistent by default with a path
        assert connection.embedded_server() is connection._embedded  # one per process
        assert redis_from_env().ping()
        with pytest.raises(ReplayError, match="already runs an embedded redis"):
            redis_from_env(tmp_path / "two.db")
    finally:
        client.close()
        connection._embedded.stop()
    assert connection._embedded is None
