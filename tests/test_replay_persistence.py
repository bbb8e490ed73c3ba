"""Persistence: with append-only on, a table's contents and counters survive a killed learner process
and a killed-and-restarted Redis server."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest_replay import assert_consistent, run_python
from services.replay import Table
from services.replay.connection import EmbeddedRedis

LEARNER = """
import sys
import numpy as np
from services.replay import Field, Sampler, Schema, Table
from services.replay.connection import redis_from_env

schema = Schema([Field("obs", "float32", (3,)), Field("action", "int64"), Field("reward", "float32", finite=True),
                 Field("done", "bool")])
table = Table.create(redis_from_env(), "run", "persist", schema, 64, Sampler.prioritized(0.6, 0.4), seed=0)
for start in range(0, 80, 16):  # 80 inserts into 64 slots: 16 evicted
    i = np.arange(start, start + 16)
    table.insert({"obs": i[:, None] + np.arange(3) / 10, "action": i, "reward": -i, "done": i % 2 == 0},
                 priorities=1.0 + i % 5)
for _ in range(3):
    s = table.sample(32)
    table.update_priorities(s.keys, 0.5 + (s.keys % 7))
print("done", flush=True)
sys.stdin.read()  # wait to be killed
"""


def _snapshot(client, namespace: str, name: str) -> dict:
    prefix = f"rlfleet:{namespace}:{name}:"
    keys = sorted(k for k in client.keys(prefix + "*") if not k.endswith(b":state"))
    raw = {k: client.get(k) for k in keys}
    return {"strings": raw, "state": client.hgetall(prefix + "state")}


def test_table_survives_learner_kill_and_redis_restart(tmp_path: Path) -> None:
    db = tmp_path / "replay.db"
    server = EmbeddedRedis(db, appendonly=True)
    restarted: EmbeddedRedis | None = None
    try:
        learner = run_python(LEARNER, {"REDIS_URL": server.url})
        try:
            assert learner.stdout.readline() == "done\n", learner.stderr.read()
        finally:
            learner.kill()
            learner.communicate()
        client = server.client()
        before = _snapshot(client, "run", "persist")
        info_before = Table.open(client, "run", "persist").info()
        assert (info_before["size"], info_before["inserts"], info_before["samples"]) == (64, 80, 96)
        assert info_before["evicted"] == 16 and info_before["priority_updates"] > 0
        client.close()

        server.kill()  # a crash: no final snapshot, only what reached the append-only file
        assert (tmp_path / "replay.db.aof").exists()
        assert not db.exists()  # no snapshot was taken: everything below comes from the AOF
        restarted = EmbeddedRedis(db, appendonly=True)
        client = restarted.client()
        assert _snapshot(client, "run", "persist") == before  # records, priority tree, schema, counters
        table = Table.open(client, "run", "persist", seed=1)
        info_after = table.info()
        for key in ("server_time",):
            info_before.pop(key), info_after.pop(key)
        assert info_after == info_before
        # The reopened table works: samples the same items, updates priorities, keeps numbering keys.
        s = table.sample(64)
        assert set(assert_consistent(s.data).tolist()) <= set(range(16, 80))
        assert table.update_priorities(s.keys[:4], np.ones(4)) == 4
        i = np.arange(80, 84)
        keys = table.insert({"obs": i[:, None] + np.arange(3) / 10, "action": i, "reward": -i, "done": i % 2 == 0})
        assert keys.tolist() == [80, 81, 82, 83]
        client.close()
    finally:
        for s in (server, restarted):
            if s is not None:
                s.stop()
