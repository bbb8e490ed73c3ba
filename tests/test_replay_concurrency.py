"""Several writer processes insert while a reader samples and updates priorities, sharing one table."""

from __future__ import annotations

import numpy as np
import redis

from conftest_replay import assert_consistent, namespace, rclient, replay_server, run_python, transition_schema  # noqa: F401
from services.replay import RateLimiter, Sampler, Table
from services.replay.connection import EmbeddedRedis

WRITERS, BATCHES, BATCH = 3, 20, 50

WRITER = f"""
import sys
import numpy as np
from services.replay import Table
from services.replay.connection import redis_from_env

writer, namespace = int(sys.argv[1]), sys.argv[2]
table = Table.open(redis_from_env(), namespace, "shared")
for b in range({BATCHES}):
    i = writer * 1_000_000 + b * {BATCH} + np.arange({BATCH})
    table.insert({{"obs": (i[:, None] + np.arange(3) / 10).astype(np.float32), "action": i,
                  "reward": (-i).astype(np.float32), "done": i % 2 == 0}}, priorities=1.0 + (i % 3))
"""


def _check_sum_tree(client: redis.Redis, table: Table) -> None:
    """Every inner node of the priority tree equals the sum of its children; the root is positive."""
    raw = np.frombuffer(client.get(table.prefix + "tree"), dtype="<f8")
    fanout, n, off = table.layout["fanout"], table.max_size, 0
    while n > 1:
        level, parents = raw[off : off + n], raw[off + n : off + n + -(-n // fanout)]
        sums = [sum(level[i : i + fanout].tolist()) for i in range(0, n, fanout)]  # left to right, as Lua does
        np.testing.assert_array_equal(parents, sums)
        off, n = off + n, parents.size
    assert off + 1 == raw.size and raw[off] > 0


def test_writer_processes_and_a_sampling_reader(
    replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str
) -> None:
    table = Table.create(
        rclient,
        namespace,
        "shared",
        transition_schema(),
        4000,
        Sampler.prioritized(0.6, 0.4),
        rate_limiter=RateLimiter.min_size(BATCH),
        seed=0,
    )
    writers = [run_python(WRITER, {"REDIS_URL": replay_server.url}, str(w), namespace) for w in range(WRITERS)]
    try:
        sampled: set[int] = set()
        samples_during_writes = 0
        while any(p.poll() is None for p in writers):
            s = table.sample(64, timeout=120)  # waits for the first batch (min size)
            sampled.update(assert_consistent(s.data).tolist())  # never a half-written record
            table.update_priorities(s.keys, 0.5 + (s.keys % 4))
            samples_during_writes += 1
        for p in writers:
            _, err = p.communicate()
            assert p.returncode == 0, err
    finally:
        for p in writers:
            if p.poll() is None:
                p.kill()
                p.communicate()
    expected = {w * 1_000_000 + k for w in range(WRITERS) for k in range(BATCHES * BATCH)}
    info = table.info()
    assert (info["size"], info["inserts"], info["insert_calls"]) == (WRITERS * BATCHES * BATCH,) * 2 + (
        WRITERS * BATCHES,
    )
    assert samples_during_writes >= 1 and sampled <= expected
    _check_sum_tree(rclient, table)
    # Everything every writer inserted is in the ring, whole (read the raw records: one chunk here).
    assert table.layout["slots_per_chunk"] >= 4000
    raw = rclient.get(table.prefix + "data:0")
    stored = assert_consistent(table.schema.decode(raw, len(raw) // table.schema.record_size))
    assert set(stored.tolist()) == expected and stored.size == len(expected)
