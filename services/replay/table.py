"""Replay tables in Redis: `Table` (create/open, insert, sample, update_priorities, size, info) and
`ReplayClient` (a namespace's tables).

Storage layout and why (the scripts' docstring, `services/replay/scripts.py`, has the byte-level
detail): a table is a fixed-capacity *ring of fixed-size records* packed into a few large Redis
strings (chunks of ~8 MiB), plus one string holding a float64 priority sum-tree for prioritised
tables, plus a small hash of counters. Measured on this machine (notes/rllib-2.60.md), one Redis key
per transition inserts about 94k/s while packed strings insert at 5-7M/s and sample about 330k/s
with one Lua call per batch. So:

- `insert` packs the batch client-side (schema -> raw little-endian bytes) and sends it in ONE
  script call that checks the rate limiter, SETRANGEs it into the ring (one write per chunk run,
  at most a few per batch), writes the leaves and re-sums the touched tree nodes, and moves the
  counters: atomic, all or nothing, so concurrent writers and learners never see half a batch.
- `sample` is ONE script call: uniform picks `head + floor(u * size)`, prioritised descends the
  sum-tree (O(log n) per item, 16-way nodes), FIFO reads the oldest `b` records and moves `head`.
  The records come back as one concatenated string; one `np.frombuffer` over a packed structured
  dtype splits it into fields (one copy per field, no Python loop over items).
- Chunks (not one string) keep every value under Redis's 512 MB string limit (image tables) and let
  the memory grow as the ring fills (Redis grows strings on SETRANGE; a ring never shrinks).
- Whole records per slot rather than one string per field: a sampled item is one GETRANGE instead
  of one per field, and an insert one SETRANGE per chunk run instead of one per field.

The schema (field names, dtypes, shapes) and the table's options are stored as JSON in Redis and
compared on `create` (an existing table with another schema or options is a `SchemaError` /
`ReplayError` naming the difference). Nothing is pickled anywhere.

Keys of a table share the prefix ``rlfleet:<namespace>:<table>:``; names are restricted to
``[A-Za-z0-9_.-]`` so two (namespace, table) pairs can never produce the same prefix.

Rate limiting follows Reverb (`RateLimiter`): sampling waits until the table holds
`min_size_to_sample` items; with `samples_per_insert` set, ``diff = inserts * spi - samples`` must stay
within ``[min_diff, max_diff]``: a sample of b needs ``diff - b >= min_diff``, an insert of n needs
``diff + n * spi <= max_diff`` (free while the table is below min size). The counters live in the
table's Redis hash, so every writer and learner shares them. A call the limiter refuses does
nothing; `insert`/`sample` then wait (polling a read-only check script with backoff up to 20 ms)
until allowed or raise `RateLimiterTimeout` after `timeout` seconds; `try_insert`/`try_sample`
return None ("not now") instead of waiting. Note the batch granularity: with a window narrower than
``n * spi + b`` an insert of n and a sample of b can block each other forever (Reverb's
single-item window rule, scaled by the batch sizes), so size the error buffer for your batches.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import redis

from services.replay import scripts
from services.replay.errors import KeyNotLive, RateLimiterTimeout, ReplayError, SchemaError, TableNotFound
from services.replay.schema import Schema

FORMAT_VERSION = 1
CHUNK_BYTES = 8 * 1024 * 1024  # target size of one ring chunk (a record larger than this gets a chunk to itself)
TREE_FANOUT = 16
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_POLL_FIRST_S, _POLL_MAX_S = 0.0005, 0.02

SamplerKind = Literal["uniform", "prioritized", "fifo"]
Remover = Literal["fifo"]


# --- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """How items are picked. `prioritized`: P(i) = p_i**alpha / sum_j p_j**alpha; importance weights
    w_i = (N * P(i))**-beta / max_batch w (Schaul et al. 2016, normalised per batch as Acme does)."""

    kind: SamplerKind = "uniform"
    alpha: float = 0.6  # prioritised only: priority exponent (0 = uniform)
    beta: float = 0.4  # prioritised only: default importance-weight exponent (sample(beta=...) overrides)

    @classmethod
    def uniform(cls) -> Sampler:
        return cls("uniform", 0.0, 0.0)

    @classmethod
    def prioritized(cls, alpha: float = 0.6, beta: float = 0.4) -> Sampler:
        return cls("prioritized", alpha, beta)

    @classmethod
    def fifo(cls) -> Sampler:
        """Each item is handed out once, oldest first, and removed by the sample that took it."""
        return cls("fifo", 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "prioritized", "fifo"):
            raise ReplayError(f"sampler must be 'uniform', 'prioritized' or 'fifo', not {self.kind!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0 and math.isfinite(self.beta) and self.beta >= 0):
            raise ReplayError(f"sampler alpha and beta must be finite and >= 0, got {self.alpha}, {self.beta}")
        if self.kind != "prioritized" and (self.alpha or self.beta):
            object.__setattr__(self, "alpha", 0.0)
            object.__setattr__(self, "beta", 0.0)


@dataclass(frozen=True)
class RateLimiter:
    """Reverb's rate limiter. `samples_per_insert=None` only enforces `min_size_to_sample`."""

    min_size_to_sample: int = 1
    samples_per_insert: float | None = None
    min_diff: float = -math.inf
    max_diff: float = math.inf

    @classmethod
    def min_size(cls, min_size_to_sample: int = 1) -> RateLimiter:
        return cls(min_size_to_sample)

    @classmethod
    def sample_to_insert_ratio(
        cls, samples_per_insert: float, min_size_to_sample: int, error_buffer: float
    ) -> RateLimiter:
        """Keep samples ~= inserts * spi, within +-error_buffer around spi * min_size_to_sample (Reverb)."""
        centre = samples_per_insert * min_size_to_sample
        return cls(min_size_to_sample, samples_per_insert, centre - error_buffer, centre + error_buffer)

    @classmethod
    def queue(cls, size: int) -> RateLimiter:
        """For a FIFO table: writers wait when `size` items are unconsumed, readers when it is empty."""
        return cls(1, 1.0, 0.0, float(size))

    def __post_init__(self) -> None:
        if int(self.min_size_to_sample) != self.min_size_to_sample or self.min_size_to_sample < 0:
            raise ReplayError(f"min_size_to_sample must be an integer >= 0, got {self.min_size_to_sample}")
        spi = self.samples_per_insert
        if spi is not None and not (math.isfinite(spi) and spi > 0):
            raise ReplayError(f"samples_per_insert must be a finite number > 0 or None, got {spi}")
        if math.isnan(self.min_diff) or math.isnan(self.max_diff) or self.min_diff > self.max_diff:
            raise ReplayError(f"rate limiter needs min_diff <= max_diff, got {self.min_diff} > {self.max_diff}")


