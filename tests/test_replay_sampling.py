"""Samplers (uniform, prioritised, FIFO) and the FIFO remover, against a real Redis."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from scipy import stats

from conftest_replay import assert_consistent, namespace, rclient, replay_server, transition_schema, transitions  # noqa: F401
from services.replay import KeyNotLive, RateLimiter, ReplayError, Sampler, Table, importance_weights
from services.replay import table as table_module


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    return float(stats.chisquare(counts, counts.sum() * probs).pvalue)


def test_uniform_sampling_covers_the_table(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=50, sampler="uniform", seed=1)
    table.insert(transitions(0, 50))
    counts = np.zeros(50)
    for _ in range(40):
        s = table.sample(250)
        assert_consistent(s.data)
        np.testing.assert_array_equal(s.keys, s.data["action"])  # key k holds the k-th inserted item
        np.testing.assert_allclose(s.probabilities, 1 / 50)
        np.testing.assert_array_equal(s.weights, 1.0)
        np.add.at(counts, s.keys, 1)
    assert counts.min() > 0
    assert _chi_square_p(counts, np.full(50, 1 / 50)) > 0.001


def test_fifo_eviction_at_max_size_across_chunks(
    rclient: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = transition_schema()
    monkeypatch.setattr(table_module, "CHUNK_BYTES", 3 * schema.record_size)  # 3 records per chunk: 4 chunks
    table = Table.create(rclient, namespace, "t", schema, max_size=10, sampler="uniform", seed=2)
    assert table.layout["slots_per_chunk"] == 3
    for start in range(0, 28, 7):  # batches that wrap the ring and straddle chunk ends
        keys = table.insert(transitions(start, 7))
        assert keys.tolist() == list(range(start, start + 7))
        assert table.size() == min(start + 7, 10)
    info = table.info()
    assert (info["size"], info["inserts"], info["evicted"]) == (10, 28, 18)
    seen: set[int] = set()
    for _ in range(30):
        s = table.sample(20)
        i = assert_consistent(s.data)
        np.testing.assert_array_equal(i, s.keys)
        seen.update(i.tolist())
    assert seen == set(range(18, 28))  # exactly the newest max_size items
    assert rclient.exists(*(f"rlfleet:{namespace}:t:data:{c}" for c in range(4))) == 4
    assert not rclient.exists(f"rlfleet:{namespace}:t:data:4")


def test_prioritized_frequencies_and_weights(rclient: redis.Redis, namespace: str) -> None:
    n, alpha, beta = 40, 0.7, 0.5  # 40 leaves, fan-out 16: a three-level tree
    table = Table.create(rclient, namespace, "t", transition_schema(), n, Sampler.prioritized(alpha, beta), seed=3)
    priorities = np.arange(1, n + 1, dtype=np.float64)
    table.insert(transitions(0, n), priorities=priorities)
    expected = priorities**alpha / np.sum(priorities**alpha)
    counts = np.zeros(n)
    for _ in range(100):
        s = table.sample(256)
        assert_consistent(s.data)
        np.add.at(counts, s.keys, 1)
        np.testing.assert_allclose(s.probabilities, expected[s.keys], rtol=1e-12)
        # Importance weights by hand: w_i = (N * P(i))^-beta / max_j w_j over the batch.
        w = (n * expected[s.keys]) ** -beta
        np.testing.assert_allclose(s.weights, w / w.max(), rtol=1e-12)
        assert s.table_size == n
    assert _chi_square_p(counts, expected) > 0.001
    # beta override per call (annealing)
    s = table.sample(64, beta=1.0)
    w = 1 / (n * expected[s.keys])
    np.testing.assert_allclose(s.weights, w / w.max(), rtol=1e-12)
    np.testing.assert_allclose(importance_weights(s.probabilities, n, 1.0), s.weights)


def test_priority_updates_change_frequencies(rclient: redis.Redis, namespace: str) -> None:
    n = 20
    table = Table.create(rclient, namespace, "t", transition_schema(), n, Sampler.prioritized(1.0, 0.4), seed=4)
    table.insert(transitions(0, n))  # no priorities: every item gets the max priority so far (1.0)
    s = table.sample(1000)
    np.testing.assert_allclose(s.probabilities, 1 / n)
    # A learner's TD errors: item 3 gets 19x the others, items 0..9 drop to zero.
    keys = np.arange(n)
    new = np.where(keys < 10, 0.0, 1.0)
    new[3] = 19.0
    assert table.update_priorities(keys, new) == n
    counts = np.bincount(table.sample(4000).keys, minlength=n)
    expected = new / new.sum()
    assert counts[[0, 1, 2, 4, 5, 6, 7, 8, 9]].sum() == 0
    assert _chi_square_p(counts[expected > 0], expected[expected > 0]) > 0.001
    assert table.info()["max_priority"] == 19.0
    # New items without priorities get the max priority seen (19.0).
    table.insert(transitions(n, 5))  # evicts keys 0..4
    s = table.sample(2000)
    assert set(s.keys.tolist()) >= {20, 21, 22, 23, 24}
    np.testing.assert_allclose(s.probabilities[s.keys >= 20], 19.0 / (10 * 1.0 + 5 * 19.0))  # 5..9 are 0
    # Keys evicted since they were sampled are skipped, not applied to the slot's new item.
    assert table.update_priorities([0, 1, 20], [100.0, 100.0, 1.0]) == 1


def test_zero_and_bad_priorities(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), 4, "prioritized")
    table.insert(transitions(0, 2), priorities=[0.0, 0.0])
    with pytest.raises(ReplayError, match="every priority is zero"):
        table.sample(1)
    with pytest.raises(ReplayError, match="finite and >= 0"):
        table.update_priorities([0], [np.nan])
    with pytest.raises(ReplayError, match="priorities have 1 values for 2 items"):
        table.insert(transitions(2, 2), priorities=[1.0])
    uniform = Table.create(rclient, namespace, "u", transition_schema(), 4, "uniform")
    with pytest.raises(ReplayError, match="it has no priorities"):
        uniform.update_priorities([0], [1.0])


def test_fifo_sampler_order_and_single_delivery(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=16, sampler="fifo")
    for start in range(0, 12, 4):
        table.insert(transitions(start, 4))
    delivered = []
    for _ in range(4):
        s = table.sample(3)
        delivered += assert_consistent(s.data).tolist()
        np.testing.assert_array_equal(s.probabilities, 1.0)
    assert delivered == list(range(12))  # oldest first, each once
    assert table.size() == 0
    assert table.try_sample(1) is None  # nothing left: "not now"
    table.insert(transitions(12, 10))  # wraps the 16-slot ring
    assert table.sample(10).keys.tolist() == list(range(12, 22))
    info = table.info()
    assert (info["consumed"], info["samples"], info["evicted"]) == (22, 22, 0)


def test_fifo_queue_blocks_writers_instead_of_evicting(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "q", transition_schema(), 4, "fifo", rate_limiter=RateLimiter.queue(4))
    table.insert(transitions(0, 3))
    assert table.try_insert(transitions(3, 2)) is None  # 5 > 4 unconsumed: refused, nothing evicted
    assert table.try_insert(transitions(3, 1)) is not None
    assert table.sample(2).keys.tolist() == [0, 1]
    table.insert(transitions(4, 2), timeout=0.5)
    assert table.sample(4).keys.tolist() == [2, 3, 4, 5]
    assert table.info()["evicted"] == 0


def test_get_reads_live_records_by_key_and_names_a_gone_one(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=5, sampler="uniform", seed=4)
    table.insert(transitions(0, 4))
    table.insert(transitions(4, 3))  # 7 items into 5 slots: keys 0 and 1 were evicted
    assert table.live_keys() == range(2, 7)
    got = table.get([6, 2, 4])
    np.testing.assert_array_equal(got["action"], [6, 2, 4])  # key k holds the k-th inserted item, in asked order
    assert_consistent(got)
    assert table.get([])["action"].shape == (0,)
    before = table.info()
    with pytest.raises(KeyNotLive, match=r"key 1 is not in the table \(live keys 2\.\.6\)") as gone:
        table.get([3, 1])
    assert (gone.value.key, gone.value.live) == (1, range(2, 7))
    with pytest.raises(KeyNotLive, match="key 7 is not"):
        table.get([7])
    for bad in ([1.5], [-1], [[2]], ["2"]):
        with pytest.raises(ReplayError, match="non-negative integers"):
            table.get(bad)
    after = table.info()  # a read by key is not a sample: nothing counted
    assert (after["samples"], after["sample_calls"]) == (before["samples"], before["sample_calls"])
