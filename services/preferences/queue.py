"""The preference queue: Redis Streams with consumer groups, one queue per namespace (run).

    producers --add--> [unlabelled] --judges: lease + label--> [labelled] --learners: read, claim, ack
                        group "judges"                         group "learners"

Keys are ``rlfleet:<namespace>:preferences:queue:*`` (next to the replay tables' ``rlfleet:<namespace>:*``).

Guarantees, and how:

- **Nothing silently lost.** A pair leaves `unlabelled` only inside the script that writes its labelled
  copy, and leaves `labelled` only inside the script that acknowledges it. Streams are never trimmed
  (no MAXLEN): the queue is bounded by refusing adds instead. `add` is all or nothing: a batch with one
  bad record raises and writes none of it; a full queue makes `add` wait up to `timeout` and then raise
  `QueueFull`, with the batch still in the caller's hands.
- **At least once to learners.** `Learner.read` delivers a labelled pair to one learner (XREADGROUP);
  it stays pending for that learner until `ack`, which a learner calls only after the update that used
  it. If the learner dies, `Learner.reclaim` (XAUTOCLAIM, entries idle longer than `min_idle_s`) hands
  its pending pairs to another learner.
- **Never used twice in one epoch.** Every labelled pair carries an epoch (the queue's current epoch
  when it was labelled, or the one given on import). `ack` is the single point where a pair counts as
  used: in one script it checks that the entry is still pending *for this learner*, adds the pair id to
  the epoch's dedup set ``used:<epoch>``, and acknowledges and deletes the entry. A pair id already in
  that set is never handed out again (`reclaim` and `claim` drop it) and never counted again (`ack`
  says "duplicate"); an entry another learner has reclaimed is not acked by the first (it says
  "not_owned"). Learners call `claim(batch)` right before the update: it keeps only entries still theirs
  and resets their idle time, so no reclaim (which needs `min_idle_s` of idleness) can take them
  while the update runs, as long as claim -> ack takes less than `min_idle_s`. A learner killed
  between its update and its ack loses that update with its process (the weights live in it), so the
  reclaimer's use is the only one that counts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from services.preferences import scripts
from services.preferences.errors import AlreadyLabelled, PairNotFound, PreferenceError, QueueFull, RecordError
from services.preferences.schema import (
    Label,
    LabelledPair,
    Pair,
    Preferred,
    check_id,
    check_preferred,
    dumps,
    label_from_obj,
    loads,
    pair_from_obj,
)

FORMAT_VERSION = "1"
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
DEFAULT_MAX_LEN = 10_000
COUNTERS = (
    "added",  # pairs that entered the queue (unlabelled adds and labelled imports)
    "labelled",  # labels written (by judges, and imported)
    "acked",  # labelled pairs acknowledged by learners (used once in their epoch)
    "reclaimed",  # labelled pairs a learner took over from another (XAUTOCLAIM)
    "leases_expired",  # unlabelled pairs handed to another judge after their lease expired
    "duplicates",  # deliveries dropped because the pair was already used in its epoch
    "ack_not_owned",  # acks refused because another learner had reclaimed the pair meanwhile
    "dead",  # entries that did not decode, moved to the dead-letter stream
    "full_waits",  # add calls that found the queue full (and waited, unless timeout=0)
    "full_timeouts",  # add calls that gave up (QueueFull)
)
_POLL_FIRST_S, _POLL_MAX_S = 0.001, 0.05


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PreferenceQueue:
    """The preference queue of one namespace. Creates it on first use (with `max_len`), else opens it."""

    def __init__(self, client: redis.Redis | None = None, namespace: str = "default", *, max_len: int | None = None):
        if client is None:
            from services.replay.connection import redis_from_env

            client = redis_from_env()
        self.redis = client
        if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):  # the replay tables' rule
            raise PreferenceError(
                f"namespace {namespace!r} is not valid: use 1-200 of the characters A-Z a-z 0-9 _ . -"
            )
        self.namespace = namespace
        self.prefix = f"rlfleet:{namespace}:preferences:queue:"
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise PreferenceError(f"max_len must be an integer >= 1, got {max_len!r}")
        version = str(client.info("server").get("redis_version", "0"))
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (6, 2):
            raise PreferenceError(f"the preference queue needs Redis >= 6.2 (XAUTOCLAIM); this server is {version}")
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in ("CREATE", "ADD", "LEASE", "LABEL", "RECLAIM", "SETTLE", "DEAD_LETTER")
        }
        fmt, stored = self._scripts["CREATE"](args=[self.prefix, FORMAT_VERSION, max_len or DEFAULT_MAX_LEN])
        if _s(fmt) != FORMAT_VERSION:
            raise PreferenceError(
                f"preference queue {namespace} has storage format {_s(fmt)!r}; this rlfleet reads {FORMAT_VERSION}"
            )
        self.max_len = int(stored)
        if max_len is not None and max_len != self.max_len:
            raise PreferenceError(
                f"preference queue {namespace} exists with max_len={self.max_len}, not {max_len}: "
                "open it without max_len, or drop() it first"
            )

    # -- producers ------------------------------------------------------------------------------------------

    def add(self, pairs: Iterable[Pair | Mapping[str, Any]], *, timeout: float | None = 30.0) -> list[str]:
        """Add unlabelled pairs (all or nothing); returns their ids. While the queue is full, waits up to
        `timeout` seconds (None: forever) for learners to make room, then raises QueueFull."""
        checked = [pair_from_obj(p, f"record #{i}") for i, p in enumerate(pairs)]
        args: list[Any] = []
        for p in checked:
            args += [p.pair_id, dumps(p.to_obj())]
        self._add("u", "", checked, args, timeout)
        return [p.pair_id for p in checked]

    def add_labelled(
        self,
        items: Iterable[tuple[Pair | Mapping[str, Any], Label]],
        *,
        epoch: int | None = None,
        timeout: float | None = 30.0,
    ) -> list[str]:
        """Add pairs that already have a label (an imported dataset) straight to the labelled stream, in
        `epoch` (default: the current one). A pair used in an earlier epoch may be added again for a later
        one (a second pass); one still in the queue, or already used in `epoch`, is refused."""
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise PreferenceError(f"epoch must be an integer >= 0, got {epoch!r}")
        checked: list[Pair] = []
        args: list[Any] = []
        for i, (p, label) in enumerate(items):
            pair = pair_from_obj(p, f"record #{i}")
            if not isinstance(label, Label):
                raise RecordError(f"record #{i} ({pair.pair_id}): label must be a Label, got {type(label).__name__}")
            checked.append(pair)
            args += [pair.pair_id, dumps(pair.to_obj()), dumps(label.to_obj())]
        self._add("l", "" if epoch is None else str(epoch), checked, args, timeout)
        return [p.pair_id for p in checked]

    def _add(self, kind: str, epoch: str, pairs: list[Pair], args: list[Any], timeout: float | None) -> None:
        if not pairs:
            return
        ids = [p.pair_id for p in pairs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise RecordError(f"pair id {dup} appears twice in one add")
        if len(pairs) > self.max_len:
            raise PreferenceError(
                f"a batch of {len(pairs)} pairs can never fit preference queue {self.namespace} "
                f"(max_len={self.max_len}): add smaller batches"
            )
        call_args = [self.prefix, kind, epoch, len(pairs), *args]
        started = time.monotonic()
        delay = _POLL_FIRST_S
        waited = False
        try:
            while True:
                reply = self._run("ADD", call_args)
                if int(reply[0]) == 1:
                    return
                unconsumed = int(reply[1])
                waited = True
                elapsed = time.monotonic() - started
                if timeout is not None and elapsed >= timeout:
                    self.redis.hincrby(self.prefix + "meta", "full_timeouts", 1)
                    raise QueueFull(
                        f"preference queue {self.namespace} is full: {unconsumed} of max_len={self.max_len} pairs "
                        f"not yet consumed, no room for {len(pairs)} more after waiting {timeout:g} s; "
                        "nothing of this batch was added (label and consume faster, or raise max_len)"
                    )
                pause = delay if timeout is None else min(delay, timeout - elapsed)
                time.sleep(max(pause, 0.0))
                delay = min(2 * delay, _POLL_MAX_S)
        finally:
            if waited:
                self.redis.hincrby(self.prefix + "meta", "full_waits", 1)

    # -- judges ---------------------------------------------------------------------------------------------

    def lease(self, consumer: str, count: int = 1, *, lease_s: float | None = 60.0) -> list[Pair]:
        """Hand `consumer` up to `count` unlabelled pairs: first any another judge has held longer than
        `lease_s` without labelling it (None: never take from others), then fresh ones. Non-blocking."""
        check_id(consumer, "judge id")
        idle_ms = -1 if lease_s is None else int(lease_s * 1000)
        raw = self._run("LEASE", [self.prefix, consumer, idle_ms, _count(count)])
        return [p for p in (self._decode_unlabelled(e) for e in raw) if p is not None]

    def label(self, pair_id: str, preferred: Preferred, judge_id: str) -> str:
        """Label one pair; returns its labelled entry id. PairNotFound / AlreadyLabelled otherwise."""
        status = self.label_many([(pair_id, preferred)], judge_id)[0]
        if status == "missing":
            raise PairNotFound(f"no pair {pair_id!r} in preference queue {self.namespace}")
        if status == "labelled":
            raise AlreadyLabelled(f"pair {pair_id!r} is already labelled (the first label wins)")
        return status

    def label_many(self, labels: Iterable[tuple[str, Preferred]], judge_id: str) -> list[str]:
        """Label several pairs in one round trip. Per pair: its labelled entry id, or "missing" (no such
        pair) or "labelled" (already labelled). Labels are checked before anything is written."""
        now = time.time()
        args: list[Any] = [self.prefix, 0]
        for pair_id, preferred in labels:
            check_id(pair_id, "pair id")
            label = Label(check_preferred(preferred), judge_id, now)
            args += [pair_id, dumps(label.to_obj())]
        args[1] = (len(args) - 2) // 2
        return [_s(x) for x in self._run("LABEL", args)]

    def judge(self, judge_id: str) -> Judge:
        return Judge(self, judge_id)

    # -- learners -------------------------------------------------------------------------------------------

    def learner(self, consumer: str) -> Learner:
        return Learner(self, consumer)

    # -- epochs, inspection, clean-up -----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        value = self.redis.hget(self.prefix + "meta", "epoch")
        if value is None:
            raise PreferenceError(f"preference queue {self.namespace} no longer exists")
        return int(value)

    def start_epoch(self) -> int:
        """Start the next epoch (labels written from now on belong to it); returns its number."""
        self._run_check()
        return int(self.redis.hincrby(self.prefix + "meta", "epoch", 1))

    def used(self, epoch: int) -> set[str]:
        """The ids of the pairs acked (used) in `epoch`."""
        return {_s(m) for m in self.redis.smembers(f"{self.prefix}used:{epoch}")}

    def forget_epoch(self, epoch: int) -> None:
        """Drop an old epoch's dedup set (memory); only do this once no pair of that epoch is queued."""
        self.redis.delete(f"{self.prefix}used:{epoch}")

    def pending(self) -> dict[str, int]:
        """Pairs not yet consumed, per stream: awaiting a label, and labelled but not yet acked."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.prefix + "unlabelled")
        pipe.xlen(self.prefix + "labelled")
        unlabelled, labelled = pipe.execute()
        return {"unlabelled": int(unlabelled), "labelled": int(labelled)}

    def info(self) -> dict[str, Any]:
        """Sizes, epoch and the shared counters (see COUNTERS), summed over every client of the queue."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.prefix + "meta")
        pipe.xlen(self.prefix + "unlabelled")
        pipe.xlen(self.prefix + "labelled")
        pipe.xpending(self.prefix + "unlabelled", "judges")
        pipe.xpending(self.prefix + "labelled", "learners")
        meta, unlabelled, labelled, jp, lp = pipe.execute()
        if not meta:
            raise PreferenceError(f"preference queue {self.namespace} no longer exists")
        m = {_s(k): _s(v) for k, v in meta.items()}
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "max_len": int(m["max_len"]),
            "epoch": int(m["epoch"]),
            "awaiting_label": int(unlabelled),
            "awaiting_ack": int(labelled),
            "leased_to_judges": int(jp["pending"]),
            "held_by_learners": int(lp["pending"]),
        }
        out.update({c: int(m.get(c, 0)) for c in COUNTERS})
        return out

    def dead_letters(self) -> list[dict[str, str]]:
        """Entries that did not decode (with the reason; bytes that are not UTF-8 shown escaped), oldest first."""

        def text(b: bytes) -> str:
            return b.decode("utf-8", errors="backslashreplace")

        return [
            {text(k): text(v) for k, v in fields.items()} | {"dead_id": text(i)}
            for i, fields in self.redis.xrange(self.prefix + "dead")
        ]

    def labelled_snapshot(self, count: int | None = None) -> list[LabelledPair]:
        """The labelled pairs not yet acked, oldest first, without consuming them (for export)."""
        out = []
        for entry_id, fields in self.redis.xrange(self.prefix + "labelled", count=count):
            out.append(decode_labelled(entry_id, fields))
        return out

    def drop(self) -> None:
        """Delete the whole queue (every key under its prefix)."""
        keys = list(self.redis.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            self.redis.delete(*keys)

    # -- plumbing -------------------------------------------------------------------------------------------

    def _run(self, name: str, args: list[Any]) -> Any:
        try:
            return self._scripts[name](args=args)
        except redis.ResponseError as exc:
            raise self._translate(exc) from None

    def _run_check(self) -> None:
        if not self.redis.exists(self.prefix + "meta"):
            raise PreferenceError(f"preference queue {self.namespace} no longer exists")

    def _translate(self, exc: redis.ResponseError) -> Exception:
        msg = str(exc)
        where = f"preference queue {self.namespace}"
        if "RLFLEET_NOQUEUE" in msg:
            return PreferenceError(f"{where} no longer exists (dropped): create it again")
        if "RLFLEET_DUPLICATE" in msg:
            _, pid, state, *_ = msg[msg.index("RLFLEET_") :].split(" ") + [""]
            what = {"u": "waiting for a label", "l": "labelled, not yet used", "d": "already used"}.get(state, state)
            return RecordError(f"pair id {pid} is already in {where} ({what}); nothing of the batch was added")
        if "RLFLEET_USED" in msg:
            _, pid, epoch = msg[msg.index("RLFLEET_") :].split(" ")[:3]
            return RecordError(f"pair {pid} was already used in epoch {epoch} of {where}; nothing was added")
        return exc

    def _read_new(self, stream: str, group: str, consumer: str, count: int, block_s: float | None) -> list[Any]:
        """Entries of `stream` never delivered to `group` before (XREADGROUP >), waiting up to `block_s`."""
        try:
            reply = self.redis.xreadgroup(
                group,
                consumer,
                {self.prefix + stream: ">"},
                count=count,
                block=None if not block_s else max(1, int(block_s * 1000)),
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise PreferenceError(f"preference queue {self.namespace} no longer exists (dropped)") from None
            raise
        return reply[0][1] if reply else []

    def _dead_letter(self, stream: str, group: str, entry_id: str, reason: str) -> None:
        self._run("DEAD_LETTER", [self.prefix, stream, group, entry_id, reason[:500]])

    def _decode_unlabelled(self, entry: Sequence[Any]) -> Pair | None:
        entry_id, fields = _s(entry[0]), _fields(entry[1])
        try:
            return pair_from_obj(loads(fields.get("pair", b""), "pair"), f"entry {entry_id}")
        except RecordError as exc:
            self._dead_letter("unlabelled", "judges", entry_id, str(exc))
            return None

    def _decode_labelled(self, entry: Sequence[Any]) -> LabelledPair | None:
        try:
            return decode_labelled(entry[0], _fields(entry[1]))
        except RecordError as exc:
            self._dead_letter("labelled", "learners", _s(entry[0]), str(exc))
            return None


def _fields(raw: Any) -> dict[str, bytes]:
    """Stream entry fields as a dict, whether redis-py gave a dict or Lua gave a flat list."""
    if isinstance(raw, dict):
        return {_s(k): v for k, v in raw.items()}
    return {_s(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}


def decode_labelled(entry_id: bytes | str, fields: Any) -> LabelledPair:
    """A labelled stream entry, checked like a fresh record (RecordError when it does not decode)."""
    eid = _s(entry_id)
    f = _fields(fields)
    where = f"labelled entry {eid}"
    pair = pair_from_obj(loads(f.get("pair", b""), where), where)
    label = label_from_obj(loads(f.get("label", b""), where), f"{where}: label")
    epoch = _s(f.get("epoch", b""))
    if not epoch.isdigit():
        raise RecordError(f"{where}: epoch must be an integer >= 0, got {epoch!r}")
    return LabelledPair(entry_id=eid, pair=pair, label=label, epoch=int(epoch))


def _count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PreferenceError(f"count must be an integer >= 1, got {count!r}")
    return count


class Judge:
    """A labeller (a script, a reward function): takes unlabelled pairs and labels them."""

    def __init__(self, queue: PreferenceQueue, judge_id: str) -> None:
        self.queue = queue
        self.judge_id = check_id(judge_id, "judge id")

    def next(self, count: int = 1, *, lease_s: float | None = 60.0, block_s: float | None = None) -> list[Pair]:
        """Up to `count` pairs to label (see `PreferenceQueue.lease`); when there are none and `block_s`
        is given, waits up to that long for new ones."""
        got = self.queue.lease(self.judge_id, count, lease_s=lease_s)
        if got or not block_s:
            return got
        entries = self.queue._read_new("unlabelled", "judges", self.judge_id, count, block_s)
        return [p for p in (self.queue._decode_unlabelled(e) for e in entries) if p is not None]

    def label(self, pair_id: str, preferred: Preferred) -> str:
        return self.queue.label(pair_id, preferred, self.judge_id)

    def label_with(
        self,
        verdict: Callable[[Pair], Preferred],
        count: int = 64,
        *,
        lease_s: float | None = 60.0,
        block_s: float | None = None,
    ) -> int:
        """A scripted judge's step: take up to `count` pairs, label each with `verdict(pair)` (a script, a
        reward model comparing the two responses), in one round trip; returns how many were labelled."""
        pairs = self.next(count, lease_s=lease_s, block_s=block_s)
        if not pairs:
            return 0
        status = self.label_many([(p.pair_id, verdict(p)) for p in pairs])
        return sum(s not in ("missing", "labelled") for s in status)  # lost races to other judges don't count

    def label_many(self, labels: Iterable[tuple[str, Preferred]]) -> list[str]:
        return self.queue.label_many(labels, self.judge_id)


@dataclass
class AckResult:
    """What `Learner.ack` did per pair: acked now, already used in the epoch, or no longer this learner's."""

    acked: list[str]
    duplicate: list[str]
    not_owned: list[str]


class Learner:
    """A consumer of labelled pairs: `read` (or `reclaim`), `claim` right before the update, `ack` after."""

    def __init__(self, queue: PreferenceQueue, consumer: str) -> None:
        self.queue = queue
        self.consumer = check_id(consumer, "learner id")

    def read(self, count: int, *, block_s: float | None = None) -> list[LabelledPair]:
        """Up to `count` labelled pairs never delivered before; waits up to `block_s` when there are none."""
        entries = self.queue._read_new("labelled", "learners", self.consumer, _count(count), block_s)
        return [p for p in (self.queue._decode_labelled(e) for e in entries) if p is not None]

    def reclaim(self, count: int, *, min_idle_s: float) -> list[LabelledPair]:
        """Take over up to `count` pairs other learners read and left unacknowledged for `min_idle_s`."""
        if not min_idle_s >= 0:
            raise PreferenceError(f"min_idle_s must be >= 0, got {min_idle_s!r}")
        raw = self.queue._run("RECLAIM", [self.queue.prefix, self.consumer, int(min_idle_s * 1000), _count(count)])
        return [p for p in (self.queue._decode_labelled(e) for e in raw) if p is not None]

    def next_batch(self, count: int, *, min_idle_s: float = 60.0, block_s: float | None = None) -> list[LabelledPair]:
        """Orphaned pairs first (reclaim), then fresh ones (read), up to `count` together."""
        got = self.reclaim(count, min_idle_s=min_idle_s)
        if len(got) < count:
            got += self.read(count - len(got), block_s=None if got else block_s)
        return got

    def claim(self, batch: Sequence[LabelledPair]) -> list[LabelledPair]:
        """Call right before the update: the pairs of `batch` still held by this learner and not yet used
        in their epoch (their idle time reset). Use only these in the update."""
        status = self._settle("claim", batch)
        return [p for p, s in zip(batch, status) if s == "ok"]

    def ack(self, batch: Sequence[LabelledPair]) -> AckResult:
        """Call after the update that used `batch`: marks each pair used in its epoch and acknowledges it."""
        status = self._settle("ack", batch)
        result = AckResult([], [], [])
        for p, s in zip(batch, status):
            {"ok": result.acked, "duplicate": result.duplicate, "not_owned": result.not_owned}[s].append(p.pair_id)
        return result

    def _settle(self, mode: str, batch: Sequence[LabelledPair]) -> list[str]:
        if not batch:
            return []
        args: list[Any] = [self.queue.prefix, self.consumer, mode, len(batch)]
        for p in batch:
            args += [p.entry_id, p.pair_id, p.epoch]
        return [_s(x) for x in self.queue._run("SETTLE", args)]