@dataclass(frozen=True)
class TableOptions:
    """Everything `Table.create` fixes for the table's lifetime (stored in Redis with the schema)."""

    schema: Schema
    max_size: int
    sampler: Sampler
    remover: Remover
    rate_limiter: RateLimiter

    def to_json(self) -> dict[str, Any]:
        limiter = asdict(self.rate_limiter)
        for k in ("min_diff", "max_diff"):  # JSON has no infinities
            limiter[k] = None if math.isinf(limiter[k]) else limiter[k]
        return {
            "schema": json.loads(self.schema.to_json()),
            "max_size": self.max_size,
            "sampler": asdict(self.sampler),
            "remover": self.remover,
            "rate_limiter": limiter,
        }

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> TableOptions:
        limiter = dict(spec["rate_limiter"])
        limiter["min_diff"] = -math.inf if limiter["min_diff"] is None else limiter["min_diff"]
        limiter["max_diff"] = math.inf if limiter["max_diff"] is None else limiter["max_diff"]
        return cls(
            schema=Schema.from_json(json.dumps(spec["schema"])),
            max_size=int(spec["max_size"]),
            sampler=Sampler(**spec["sampler"]),
            remover=spec["remover"],
            rate_limiter=RateLimiter(**limiter),
        )


class Sample(NamedTuple):
    """A sampled batch: `data` {field: (b, *shape)}, `keys` (int64, for update_priorities),
    `probabilities` P(i) of each pick, importance `weights` (ones unless prioritised), `table_size` N."""

    data: dict[str, np.ndarray]
    keys: np.ndarray
    probabilities: np.ndarray
    weights: np.ndarray
    table_size: int


