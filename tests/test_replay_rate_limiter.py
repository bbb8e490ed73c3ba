"""Rate limiting as Reverb does it: min size, samples-per-insert within an error window, timeouts."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from conftest_replay import namespace, rclient, replay_server, transition_schema, transitions  # noqa: F401
from services.replay import RateLimiter, RateLimiterTimeout, ReplayError, Table


def test_min_size_blocks_sampling_until_reached(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), 20, rate_limiter=RateLimiter.min_size(5))
    table.insert(transitions(0, 4))
    assert table.try_sample(2) is None
    with pytest.raises(RateLimiterTimeout, match="holds 4 items, sampling starts at min_size_to_sample=5"):
        table.sample(2, timeout=0.2)
    info = table.info()
    assert (info["sample_timeouts"], info["sample_waits"], info["samples"]) == (1, 1, 0)
    assert info["sample_wait_s"] >= 0.2
    table.insert(transitions(4, 1))
    assert len(table.sample(2).keys) == 2


def test_blocked_sample_proceeds_when_a_writer_inserts(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), 20, rate_limiter=RateLimiter.min_size(3))
    writer = Table.open(rclient, namespace, "t")

    def insert_later() -> None:
        time.sleep(0.3)
        writer.insert(transitions(0, 3))

    thread = threading.Thread(target=insert_later)
    thread.start()
    s = table.sample(4, timeout=60)  # waits for the other writer
    thread.join()
    assert set(s.keys.tolist()) <= {0, 1, 2}
    assert table.info()["sample_waits"] == 1


def test_samples_per_insert_window_both_directions(rclient: redis.Redis, namespace: str) -> None:
    spi, min_size, error_buffer = 2.0, 10, 20.0  # diff = 2 * inserts - samples must stay in [0, 40]
    limiter = RateLimiter.sample_to_insert_ratio(spi, min_size, error_buffer)
    assert (limiter.min_diff, limiter.max_diff) == (0.0, 40.0)
    table = Table.create(rclient, namespace, "t", transition_schema(), 100, rate_limiter=limiter)
    writer = Table.open(rclient, namespace, "t")  # a second client: the counters are shared in Redis

    assert table.try_sample(1) is None  # empty: below min size
    writer.insert(transitions(0, 10))  # free until min size: diff 20
    writer.insert(transitions(10, 10))  # diff 40 = max_diff: still allowed
    assert table.info()["rate_limiter_diff"] == 40
    # Writers too far ahead: one more insert would make diff 42 > 40.
    assert writer.try_insert(transitions(20, 1)) is None
    with pytest.raises(
        RateLimiterTimeout, match=r"samples_per_insert=2.0: inserts=20 samples=0 diff=40.0 must stay in \[0.0, 40.0\]"
    ):
        writer.insert(transitions(20, 1), timeout=0.1)
    assert table.size() == 20  # the refused inserts wrote nothing
    # Learners catch up: 5 samples of 8 bring diff to 0 = min_diff.
    for _ in range(5):
        table.sample(8, timeout=0)
    assert table.info()["rate_limiter_diff"] == 0
    # Learners too far ahead: the next sample would make diff -1 < 0.
    assert table.try_sample(1) is None
    with pytest.raises(RateLimiterTimeout, match="samples_per_insert"):
        table.sample(1, timeout=0.1)
    writer.insert(transitions(20, 1))  # diff 2: two samples allowed, not three
    assert table.try_sample(3) is None
    assert table.try_sample(2) is not None
    info = table.info()
    assert (info["inserts"], info["samples"], info["rate_limiter_diff"]) == (21, 42, 0)
    assert (info["insert_timeouts"], info["sample_timeouts"]) == (1, 1)


def test_limiter_options_are_checked(rclient: redis.Redis, namespace: str) -> None:
    with pytest.raises(ReplayError, match="sampling could never start"):
        Table.create(rclient, namespace, "t", transition_schema(), 5, rate_limiter=RateLimiter.min_size(6))
    with pytest.raises(ReplayError, match="min_diff <= max_diff"):
        RateLimiter(1, 1.0, 5.0, 1.0)
    with pytest.raises(ReplayError, match="samples_per_insert must be"):
        RateLimiter(1, 0.0)
