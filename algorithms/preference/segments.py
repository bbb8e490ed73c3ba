"""Trajectory segments in a schema'd Redis replay table, addressed by id (issue 6, control tasks).

A segment is `length` consecutive steps of one episode of a discrete-action control task:

    obs                (L + 1, obs_dim) float32  s_0 .. s_L (s_L is the observation after the last step)
    action             (L,) int64               a_0 .. a_{L-1}
    user               ()  int64                whose task the segment was collected for (VPL's users; else 0)
    episode            ()  int64                collector-local episode number (segments of one episode share it)
    true_return        ()  float32  HIDDEN      sum_t r_t under the env's true reward
    optimal_advantage  ()  float32  HIDDEN      sum_t A*(s_t, a_t) = sum_t [r_t + gamma V*(s_{t+1}) - V*(s_t)]

Only the scripted teacher and the final evaluation may read the HIDDEN fields: learners read segments through
`SegmentTable.read(ids, LEARNER_FIELDS)`, which refuses hidden fields unless `teacher=True` is passed.

Records are the replay service's packed numpy bytes (services/replay: Schema/Table, never pickle), read by key with
`Table.get`, which checks atomically that every key is still live and fails naming the first one that is not.

A segment's id, the string a preference pair carries as a "response", is ``seg-<key>``; `parse_segment_id`
rejects anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import redis

from services.replay import Field, KeyNotLive, ReplayClient, ReplayError, Schema, Table

HIDDEN_FIELDS = ("true_return", "optimal_advantage")
LEARNER_FIELDS = ("obs", "action", "user", "episode")
_SEGMENT_ID = re.compile(r"^seg-(0|[1-9][0-9]{0,15})$")

def segment_schema(obs_dim: int, length: int) -> Schema:
    """The segment record (module docstring) for `obs_dim`-dimensional observations and `length` steps."""
    if length < 1 or obs_dim < 1:
        raise ValueError(f"a segment needs length >= 1 and obs_dim >= 1, got {length}, {obs_dim}")
    return Schema([
        Field("obs", "float32", (length + 1, obs_dim), finite=True), Field("action", "int64", (length,)),
        Field("user", "int64"), Field("episode", "int64"),
        Field("true_return", "float32", finite=True), Field("optimal_advantage", "float32", finite=True),
    ])


def segment_id(key: int) -> str:
    return f"seg-{int(key)}"


def parse_segment_id(text: str) -> int:
    """The table key of a segment id ``seg-<key>`` (ValueError for anything else)."""
    match = _SEGMENT_ID.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a segment id (expected 'seg-<non-negative integer>')")
    return int(match.group(1))


class SegmentTable:
    """A replay table of segments: insert from collectors, read by id from the teacher and learners."""

    def __init__(self, table: Table) -> None:
        names = table.schema.names
        if set(names) != set(LEARNER_FIELDS) | set(HIDDEN_FIELDS):
            raise ReplayError(f"table {table.name} is not a segment table (fields {list(names)})")
        self.table = table
        self.length = table.schema.fields[names.index("action")].shape[0]

    @classmethod
    def create(cls, client: redis.Redis, namespace: str, name: str, obs_dim: int, length: int,
               max_size: int) -> SegmentTable:
        """Create the table (or open it when another process created it with the same schema and size)."""
        return cls(ReplayClient(client, namespace).create_table(name, segment_schema(obs_dim, length), max_size))

    @classmethod
    def open(cls, client: redis.Redis, namespace: str, name: str) -> SegmentTable:
        return cls(ReplayClient(client, namespace).table(name))

    def insert(self, batch: Mapping[str, np.ndarray]) -> list[str]:
        """Insert segments {field: (n, ...)} (validated by the schema, all or nothing); returns their ids."""
        return [segment_id(k) for k in self.table.insert(batch)]

    def live_ids(self) -> list[str]:
        return [segment_id(k) for k in self.table.live_keys()]

    def read(self, ids: Sequence[str], fields: Iterable[str] = LEARNER_FIELDS, *,
             teacher: bool = False) -> dict[str, np.ndarray]:
        """{field: (n, ...)} of the segments `ids`, in order. Hidden fields need `teacher=True`."""
        fields = tuple(fields)
        unknown = [f for f in fields if f not in self.table.schema.names]
        if unknown:
            raise ReplayError(f"segment tables have no field(s) {unknown}; fields: {list(self.table.schema.names)}")
        hidden = [f for f in fields if f in HIDDEN_FIELDS]
        if hidden and not teacher:
            raise PermissionError(f"field(s) {hidden} hold the hidden true reward: only the teacher may read them")
        keys = np.array([parse_segment_id(i) for i in ids], dtype=np.int64)
        try:
            decoded = self.table.get(keys)
        except KeyNotLive as exc:  # name the segment by its id, not by its table key
            live = f"seg-{exc.live.start}..seg-{exc.live.stop - 1}" if exc.live else "none"
            raise KeyNotLive(f"segment {segment_id(exc.key)} is not in the table (live ids {live})", exc.key,
                             exc.live) from None
        return {f: decoded[f] for f in fields}

    def drop(self) -> None:
        self.table.drop()