def importance_weights(probabilities: np.ndarray, table_size: int, beta: float) -> np.ndarray:
    """w_i = (N * P(i)) ** -beta, divided by the batch's largest w (so weights only scale updates down)."""
    w = (table_size * np.asarray(probabilities, dtype=np.float64)) ** (-beta)
    return w / w.max() if w.size else w


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ReplayError(f"{kind} {name!r} is not valid: use 1-200 of the characters A-Z a-z 0-9 _ . -")
    return name


def _prefix(namespace: str, name: str) -> str:
    return f"rlfleet:{_check_name('namespace', namespace)}:{_check_name('table name', name)}:"


def _tree_nodes(capacity: int, fanout: int) -> int:
    total, n = 0, capacity
    while True:
        total += n
        if n == 1:
            return total
        n = -(-n // fanout)


# --- table ---------------------------------------------------------------------------------------------------


class Table:
    """One replay table. Get one with `Table.create` (writers and learners may both call it: the first
    creates, the others open after checking the options match) or `Table.open` (options read from Redis)."""

    def __init__(
        self, client: redis.Redis, namespace: str, name: str, stored: Mapping[str, Any], seed: int | None = None
    ) -> None:
        self.redis = client
        self.namespace = namespace
        self.name = name
        self.prefix = _prefix(namespace, name)
        self.options = TableOptions.from_json(stored["options"])
        self.table_id: str = stored["table_id"]
        self.layout: dict[str, int] = dict(stored["layout"])
        self._keys = [self.prefix + "state", self.prefix + "tree"]
        self._rng = np.random.default_rng(seed)
        self._insert = client.register_script(scripts.INSERT)
        self._sample = client.register_script(scripts.SAMPLE)
        self._update = client.register_script(scripts.UPDATE_PRIORITIES)
        self._check = client.register_script(scripts.CHECK)
        self._get = client.register_script(scripts.GET)

    @property
    def schema(self) -> Schema:
        return self.options.schema

    @property
    def max_size(self) -> int:
        return self.options.max_size

    def __repr__(self) -> str:
        return f"Table({self.namespace}/{self.name}, {self.options.sampler.kind}, max_size={self.max_size})"

    # -- lifecycle --------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        client: redis.Redis,
        namespace: str,
        name: str,
        schema: Schema,
        max_size: int,
        sampler: Sampler | SamplerKind = "uniform",
        remover: Remover = "fifo",
        rate_limiter: RateLimiter | None = None,
        *,
        seed: int | None = None,
    ) -> Table:
        """Create the table, or open it if it exists with the same schema and options (else an error)."""
        sampler_ = Sampler(sampler) if isinstance(sampler, str) else sampler
        limiter = rate_limiter if rate_limiter is not None else RateLimiter()
        if not isinstance(schema, Schema):
            raise SchemaError(f"schema must be a services.replay.Schema, not {type(schema).__name__}")
        if isinstance(max_size, bool) or int(max_size) != max_size or max_size < 1:
            raise ReplayError(f"max_size must be an integer >= 1, got {max_size!r}")
        if remover != "fifo":
            raise ReplayError(f"remover must be 'fifo' (evict the oldest item at max_size), not {remover!r}")
        if limiter.min_size_to_sample > max_size:
            raise ReplayError(
                f"min_size_to_sample {limiter.min_size_to_sample} > max_size {max_size}: sampling could never start"
            )
        options = TableOptions(schema, int(max_size), sampler_, remover, limiter)
        rs = schema.record_size
        layout = {
            "record_size": rs,
            "slots_per_chunk": max(1, min(int(max_size), CHUNK_BYTES // rs)),
            "fanout": TREE_FANOUT,
        }
        stored = {
            "format": FORMAT_VERSION,
            "table_id": uuid.uuid4().hex,
            "options": options.to_json(),
            "layout": layout,
        }
        spi = limiter.samples_per_insert
        state = {
            "table_id": stored["table_id"],
            "capacity": int(max_size),
            "record_size": rs,
            "slots_per_chunk": layout["slots_per_chunk"],
            "fanout": TREE_FANOUT,
            "sampler": sampler_.kind,
            "alpha": repr(float(sampler_.alpha)),
            "min_size": int(limiter.min_size_to_sample),
            "spi": "" if spi is None else repr(float(spi)),
            "min_diff": repr(float(limiter.min_diff)),
            "max_diff": repr(float(limiter.max_diff)),
            "head": 0,
            "tail": 0,
            "samples": 0,
            "max_priority": "1.0",
        }
        for counter in COUNTERS:
            state.setdefault(counter, 0)
        prefix = _prefix(namespace, name)
        tree_nodes = _tree_nodes(int(max_size), TREE_FANOUT) if sampler_.kind == "prioritized" else 0
        argv: list[Any] = [name, json.dumps(stored, sort_keys=True), tree_nodes]
        for k, v in state.items():
            argv += [k, v]
        created, text = client.register_script(scripts.CREATE)(
            keys=[prefix + "schema", prefix + "state", prefix + "tree", f"rlfleet:{namespace}:tables"], args=argv
        )
        if created:
            return cls(client, namespace, name, stored, seed)
        existing = _load_stored(text, namespace, name)
        theirs = TableOptions.from_json(existing["options"])
        if theirs.schema != schema:
            raise SchemaError(
                f"table {namespace}/{name} exists with another schema ({schema.diff(theirs.schema)}); "
                f"stored schema {theirs.schema.describe()}: open it with Table.open or use another name"
            )
        if theirs != options:
            diffs = [
                f"{k}: {getattr(options, k)!r} vs stored {getattr(theirs, k)!r}"
                for k in ("max_size", "sampler", "remover", "rate_limiter")
                if getattr(options, k) != getattr(theirs, k)
            ]
            raise ReplayError(f"table {namespace}/{name} exists with other options: {'; '.join(diffs)}")
        return cls(client, namespace, name, existing, seed)

    @classmethod
    def open(cls, client: redis.Redis, namespace: str, name: str, *, seed: int | None = None) -> Table:
        """Open an existing table; its schema and options come from Redis."""
        text = client.get(_prefix(namespace, name) + "schema")
        if text is None:
            raise TableNotFound(f"no replay table {name!r} in namespace {namespace!r}")
        return cls(client, namespace, name, _load_stored(text, namespace, name), seed)

    def drop(self) -> None:
        """Delete the table's keys (data, tree, counters, schema)."""
        chunks = -(-self.max_size // self.layout["slots_per_chunk"])
        keys = [self.prefix + s for s in ("schema", "state", "tree")] + [
            f"{self.prefix}data:{c}" for c in range(chunks)
        ]
        pipe = self.redis.pipeline(transaction=True)
        for i in range(0, len(keys), 1000):
            pipe.delete(*keys[i : i + 1000])
        pipe.srem(f"rlfleet:{self.namespace}:tables", self.name)
        pipe.execute()

    # -- writing ----------------------------------------------------------------------------------------------

    def insert(self, batch: Mapping[str, Any], priorities: Any = None, *, timeout: float | None = None) -> np.ndarray:
        """Insert a batch {field: (n, *shape)} atomically; returns the n new keys. Waits while the rate
        limiter refuses (RateLimiterTimeout after `timeout` s; None waits for ever)."""
        keys = self._insert_call(batch, priorities, timeout, block=True)
        assert keys is not None
        return keys

    def try_insert(self, batch: Mapping[str, Any], priorities: Any = None) -> np.ndarray | None:
        """Like `insert`, but returns None at once ("not now") when the rate limiter refuses."""
        return self._insert_call(batch, priorities, 0.0, block=False)

    def _insert_call(
        self, batch: Mapping[str, Any], priorities: Any, timeout: float | None, block: bool
    ) -> np.ndarray | None:
        n, data = self.schema.encode(batch)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if n > self.max_size:
            raise ReplayError(f"batch of {n} items is larger than table {self.name}'s max_size {self.max_size}")
        prios = b"" if priorities is None else self._priorities_bytes(priorities, n)
        reply = self._call_limited(
            "insert", n, timeout, block, lambda: self._insert(self._keys, [self.prefix, self.table_id, n, data, prios])
        )
        if reply is None:
            return None
        return np.arange(int(reply[1]), int(reply[1]) + n, dtype=np.int64)

    def _priorities_bytes(self, priorities: Any, n: int) -> bytes:
        if self.options.sampler.kind != "prioritized":
            raise ReplayError(f"table {self.name} samples {self.options.sampler.kind}: it has no priorities")
        p = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if p.shape != (n,):
            raise ReplayError(f"priorities have {p.size} values for {n} items")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ReplayError("priorities must be finite and >= 0")
        return p.astype("<f8").tobytes()

    def update_priorities(self, keys: Any, priorities: Any) -> int:
        """Set new priorities (e.g. |TD error| + eps) for sampled keys; keys evicted since are skipped.
        Returns how many were updated."""
        k = np.asarray(keys).reshape(-1)
        if k.size and k.dtype.kind not in "iu":
            raise ReplayError(f"keys must be integers (the keys a sample returned), not {k.dtype}")
        p = self._priorities_bytes(priorities, k.size)
        if k.size == 0:
            return 0
        return int(self._run(self._update, [k.astype("<f8").tobytes(), p]))

    # -- reading ----------------------------------------------------------------------------------------------

    def sample(self, batch_size: int, *, timeout: float | None = None, beta: float | None = None) -> Sample:
        """Sample `batch_size` items (with replacement, except FIFO, which hands out the oldest once).
        Waits while the rate limiter refuses (RateLimiterTimeout after `timeout` s; None waits for ever).

            data, keys, probabilities, weights, table_size = table.sample(256)

        `weights` are the importance weights for `beta` (default: the sampler's), ones unless prioritised."""
        result = self._sample_call(batch_size, timeout, beta, block=True)
        assert result is not None
        return result

    def try_sample(self, batch_size: int, *, beta: float | None = None) -> Sample | None:
        """Like `sample`, but returns None at once ("not now") when the rate limiter refuses."""
        return self._sample_call(batch_size, 0.0, beta, block=False)

    def _sample_call(self, b: int, timeout: float | None, beta: float | None, block: bool) -> Sample | None:
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise ReplayError(f"batch_size must be an integer >= 1, got {b!r}")
        b = int(b)
        if self.options.sampler.kind == "fifo" and b > self.max_size:
            raise ReplayError(
                f"FIFO sample of {b} can never be served by table {self.name} of max_size {self.max_size}"
            )
        uniforms = self._rng.random(b).astype("<f8").tobytes()
        reply = self._call_limited(
            "sample", b, timeout, block, lambda: self._sample(self._keys, [self.prefix, self.table_id, b, uniforms])
        )
        if reply is None:
            return None
        _, data, keys, probs, size = reply
        probabilities = np.frombuffer(probs, dtype="<f8").astype(np.float64)
        if self.options.sampler.kind == "prioritized":
            weights = importance_weights(probabilities, int(size), self.options.sampler.beta if beta is None else beta)
        else:
            weights = np.ones(b, dtype=np.float64)
        return Sample(
            data=self.schema.decode(data, b),
            keys=np.frombuffer(keys, dtype="<f8").astype(np.int64),
            probabilities=probabilities,
            weights=weights,
            table_size=int(size),
        )

    def get(self, keys: Any) -> dict[str, np.ndarray]:
        """The records of `keys` (as `insert` returned them), in order, read atomically: {field: (m, ...)}.
        A key the FIFO remover or sampler has dropped (or never inserted) raises KeyNotLive, naming it. A read by
        key is not a sample: no counter moves and the rate limiter does not apply."""
        k = np.asarray(keys)
        if k.ndim != 1 or not (k.size == 0 or np.issubdtype(k.dtype, np.integer)) or (k.size and k.min() < 0):
            raise ReplayError(f"keys must be a 1-D array of non-negative integers, got {keys!r}")
        if k.size == 0:
            return self.schema.decode(b"", 0)
        data = self._run(self._get, [k.astype("<f8").tobytes()])
        return self.schema.decode(data, int(k.size))

    def live_keys(self) -> range:
        """The keys of the items in the table now: head .. tail - 1."""
        head, tail = self.redis.hmget(self.prefix + "state", "head", "tail")
        if tail is None:
            raise TableNotFound(f"replay table {self.namespace}/{self.name} no longer exists")
        return range(int(head), int(tail))

    def size(self) -> int:
        """Items in the table now (tail - head)."""
        head, tail = self.redis.hmget(self.prefix + "state", "head", "tail")
        if tail is None:
            raise TableNotFound(f"replay table {self.namespace}/{self.name} no longer exists")
        return int(tail) - int(head)

    def info(self) -> dict[str, Any]:
        """Options, size and the shared counters (see COUNTERS), plus Redis's clock for rate computation."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.prefix + "state")
        pipe.time()
        raw, (secs, micros) = pipe.execute()
        if not raw:
            raise TableNotFound(f"replay table {self.namespace}/{self.name} no longer exists")
        st = {k.decode(): v.decode() for k, v in raw.items()}
        head, tail = int(st["head"]), int(st["tail"])
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "sampler": self.options.sampler.kind,
            "max_size": self.max_size,
            "size": tail - head,
            "inserts": tail,
            "samples": int(st["samples"]),
            "schema": json.loads(self.schema.to_json()),
            "options": self.options.to_json(),
            "server_time": secs + micros / 1e6,
        }
        spi = self.options.rate_limiter.samples_per_insert
        out["rate_limiter_diff"] = None if spi is None else tail * spi - int(st["samples"])
        for counter in COUNTERS:
            value = st.get(counter, "0")
            out[counter] = float(value) if counter.endswith("_s") else int(float(value))
        out["max_priority"] = float(st["max_priority"])
        return out

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _run(self, script: Any, args: list[Any]) -> Any:
        try:
            return script(self._keys, [self.prefix, self.table_id, *args])
        except redis.ResponseError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: redis.ResponseError) -> Exception:
        msg = str(exc)
        where = f"replay table {self.namespace}/{self.name}"
        if "RLFLEET_NOTABLE" in msg:
            return TableNotFound(f"{where} no longer exists")
        if "RLFLEET_STALE" in msg:
            return TableNotFound(f"{where} was dropped and created again: open it again")
        if "RLFLEET_ZEROPRIO" in msg:
            return ReplayError(f"{where}: every priority is zero, nothing can be sampled")
        if "RLFLEET_GONE" in msg:
            key, head, tail = (int(float(x)) for x in msg[msg.index("RLFLEET_GONE") :].split()[1:4])
            return KeyNotLive(f"{where}: key {key} is not in the table (live keys {head}..{tail - 1})", key,
                              range(head, tail))
        if "RLFLEET_NOPRIO" in msg:
            return ReplayError(f"{where} samples {self.options.sampler.kind}: it has no priorities to update")
        if "RLFLEET_" in msg:
            return ReplayError(f"{where}: {msg[msg.index('RLFLEET_') :]}")
        return exc

    def _call_limited(self, op: str, n: int, timeout: float | None, block: bool, call: Any) -> Any:
        """Run `call` (an insert/sample script call); while the limiter refuses, wait and retry."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        waited = False
        delay = _POLL_FIRST_S
        try:
            while True:
                reply = call()
                if int(reply[0]) == 1:
                    return reply
                if not block:
                    return None
                waited = True
                # Poll the read-only check script (no payload) until the limiter would allow the call.
                while True:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        self.redis.hincrby(self.prefix + "state", f"{op}_timeouts", 1)
                        raise RateLimiterTimeout(self._blocked_message(op, n, reply[1], timeout))
                    time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - now)))
                    delay = min(2 * delay, _POLL_MAX_S)
                    if self._run(self._check, [op, n]) in (b"", ""):
                        break
        except redis.ResponseError as exc:
            raise self._translate(exc) from exc
        finally:
            if waited:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hincrby(self.prefix + "state", f"{op}_waits", 1)
                pipe.hincrbyfloat(self.prefix + "state", f"{op}_wait_s", time.monotonic() - started)
                pipe.execute()

    def _blocked_message(self, op: str, n: int, reason: bytes | str, timeout: float | None) -> str:
        reason = reason.decode() if isinstance(reason, bytes) else reason
        info = self.info()
        lim = self.options.rate_limiter
        what = {
            "min_size": (
                f"the table holds {info['size']} items, sampling starts at "
                f"min_size_to_sample={lim.min_size_to_sample}"
            ),
            "fifo_size": f"the FIFO table holds {info['size']} unconsumed items, fewer than {n}",
            "samples_per_insert": (
                f"samples_per_insert={lim.samples_per_insert}: inserts={info['inserts']} samples={info['samples']} "
                f"diff={info['rate_limiter_diff']} must stay in [{lim.min_diff}, {lim.max_diff}]"
            ),
        }.get(reason, reason)
        return (
            f"{op} of {n} into/from replay table {self.namespace}/{self.name} still refused after {timeout} s: {what}"
        )


