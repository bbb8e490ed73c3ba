"""JSONL import and export of preference pairs (prompt/chosen/rejected) against a real Redis."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import redis

from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from services.preferences import DatasetError, Label, PreferenceQueue, QueueFull, RecordError
from services.preferences.datasets import export_jsonl, import_jsonl, read_jsonl, write_jsonl


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_import_then_learn_then_export_round_trips(tmp_path: Path, rclient: redis.Redis, namespace: str) -> None:
    src = write_lines(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            "",  # blank lines are skipped
            {"prompt": [3, 1, 2], "chosen": [1, 2, 3], "rejected": [3, 2, 1], "id": "sort-1", "policy_version": 4,
             "judge_id": "oracle", "prompt_id": "s1"},
            {"prompt": "hi", "chosen": "hello", "rejected": "go away", "score_chosen": 8.5, "source": "web"},
        ],
    )
    q = PreferenceQueue(rclient, namespace, max_len=100)
    assert import_jsonl(q, src) == 3
    assert q.info()["labelled"] == 3 and q.pending() == {"unlabelled": 0, "labelled": 3}

    out = tmp_path / "out.jsonl"
    assert export_jsonl(q, out) == {"written": 3, "skipped_ties": 0}  # a snapshot: nothing consumed
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["prompt"], e["chosen"], e["rejected"]) for e in exported] == [
        ("2+2=", "4", "5"),
        ([3, 1, 2], [1, 2, 3], [3, 2, 1]),
        ("hi", "hello", "go away"),
    ]
    assert exported[1]["id"] == "sort-1" and exported[1]["policy_version"] == 4 and exported[1]["judge_id"] == "oracle"
    assert exported[2]["meta"] == {"score_chosen": 8.5, "source": "web"}  # extra keys are kept, not dropped

    batch = q.learner("l").read(10)
    assert [(b.chosen, b.rejected) for b in batch] == [("4", "5"), ((1, 2, 3), (3, 2, 1)), ("hello", "go away")]
    assert batch[0].label.judge_id == "dataset" and batch[1].pair.prompt_id == "s1"

    # Export -> import into another run gives the same pairs.
    other = PreferenceQueue(rclient, namespace + "-b", max_len=100)
    assert import_jsonl(other, out) == 3
    assert [(b.pair_id, b.chosen) for b in other.learner("l").read(10)] == [(b.pair_id, b.chosen) for b in batch]


def test_malformed_lines_are_reported_by_number_and_nothing_is_imported(
    tmp_path: Path, rclient: redis.Redis, namespace: str
) -> None:
    src = write_lines(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "chosen": "a", "rejected": "b"},
            '{"prompt": "x", "chosen": "a"',
            {"prompt": "x", "chosen": "a"},
            ["prompt", "chosen", "rejected"],
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
            {"prompt": "x", "chosen": "a", "rejected": [1, 2]},
            {"prompt": "x", "chosen": "a", "rejected": 7},
            {"prompt": "x", "chosen": "a", "rejected": "b", "policy_version": "new"},
            {"prompt": "ok", "chosen": "a", "rejected": "b"},
        ],
    )
    q = PreferenceQueue(rclient, namespace, max_len=100)
    with pytest.raises(DatasetError) as err:
        import_jsonl(q, src)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{src}: 8 malformed line(s), nothing imported: ")
    assert "line 2: not valid JSON" in msg and "line 3: missing field(s) ['rejected']" in msg
    assert "line 4: must be a JSON object" in msg and "line 5: \"prompt\" is a list of chat messages" in msg
    assert "line 6: prompt, chosen and rejected must all be text or all be token ids" in msg
    assert "(and 3 more)" in msg  # line 7 (rejected 7), 8 (policy_version) and 9 (a repeat of line 1)
    assert q.info()["added"] == 0
    with pytest.raises(DatasetError) as err:
        read_jsonl(write_lines(tmp_path / "more.jsonl", [{"prompt": "x", "chosen": "a", "rejected": 7},
                                                         {"prompt": "x", "chosen": "a", "rejected": "b",
                                                          "policy_version": "new"},
                                                         {"prompt": "y", "chosen": "a", "rejected": "b"},
                                                         {"prompt": "y", "chosen": "a", "rejected": "b"}]))
    assert "line 1: rejected: must be a string" in str(err.value) and "line 2: policy_version" in str(err.value)
    assert "line 4: id ds-" in str(err.value) and "repeats line 3" in str(err.value)
    with pytest.raises(DatasetError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_importing_twice_is_refused_and_a_full_queue_says_where_to_resume(
    tmp_path: Path, rclient: redis.Redis, namespace: str
) -> None:
    src = write_lines(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    q = PreferenceQueue(rclient, namespace, max_len=6)
    with pytest.raises(QueueFull, match="4 pair\\(s\\) of .* were imported before it filled: import again with skip=4"):
        import_jsonl(q, src, batch=4, timeout=0.1)
    assert q.pending()["labelled"] == 4
    with pytest.raises(RecordError, match="already in"):
        import_jsonl(q, src, batch=4, timeout=0.1)  # the same lines again: refused, not doubled
    learner = q.learner("l")
    learner.ack(learner.read(10))
    assert import_jsonl(q, src, batch=4, skip=4, timeout=5) == 6
    assert {b.pair.prompt for b in learner.read(10)} == {f"q{i}" for i in range(4, 10)}


def test_export_skips_ties_and_writes_to_a_file_object(rclient: redis.Redis, namespace: str) -> None:
    q = PreferenceQueue(rclient, namespace, max_len=10)
    now = time.time()
    pairs = [{"id": f"t{i}", "prompt": "p", "responses": [f"x{i}", f"y{i}"], "policy_version": 0} for i in range(3)]
    q.add_labelled([(pairs[0], Label(1, "j", now)), (pairs[1], Label("tie", "j", now)), (pairs[2], Label(0, "j", now))])
    buf = io.BytesIO()
    assert write_jsonl(q.labelled_snapshot(), buf) == {"written": 2, "skipped_ties": 1}
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(line["id"], line["chosen"], line["rejected"]) for line in lines] == [
        ("t0", "y0", "x0"),
        ("t2", "x2", "y2"),
    ]
