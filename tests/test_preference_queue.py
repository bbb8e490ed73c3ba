"""The preference queue against a real Redis server: schema checks, backpressure, namespaces, the
judge and learner protocols, and a killed learner whose pairs another learner finishes."""

from __future__ import annotations

import os
import signal
import threading
import time

import prometheus_client
import pytest
import redis

from conftest_replay import namespace, rclient, replay_server, run_python  # noqa: F401
from services.preferences import (
    AlreadyLabelled,
    Label,
    PairNotFound,
    PreferenceError,
    PreferenceQueue,
    QueueFull,
    RecordError,
)
from services.preferences.bench import format_table, run_preference_queue_bench
from services.preferences.metrics import COUNTER_METRICS, PENDING, PreferenceMetrics
from services.replay.connection import EmbeddedRedis


def pairs(n: int, start: int = 0, tag: str = "p") -> list[dict]:
    return [
        {"id": f"{tag}{i}", "prompt": f"q{i}", "responses": [f"good{i}", f"bad{i}"], "policy_version": i % 3}
        for i in range(start, start + n)
    ]


def label_all(q: PreferenceQueue, judge: str = "oracle") -> list[str]:
    j = q.judge(judge)
    got = j.next(10_000, lease_s=None)
    status = j.label_many([(p.pair_id, 0) for p in got])
    assert all(s not in ("missing", "labelled") for s in status)
    return [p.pair_id for p in got]


def test_pairs_flow_from_producer_to_judge_to_learner(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    ids = q.add(pairs(5))
    assert ids == [f"p{i}" for i in range(5)]
    assert q.pending() == {"unlabelled": 5, "labelled": 0}
    judge = q.judge("oracle")
    leased = judge.next(3, lease_s=None)
    assert [p.pair_id for p in leased] == ["p0", "p1", "p2"]
    assert leased[1].responses == ("good1", "bad1") and leased[1].policy_version == 1
    judge.label("p0", 0)
    judge.label("p1", 1)
    judge.label("p2", "tie")
    with pytest.raises(AlreadyLabelled, match="p1"):
        judge.label("p1", 0)
    with pytest.raises(PairNotFound, match="nope"):
        judge.label("nope", 0)
    assert q.pending() == {"unlabelled": 2, "labelled": 3}

    learner = q.learner("learner-0")
    batch = learner.read(10)
    assert [(b.pair_id, b.chosen, b.rejected) for b in batch] == [
        ("p0", "good0", "bad0"),
        ("p1", "bad1", "good1"),
        ("p2", None, None),
    ]
    assert all(b.label.judge_id == "oracle" and b.epoch == 0 for b in batch)
    assert learner.claim(batch) == batch
    result = learner.ack(batch)
    assert result.acked == ["p0", "p1", "p2"] and not result.duplicate and not result.not_owned
    info = q.info()
    assert (info["added"], info["labelled"], info["acked"], info["awaiting_label"], info["awaiting_ack"]) == (
        5, 3, 3, 2, 0,
    )
    assert q.used(0) == {"p0", "p1", "p2"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q", "responses": ["a"], "policy_version": 0}, "exactly 2 responses"),
        ({"prompt": "q", "responses": ["a", "b", "c"], "policy_version": 0}, "exactly 2 responses"),
        ({"prompt": "q", "responses": ["a", "b"]}, "missing field"),
        ({"prompt": "q", "responses": ["a", "b"], "policy_version": True}, "policy_version"),
        ({"prompt": "q", "responses": ["a", "b"], "policy_version": -1}, "policy_version"),
        ({"prompt": "q", "responses": ["a", [1, 2]], "policy_version": 0}, "not a mix"),
        ({"prompt": [1, -2], "responses": [[1], [2]], "policy_version": 0}, "token ids"),
        ({"prompt": 5, "responses": ["a", "b"], "policy_version": 0}, "string or a list of token ids"),
        ({"id": "bad id!", "prompt": "q", "responses": ["a", "b"], "policy_version": 0}, "not valid"),
        ({"prompt": "q", "responses": ["a", "b"], "policy_version": 0, "reward": 1}, "unknown field"),
        ({"prompt": "q", "responses": ["a", "b"], "policy_version": 0, "meta": {"t": float("nan")}}, "finite"),
        ({"prompt": "q", "responses": ["a", "b"], "policy_version": 0, "meta": {"t": [1]}}, "meta"),
        ("not a dict", "JSON object"),
    ],
)
def test_schema_rejection_writes_nothing_and_loses_nothing(
    rclient: redis.Redis, namespace: str, bad: object, message: str
) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add(pairs(2))
    with pytest.raises(RecordError, match=message) as err:
        q.add(pairs(3, start=10) + [bad] + pairs(1, start=20), timeout=0)
    assert "record #3" in str(err.value)  # names the bad record of the batch
    assert q.info()["added"] == 2 and q.pending() == {"unlabelled": 2, "labelled": 0}
    # The good records of the refused batch are still the caller's and go in unchanged.
    q.add(pairs(3, start=10) + pairs(1, start=20))
    assert sorted(p.pair_id for p in q.judge("j").next(100, lease_s=None)) == ["p0", "p1", "p10", "p11", "p12", "p20"]