# Shared counters kept in the table's state hash (besides head/tail/samples).
COUNTERS = (
    "insert_calls",
    "sample_calls",
    "evicted",
    "consumed",
    "priority_updates",
    "insert_waits",
    "sample_waits",
    "insert_wait_s",
    "sample_wait_s",
    "insert_timeouts",
    "sample_timeouts",
)


def _load_stored(text: bytes | str, namespace: str, name: str) -> dict[str, Any]:
    try:
        stored = json.loads(text)
    except ValueError as exc:
        raise ReplayError(f"replay table {namespace}/{name}: stored schema is not JSON ({exc})") from exc
    if stored.get("format") != FORMAT_VERSION:
        raise ReplayError(
            f"replay table {namespace}/{name} has storage format {stored.get('format')!r}; "
            f"this rlfleet reads format {FORMAT_VERSION}"
        )
    return stored


# --- client --------------------------------------------------------------------------------------------------


class ReplayClient:
    """The replay tables of one namespace (one run): `rlfleet:<namespace>:<table>:...` keys."""

    def __init__(self, client: redis.Redis | None = None, namespace: str = "default") -> None:
        if client is None:
            from services.replay.connection import redis_from_env

            client = redis_from_env()
        self.redis = client
        self.namespace = _check_name("namespace", namespace)

    def create_table(
        self,
        name: str,
        schema: Schema,
        max_size: int,
        sampler: Sampler | SamplerKind = "uniform",
        remover: Remover = "fifo",
        rate_limiter: RateLimiter | None = None,
        *,
        seed: int | None = None,
    ) -> Table:
        return Table.create(
            self.redis, self.namespace, name, schema, max_size, sampler, remover, rate_limiter, seed=seed
        )

    def table(self, name: str, *, seed: int | None = None) -> Table:
        return Table.open(self.redis, self.namespace, name, seed=seed)

    def tables(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(f"rlfleet:{self.namespace}:tables"))

    def drop_table(self, name: str) -> None:
        self.table(name).drop()
