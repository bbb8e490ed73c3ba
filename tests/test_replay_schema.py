"""Schema round trips, rejections that leave stored data intact, and schema checks on open."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from conftest_replay import namespace, rclient, replay_server, transition_schema, transitions  # noqa: F401
from services.replay import Field, ReplayError, Schema, SchemaError, Table, TableNotFound


def test_round_trip_dtypes_and_shapes(rclient: redis.Redis, namespace: str) -> None:
    schema = Schema(
        [
            Field("obs", "float32", (4,)),
            Field("action", "int64"),
            Field("terminated", "bool"),
            Field("image", "uint8", (3, 8, 8)),
            Field("logits", "float64", (2, 3)),
            Field("small", "int16", (2,)),
        ]
    )
    assert Schema.from_json(schema.to_json()) == schema
    assert schema.record_size == 16 + 8 + 1 + 192 + 48 + 4
    rng = np.random.default_rng(0)
    n = 7
    batch = {
        "obs": rng.normal(size=(n, 4)).astype(np.float32),
        "action": rng.integers(-(2**40), 2**40, size=n),
        "terminated": rng.random(n) < 0.5,
        "image": rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8),
        "logits": rng.normal(size=(n, 2, 3)),
        "small": rng.integers(-30000, 30000, size=(n, 2)).astype(np.int16),
    }
    table = Table.create(rclient, namespace, "t", schema, max_size=n, sampler="fifo")
    table.insert(batch)
    out = table.sample(n).data
    for name, value in batch.items():
        assert out[name].dtype == value.dtype, name
        assert out[name].shape == value.shape, name
        np.testing.assert_array_equal(out[name], value, err_msg=name)


def test_safe_casts_are_accepted(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=10, sampler="fifo")
    batch = transitions(0, 3)
    batch["obs"] = batch["obs"].astype(np.float64)  # float64 env observations into a float32 field
    batch["action"] = [0, 1, 2]  # Python ints (int64 on the way) into int64
    batch["reward"] = np.array([0, -1, -2], dtype=np.int32)  # int -> float
    table.insert(batch)
    assert table.sample(3).data["action"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.pop("reward"), "missing field(s) ['reward']"),
        (lambda b: b.update(extra=np.zeros(3)), "extra field(s) ['extra']"),
        (lambda b: b.update(action=np.array([0.5, 1.0, 2.0])), "field 'action': dtype float64 cannot be cast safely"),
        (lambda b: b.update(done=np.array([0, 1, 0])), "field 'done': dtype int64 cannot be cast safely to bool"),
        (lambda b: b.update(obs=np.zeros((3, 4), np.float32)), "field 'obs': shape (3, 4) does not match (n, 3)"),
        (lambda b: b.update(obs=np.zeros(3, np.float32)), "field 'obs': shape (3,) does not match"),
        (lambda b: b.update(reward=np.array([0.0, np.nan, 1.0])), "field 'reward': 1 NaN/inf value(s)"),
        (lambda b: b.update(obs=np.full((3, 3), 1e300)), "field 'obs': values overflow float32"),
        (lambda b: b.update(action=np.zeros(4, np.int64)), "different batch sizes"),
        (lambda b: b.update(action=np.array(["a", "b", "c"])), "field 'action': dtype <U1 cannot be stored"),
    ],
)
def test_rejected_batch_leaves_stored_data_intact(rclient: redis.Redis, namespace: str, change, message) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=10, sampler="fifo")
    table.insert(transitions(0, 4))
    before = table.info()
    bad = transitions(100, 3)
    change(bad)
    with pytest.raises(SchemaError) as err:
        table.insert(bad)
    assert message in str(err.value)
    after = table.info()
    assert (after["size"], after["inserts"], after["insert_calls"]) == (4, 4, 1)
    assert after["size"] == before["size"]
    assert table.sample(4).data["action"].tolist() == [0, 1, 2, 3]


def test_integer_narrowing_checks_range(rclient: redis.Redis, namespace: str) -> None:
    schema = Schema([Field("pixels", "uint8", (2,))])
    table = Table.create(rclient, namespace, "t", schema, max_size=4, sampler="fifo")
    table.insert({"pixels": np.array([[0, 255], [1, 2]])})  # int64 values that fit uint8
    with pytest.raises(SchemaError, match=r"field 'pixels': values in \[-1, 300\] do not fit uint8"):
        table.insert({"pixels": np.array([[-1, 300]])})
    assert table.size() == 2


def test_open_checks_schema_and_options(rclient: redis.Redis, namespace: str) -> None:
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=10)
    table.insert(transitions(0, 2))
    # Same schema and options (another writer starting up): opens the same table.
    again = Table.create(rclient, namespace, "t", transition_schema(), max_size=10)
    assert again.table_id == table.table_id and again.size() == 2
    with pytest.raises(
        SchemaError, match=r"exists with another schema .*field 'obs': obs: float32\[4\] vs obs: float32\[3\]"
    ):
        Table.create(rclient, namespace, "t", transition_schema(obs_dim=4), max_size=10)
    with pytest.raises(ReplayError, match="exists with other options: max_size: 20 vs stored 10"):
        Table.create(rclient, namespace, "t", transition_schema(), max_size=20)
    opened = Table.open(rclient, namespace, "t")  # schema and options read from Redis
    assert opened.schema == transition_schema() and opened.size() == 2
    assert rclient.get(f"rlfleet:{namespace}:t:schema").startswith(b"{")  # stored as JSON
    with pytest.raises(TableNotFound, match="no replay table 'nope'"):
        Table.open(rclient, namespace, "nope")


def test_dropped_and_recreated_table_is_detected(rclient: redis.Redis, namespace: str) -> None:
    old = Table.create(rclient, namespace, "t", transition_schema(), max_size=10)
    old.insert(transitions(0, 2))
    old.drop()
    with pytest.raises(TableNotFound, match="no longer exists"):
        old.insert(transitions(0, 1))
    Table.create(rclient, namespace, "t", transition_schema(obs_dim=5), max_size=10)
    with pytest.raises(TableNotFound, match="dropped and created again"):
        old.insert(transitions(0, 1))


def test_bad_schemas_are_refused() -> None:
    with pytest.raises(SchemaError, match="duplicate field names"):
        Schema([Field("a", "float32"), Field("a", "int64")])
    with pytest.raises(SchemaError, match="cannot be stored"):
        Field("o", object)
    with pytest.raises(SchemaError, match="is not valid"):
        Field("a:b", "float32")
    with pytest.raises(SchemaError, match="finite=True only applies to float"):
        Field("a", "int64", finite=True)


def test_script_refuses_malformed_payload_before_writing(rclient: redis.Redis, namespace: str) -> None:
    """A writer that skips the client's checks (or a buggy one) cannot shift the ring's layout."""
    table = Table.create(rclient, namespace, "t", transition_schema(), max_size=10, sampler="fifo")
    table.insert(transitions(0, 3))
    _, good = table.schema.encode(transitions(3, 2))
    with pytest.raises(redis.ResponseError, match="RLFLEET_LAYOUT"):
        table._insert(table._keys, [table.prefix, table.table_id, 2, good[:-1], b""])
    with pytest.raises(redis.ResponseError, match="RLFLEET_TOOBIG"):
        table._insert(table._keys, [table.prefix, table.table_id, 11, b"\0" * (11 * table.schema.record_size), b""])
    info = table.info()
    assert (info["size"], info["inserts"], info["insert_calls"]) == (3, 3, 1)
    assert table.sample(3).data["action"].tolist() == [0, 1, 2]