def test_duplicate_ids_and_bad_labels_are_refused_whole(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add(pairs(2))
    with pytest.raises(RecordError, match="p1 is already in"):
        q.add(pairs(3, start=5) + pairs(1, start=1))
    with pytest.raises(RecordError, match="appears twice"):
        q.add(pairs(1, start=7) + pairs(1, start=7))
    assert q.info()["added"] == 2
    for bad in (2, True, "0", 1.0, None):
        with pytest.raises(RecordError, match="preferred"):
            q.label_many([("p0", 0), ("p1", bad)], "oracle")  # type: ignore[list-item]
    with pytest.raises(RecordError, match="judge id"):
        q.label("p0", 0, "no spaces please")
    assert q.pending() == {"unlabelled": 2, "labelled": 0}  # nothing was labelled by the refused calls


def test_full_queue_blocks_then_raises_queue_full_and_keeps_everything(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=4)
    q.add(pairs(3))
    started = time.monotonic()
    with pytest.raises(QueueFull, match=r"full: 3 of max_len=4 .* no room for 2 more after waiting 0.3 s"):
        q.add(pairs(2, start=3), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    with pytest.raises(PreferenceError, match="can never fit"):
        q.add(pairs(5, start=10))
    label_all(q)  # labelling moves pairs between streams: still unconsumed, still counted
    assert q.pending() == {"unlabelled": 0, "labelled": 3}
    with pytest.raises(QueueFull):
        q.add(pairs(2, start=3), timeout=0)
    info = q.info()
    assert info["added"] == 3 and info["full_timeouts"] == 2 and info["full_waits"] >= 2

    # A learner consumes while a producer waits: the add goes through once there is room.
    learner = q.learner("l0")

    def consume_later() -> None:
        time.sleep(0.2)
        learner.ack(learner.read(2))

    t = threading.Thread(target=consume_later)
    t.start()
    q.add(pairs(2, start=3), timeout=60)  # generous: only guards against a hang
    t.join()
    assert q.pending() == {"unlabelled": 2, "labelled": 1} and q.info()["added"] == 5
    # Streams are never trimmed: every pair added is either still queued or acked.
    assert q.info()["acked"] + sum(q.pending().values()) == q.info()["added"]


def test_namespaces_are_isolated(rclient: redis.Redis, namespace: str) -> None:
    a = PreferenceQueue(rclient, namespace + "-a", max_len=3)
    b = PreferenceQueue(rclient, namespace + "-b", max_len=10)
    a.add(pairs(3))
    b.add(pairs(5))  # same ids, other run: fine
    with pytest.raises(QueueFull):
        a.add(pairs(1, start=9), timeout=0)
    label_all(a)
    assert a.pending() == {"unlabelled": 0, "labelled": 3} and b.pending() == {"unlabelled": 5, "labelled": 0}
    assert b.learner("l").read(10) == []
    assert len(a.learner("l").read(10)) == 3
    assert all(k.startswith(f"rlfleet:{namespace}-a:preferences:".encode()) for k in rclient.keys(f"*{namespace}-a*"))
    a.drop()
    assert rclient.keys(f"*{namespace}-a*") == []
    with pytest.raises(PreferenceError, match="no longer exists"):
        a.add(pairs(1))
    with pytest.raises(PreferenceError, match="no longer exists"):
        a.learner("l").read(1)
    with pytest.raises(PreferenceError, match="no longer exists"):
        a.judge("j").next(1, block_s=0.01)
    assert b.pending() == {"unlabelled": 5, "labelled": 0} and b.info()["added"] == 5
    with pytest.raises(PreferenceError, match="max_len=10, not 7"):
        PreferenceQueue(rclient, namespace + "-b", max_len=7)
    for bad in ("no/slashes", "no:colons", ""):
        with pytest.raises(PreferenceError, match="namespace"):
            PreferenceQueue(rclient, bad)


def test_pairs_are_acked_only_after_the_update_and_a_slow_learner_cannot_double_use(
    rclient: redis.Redis, namespace: str
) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add(pairs(4))
    label_all(q)
    first, second = q.learner("first"), q.learner("second")
    batch = first.read(4)
    assert len(batch) == 4
    # Read but not acked: held by the learner, not used, and nobody else gets them while fresh.
    assert q.info()["held_by_learners"] == 4 and q.used(0) == set() and q.info()["acked"] == 0
    assert second.read(4) == [] and second.reclaim(4, min_idle_s=60) == []
    kept = first.claim(batch)  # right before the update
    assert kept == batch
    assert q.info()["acked"] == 0  # the update happens here; nothing is acked before it ends
    result = first.ack(batch[:2])
    assert result.acked == ["p0", "p1"] and q.used(0) == {"p0", "p1"} and q.info()["held_by_learners"] == 2

    # `first` stalls past min_idle: `second` takes the rest over and uses them.
    time.sleep(0.15)
    taken = second.reclaim(4, min_idle_s=0.1)
    assert [p.pair_id for p in taken] == ["p2", "p3"]
    assert first.claim(batch[2:]) == []  # the stalled learner learns it must not use them
    late = first.ack(batch[2:])
    assert late.not_owned == ["p2", "p3"] and late.acked == []
    assert second.ack(taken).acked == ["p2", "p3"]
    assert second.ack(taken).not_owned == ["p2", "p3"]  # acking twice counts nothing twice
    info = q.info()
    assert (info["acked"], info["reclaimed"], info["held_by_learners"]) == (4, 2, 0)
    assert q.used(0) == {"p0", "p1", "p2", "p3"}


def test_epochs_dedup_and_second_pass(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    label = Label(0, "dataset", time.time())
    q.add_labelled([(p, label) for p in pairs(3)])
    learner = q.learner("l")
    learner.ack(learner.read(3))
    assert q.used(0) == {"p0", "p1", "p2"}
    with pytest.raises(RecordError, match="already used in epoch 0"):
        q.add_labelled([(pairs(1)[0], label)], epoch=0)
    with pytest.raises(RecordError, match="already in"):
        q.add(pairs(1))  # a used pair does not go back to the judges
    assert q.start_epoch() == 1
    q.add_labelled([(p, label) for p in pairs(3)])  # a second pass, in epoch 1
    again = learner.read(3)
    assert {(b.pair_id, b.epoch) for b in again} == {("p0", 1), ("p1", 1), ("p2", 1)}
    with pytest.raises(RecordError, match="labelled, not yet used"):
        q.add_labelled([(pairs(1)[0], label)], epoch=2)
    assert learner.ack(again).acked == ["p0", "p1", "p2"]
    assert q.used(1) == {"p0", "p1", "p2"} and q.info()["acked"] == 6


def test_entries_that_do_not_decode_go_to_the_dead_letter_stream(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add_labelled([(pairs(1)[0], Label(1, "dataset", 0.0))])
    # Whoever can write to Redis can write anything: it must never reach a learner (nor be unpickled).
    rclient.xadd(q.prefix + "labelled", {"pair": b"\x80\x04\x95pickle", "label": b"{}", "epoch": b"0"})
    rclient.xadd(q.prefix + "labelled", {"pair": b'{"prompt":"q","responses":["a","b"],"policy_version":0}',
                                         "label": b'{"preferred":3,"judge_id":"x","labelled_at":0}', "epoch": b"0"})
    batch = q.learner("l").read(10)
    assert [(b.pair_id, b.chosen) for b in batch] == [("p0", "bad0")]
    dead = q.dead_letters()
    assert [d["source"] for d in dead] == ["labelled", "labelled"]
    assert "not valid JSON" in dead[0]["reason"] and "preferred must be 0, 1" in dead[1]["reason"]
    assert q.info()["dead"] == 2 and q.pending()["labelled"] == 1


def test_a_scripted_judge_labels_with_a_function(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add([{"id": f"s{i}", "prompt": "sort 3 1 2", "responses": ["1 2 3", "3 1 2"][:: 1 if i % 2 else -1],
            "policy_version": 0} for i in range(5)])
    judge = q.judge("sorted-oracle")
    assert judge.label_with(lambda p: 0 if p.responses[0] == "1 2 3" else 1, count=3) == 3
    assert judge.label_with(lambda p: 0 if p.responses[0] == "1 2 3" else 1, count=3) == 2
    assert judge.label_with(lambda p: 0, count=3) == 0
    assert {b.chosen for b in q.learner("l").read(10)} == {"1 2 3"}


def test_the_benchmark_pushes_every_pair_through(rclient: redis.Redis) -> None:
    result = run_preference_queue_bench(n=300, batch=32, max_len=64, learner_pairs_per_s=100.0)
    assert result["counters"]["acked"] == result["counters"]["labelled"] == 300
    assert result["end_to_end_pairs_per_s"] > 0 and result["max_len"] == 64  # 300 pairs through a queue of 64
    assert result["capacity_to_demand"] == pytest.approx(result["end_to_end_pairs_per_s"] / 100.0)
    assert "labelled pairs/s" in format_table(result)


def test_an_expired_judge_lease_goes_to_another_judge(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add(pairs(1))
    slow, other = q.judge("slow"), q.judge("other")
    assert [p.pair_id for p in slow.next(1)] == ["p0"]
    assert other.next(1, lease_s=60) == []
    time.sleep(0.15)
    assert [p.pair_id for p in other.next(1, lease_s=0.1)] == ["p0"]
    other.label("p0", 1)
    with pytest.raises(AlreadyLabelled):
        slow.label("p0", 0)  # the first label wins
    assert q.info()["leases_expired"] == 1 and q.learner("l").read(5)[0].label.judge_id == "other"


def test_prometheus_metrics_follow_the_queue(rclient: redis.Redis, namespace: str) -> None:
    registry = prometheus_client.CollectorRegistry()
    q = PreferenceQueue(rclient, namespace, max_len=100)
    metrics = PreferenceMetrics(q, registry=registry)
    assert metrics.backend == "prometheus"
    q.add(pairs(5))
    label_all(q)
    learner = q.learner("l")
    learner.ack(learner.read(2))
    q.learner("dead").read(3)
    time.sleep(0.05)
    learner.reclaim(3, min_idle_s=0.01)
    values = metrics.export()
    assert values[f"{PENDING}:labelled"] == 3 and values[f"{PENDING}:unlabelled"] == 0
    text = prometheus_client.generate_latest(registry).decode()
    expected = {
        f'{PENDING}{{namespace="{namespace}",stream="labelled"}} 3.0',
        f'{PENDING}{{namespace="{namespace}",stream="unlabelled"}} 0.0',
        f'rlfleet_preference_pairs_added_total{{namespace="{namespace}"}} 5.0',
        f'rlfleet_preference_pairs_labelled_total{{namespace="{namespace}"}} 5.0',
        f'rlfleet_preference_pairs_acked_total{{namespace="{namespace}"}} 2.0',
        f'rlfleet_preference_pairs_reclaimed_total{{namespace="{namespace}"}} 3.0',
    }
    assert expected <= set(text.splitlines()), text
    assert all(f"# TYPE {name} counter" in text for name in COUNTER_METRICS)


LEARNER = """
import sys, time
from services.preferences import PreferenceQueue
from services.replay.connection import redis_from_env

learner = PreferenceQueue(redis_from_env(), sys.argv[1]).learner("doomed")
batch = learner.claim(learner.read(int(sys.argv[2])))
print(" ".join(p.pair_id for p in batch), flush=True)
time.sleep(3600)  # "in the middle of the update": killed here, before its ack
"""


def test_a_killed_learner_pending_pairs_are_finished_by_another_once_each(
    replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str
) -> None:
    n, held = 30, 12
    q = PreferenceQueue(rclient, namespace, max_len=100)
    q.add(pairs(n))
    label_all(q)
    proc = run_python(LEARNER, {"REDIS_URL": replay_server.url}, namespace, str(held))
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        doomed_ids = line.split()
        assert len(doomed_ids) == held, proc.stderr.read() if proc.stderr else line
        assert q.info()["held_by_learners"] == held
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    survivor = q.learner("survivor")
    used: list[str] = []
    while True:  # the survivor's training loop: orphans first, then fresh pairs
        batch = survivor.claim(survivor.next_batch(7, min_idle_s=0.05, block_s=None))
        if not batch:
            if q.info()["held_by_learners"] == 0 and q.pending()["labelled"] == 0:
                break
            time.sleep(0.05)  # orphans not idle long enough yet
            continue
        used += [p.pair_id for p in batch]  # "the update"
        result = survivor.ack(batch)
        assert not result.duplicate and not result.not_owned
    assert sorted(used) == sorted(f"p{i}" for i in range(n))  # none lost, none used twice
    assert set(doomed_ids) <= set(used)
    info = q.info()
    assert (info["acked"], info["reclaimed"], info["duplicates"], info["held_by_learners"]) == (n, held, 0, 0)
    assert q.used(0) == {f"p{i}" for i in range(n)}
    assert q.learner("third").next_batch(100, min_idle_s=0) == []  # nothing left to hand out again


def test_inside_a_ray_actor_the_metrics_are_ray_metrics(
    ray_session: None, replay_server: EmbeddedRedis, rclient: redis.Redis, namespace: str
) -> None:
    import ray

    q = PreferenceQueue(rclient, namespace, max_len=10)
    q.add(pairs(3))

    @ray.remote(num_cpus=0)
    class Exporter:
        def export(self, url: str, namespace: str) -> tuple[str, dict[str, float], dict[str, float]]:
            queue = PreferenceQueue(redis.Redis.from_url(url), namespace)
            metrics = PreferenceMetrics(queue)  # backend "auto": Ray's, in an actor
            first = metrics.export()
            queue.judge("j").label("p0", 1)
            return metrics.backend, first, metrics.export()

    actor = Exporter.remote()
    try:
        backend, first, second = ray.get(actor.export.remote(replay_server.url, namespace), timeout=120)
    finally:
        ray.kill(actor)
    assert backend == "ray"
    assert first["rlfleet_preference_pairs_added_total"] == 3 and first[f"{PENDING}:unlabelled"] == 3
    assert second["rlfleet_preference_pairs_labelled_total"] == 1 and second[f"{PENDING}:labelled"] == 1
