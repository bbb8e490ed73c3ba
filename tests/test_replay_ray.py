"""EnvRunner-style Ray actors write straight into a table (and export metrics as Ray gauges) while the
driver samples."""

from __future__ import annotations

import ray
import redis

from conftest_replay import assert_consistent, namespace, rclient, replay_server, transition_schema  # noqa: F401
from services.replay import RateLimiter, Table
from services.replay.connection import EmbeddedRedis


@ray.remote(num_cpus=0)
class Writer:
    def __init__(self, redis_url: str, namespace: str) -> None:
        import os

        os.environ["REDIS_URL"] = redis_url  # what a deployment sets for every actor
        from services.replay import ReplayClient
        from services.replay.metrics import ReplayMetrics

        self.table = ReplayClient(namespace=namespace).table("shared")
        self.metrics = ReplayMetrics(self.table)

    def run(self, writer: int, batches: int, batch: int) -> tuple[str, dict[str, float]]:
        import numpy as np

        for b in range(batches):
            i = writer * 1_000_000 + b * batch + np.arange(batch)
            obs = (i[:, None] + np.arange(3) / 10).astype(np.float32)
            self.table.insert({"obs": obs, "action": i, "reward": (-i).astype(np.float32), "done": i % 2 == 0})
        return self.metrics.backend, self.metrics.export()


def test_ray_actors_write_while_driver_samples(
    ray_session: None, replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str
) -> None:
    table = Table.create(rclient, namespace, "shared", transition_schema(), 1000, rate_limiter=RateLimiter.min_size(10))
    writers = [Writer.remote(replay_server.url, namespace) for _ in range(2)]
    pending = [w.run.remote(k, 10, 20) for k, w in enumerate(writers)]
    try:
        sampled = 0
        while pending:
            s = table.sample(32, timeout=120)
            assert_consistent(s.data)
            sampled += 1
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        results = ray.get([w.run.remote(k, 0, 20) for k, w in enumerate(writers)])
    finally:
        for w in writers:
            ray.kill(w)
    assert sampled >= 1
    assert [backend for backend, _ in results] == ["ray", "ray"]  # ray.util.metrics inside actors
    assert all(values["rlfleet_replay_inserted_items"] == 400 for _, values in results)
    assert table.size() == 400
