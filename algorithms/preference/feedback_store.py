"""A Redis queue of single responses with scalar feedback (thumbs up/down), for rules that learn without pairs
(P261 DRO). Why not `services.preferences`: its pair record requires exactly two responses and its label is a
choice between them (0, 1, "tie"), so a single response with a score has no place in its schema.

    producers --add--> [unrated] --raters: read + rate--> [rated] --learners: read, (update), ack
                       group "raters"                     group "learners"

Keys are ``rlfleet:<namespace>:feedback:*`` (streams `unrated`, `rated`, `dead`). Records are JSON, checked field
by field on write and again on read (an entry that does not decode goes to `dead` with the reason, never on):

    {"id": "v0-17", "prompt": "307>", "response": "703", "policy_version": 0}             # unrated
    {... the same ..., "feedback": 1.0, "rater_id": "thumbs", "rated_at": 1763712000.0}     # rated

Guarantees (simpler than the pair queue's: one learner consumer per run here): a record leaves `unrated` only in
the transaction that writes its rated copy, and leaves `rated` only in the transaction that acks it after the
update; `add` refuses (QueueFull) once unrated + rated would exceed `max_len` (kept in the hash `meta`, so every
process that opens the store keeps the same bound), so memory stays bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from services.preferences.errors import PreferenceError, QueueFull, RecordError
from services.preferences.queue import NAMESPACE_RE
from services.preferences.schema import JUDGE_RE, check_id, dumps, loads

RECORD_FIELDS = ("id", "prompt", "response", "policy_version")
RATED_FIELDS = (*RECORD_FIELDS, "feedback", "rater_id", "rated_at")
MAX_TEXT = 100_000
DEFAULT_MAX_LEN = 10_000


@dataclass(frozen=True)
class Rated:
    """A rated single response as a learner reads it (`entry_id` is for the ack)."""

    entry_id: str
    record_id: str
    prompt: str
    response: str
    policy_version: int
    feedback: float
    rater_id: str


def check_record(obj: Any, rated: bool, where: str) -> dict[str, Any]:
    """The record if every field is valid, else a RecordError naming the field."""
    fields = RATED_FIELDS if rated else RECORD_FIELDS
    if not isinstance(obj, Mapping):
        raise RecordError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    if set(obj) != set(fields):
        raise RecordError(f"{where}: fields must be exactly {list(fields)}, got {sorted(obj)}")
    check_id(obj["id"], f"{where}: id")
    for name in ("prompt", "response"):
        if not isinstance(obj[name], str) or len(obj[name]) > MAX_TEXT:
            raise RecordError(f"{where}: {name} must be a string of at most {MAX_TEXT} characters")
    v = obj["policy_version"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RecordError(f"{where}: policy_version must be an integer >= 0, got {v!r}")
    if rated:
        f = obj["feedback"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise RecordError(f"{where}: feedback must be a finite number, got {f!r}")
        check_id(obj["rater_id"], f"{where}: rater_id", JUDGE_RE)
        t = obj["rated_at"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RecordError(f"{where}: rated_at must be a finite time >= 0, got {t!r}")
    return dict(obj)


class FeedbackStore:
    """Single responses waiting for feedback, and rated ones waiting for a learner, in one namespace."""

    def __init__(self, client: redis.Redis | None = None, namespace: str = "default", *, max_len: int | None = None):
        if client is None:
            from services.replay.connection import redis_from_env

            client = redis_from_env()
        if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
            raise PreferenceError(f"namespace {namespace!r} is not valid: use 1-200 of A-Z a-z 0-9 _ . -")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise PreferenceError(f"max_len must be an integer >= 1, got {max_len!r}")
        self.redis, self.namespace = client, namespace
        self.prefix = f"rlfleet:{namespace}:feedback:"
        # The bound lives in Redis with the store, so every process that opens it (producer actors) keeps it.
        client.hsetnx(self.prefix + "meta", "max_len", max_len or DEFAULT_MAX_LEN)
        self.max_len = int(client.hget(self.prefix + "meta", "max_len"))
        if max_len is not None and max_len != self.max_len:
            raise PreferenceError(f"feedback store {namespace} exists with max_len={self.max_len}, not {max_len}")
        for stream, group in (("unrated", "raters"), ("rated", "learners")):
            try:
                client.xgroup_create(self.prefix + stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:  # BUSYGROUP: it exists already (a second process opened it)
                if "BUSYGROUP" not in str(exc):
                    raise

    def add(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add unrated records, all or nothing (a bad one raises RecordError naming it and writes none)."""
        checked = [check_record(r, False, f"record #{i}") for i, r in enumerate(records)]
        if sum(self.pending().values()) + len(checked) > self.max_len:
            raise QueueFull(f"feedback store {self.namespace} holds {sum(self.pending().values())} records; "
                            f"{len(checked)} more would exceed max_len={self.max_len}")
        pipe = self.redis.pipeline(transaction=True)
        for r in checked:
            pipe.xadd(self.prefix + "unrated", {"record": dumps(r)})
        pipe.execute()
        return [r["id"] for r in checked]

    def rate_with(self, rater_id: str, rate: Callable[[str, str], float], count: int, *,
                  block_s: float | None = None) -> int:
        """A scripted rater's step: read up to `count` unrated records, write each with `rate(prompt, response)`
        to `rated` and remove it from `unrated` in one transaction; returns how many were rated."""
        check_id(rater_id, "rater id", JUDGE_RE)
        entries = self._read("unrated", "raters", rater_id, count, block_s)
        if not entries:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        for entry_id, record in entries:
            rated = {**record, "feedback": float(rate(record["prompt"], record["response"])),
                     "rater_id": rater_id, "rated_at": time.time()}
            pipe.xadd(self.prefix + "rated", {"record": dumps(check_record(rated, True, f"entry {entry_id}"))})
            pipe.xack(self.prefix + "unrated", "raters", entry_id)
            pipe.xdel(self.prefix + "unrated", entry_id)
        pipe.execute()
        return len(entries)

    def next_batch(self, learner_id: str, count: int, *, block_s: float | None = None) -> list[Rated]:
        """Up to `count` rated records for this learner; they stay pending until `ack`."""
        check_id(learner_id, "learner id")
        return [Rated(entry_id, r["id"], r["prompt"], r["response"], r["policy_version"], float(r["feedback"]),
                      r["rater_id"]) for entry_id, r in self._read("rated", "learners", learner_id, count, block_s)]

    def ack(self, batch: Sequence[Rated]) -> int:
        """After the update that used `batch`: acknowledge and delete the records (returns how many)."""
        if not batch:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.prefix + "rated", "learners", *[r.entry_id for r in batch])
        pipe.xdel(self.prefix + "rated", *[r.entry_id for r in batch])
        acked, _ = pipe.execute()
        return int(acked)

    def pending(self) -> dict[str, int]:
        return {s: int(self.redis.xlen(self.prefix + s)) for s in ("unrated", "rated")}

    def dead_letters(self) -> list[dict[str, str]]:
        return [{k.decode(): v.decode() for k, v in fields.items()}
                for _, fields in self.redis.xrange(self.prefix + "dead")]

    def drop(self) -> None:
        self.redis.delete(*[self.prefix + s for s in ("unrated", "rated", "dead", "meta")])

    def _read(self, stream: str, group: str, consumer: str, count: int,
              block_s: float | None) -> list[tuple[str, dict[str, Any]]]:
        block = None if not block_s else int(block_s * 1000)
        got = self.redis.xreadgroup(group, consumer, {self.prefix + stream: ">"}, count=count, block=block)
        out = []
        for _, entries in got or []:
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                try:
                    raw = fields.get(b"record", fields.get("record"))
                    if raw is None:
                        raise RecordError(f"entry {entry_id}: no 'record' field")
                    out.append((entry_id, check_record(loads(raw, f"entry {entry_id}"), stream == "rated",
                                                       f"entry {entry_id}")))
                except RecordError as exc:  # never handed on: moved aside with the reason
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.xadd(self.prefix + "dead", {"stream": stream, "entry": entry_id, "reason": str(exc)})
                    pipe.xack(self.prefix + stream, group, entry_id)
                    pipe.xdel(self.prefix + stream, entry_id)
                    pipe.execute()
        return out
