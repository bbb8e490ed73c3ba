"""Namespaces: several runs share one Redis without seeing each other's tables."""

from __future__ import annotations

import pytest
import redis

from conftest_replay import assert_consistent, rclient, replay_server, transition_schema, transitions  # noqa: F401
from services.replay import ReplayClient, ReplayError, Table, TableNotFound


def test_same_table_name_in_two_namespaces_is_isolated(rclient: redis.Redis) -> None:
    run_a, run_b = ReplayClient(rclient, "iso-a"), ReplayClient(rclient, "iso-b")
    a = run_a.create_table("replay", transition_schema(obs_dim=3), max_size=10, sampler="fifo")
    b = run_b.create_table("replay", transition_schema(obs_dim=5), max_size=20, sampler="uniform")  # other schema: fine
    a.insert(transitions(0, 4))
    b.insert(transitions(100, 7, obs_dim=5))
    assert (a.size(), b.size()) == (4, 7)
    assert a.sample(4).keys.tolist() == [0, 1, 2, 3]
    assert set(assert_consistent(b.sample(50).data).tolist()) <= set(range(100, 107))
    assert (a.info()["inserts"], b.info()["inserts"]) == (4, 7)
    assert run_a.tables() == ["replay"] and run_b.tables() == ["replay"]
    assert all(k.startswith(b"rlfleet:iso-a:replay:") for k in rclient.keys("rlfleet:iso-a:replay:*"))
    run_a.drop_table("replay")
    assert run_a.tables() == [] and not rclient.keys("rlfleet:iso-a:*")
    with pytest.raises(TableNotFound):
        run_a.table("replay")
    assert b.size() == 7 and run_b.table("replay").size() == 7


@pytest.mark.parametrize("namespace, name", [("a:b", "t"), ("a", "b:c"), ("", "t"), ("a", "{t}")])
def test_names_that_could_collide_are_refused(rclient: redis.Redis, namespace: str, name: str) -> None:
    with pytest.raises(ReplayError, match="is not valid"):
        Table.create(rclient, namespace, name, transition_schema(), 10)
