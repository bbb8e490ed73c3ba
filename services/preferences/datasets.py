"""Preference datasets as JSONL, in the common `prompt`/`chosen`/`rejected` format (one pair per line):

    {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    {"prompt": [12, 7], "chosen": [4], "rejected": [9], "id": "p-2", "policy_version": 0, "judge_id": "gpt"}

Optional keys: `id` (default: derived from the line's bytes, so importing a file twice is refused as
a duplicate instead of doubling it), `policy_version` (default 0), `judge_id` (default "dataset"),
`prompt_id`, `meta` (an object of scalars); any other key with a scalar value is kept in `meta`.
Text fields are strings, or lists of token ids. Conversational message lists are not accepted.

Import checks every line before adding anything and reports the malformed ones by line number;
imported pairs go straight to the labelled stream (chosen is response 0, preferred 0). Export writes
labelled pairs the same way (ties have no chosen/rejected: they are skipped and counted).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from services.preferences.errors import DatasetError, QueueFull, RecordError
from services.preferences.queue import PreferenceQueue
from services.preferences.schema import Label, LabelledPair, Pair, check_id, dumps, JUDGE_RE

_KNOWN = ("prompt", "chosen", "rejected", "id", "policy_version", "judge_id", "prompt_id", "meta")
_SHOWN_ERRORS = 5


def _line_pair(obj: Any, raw: bytes, now: float) -> tuple[Pair, Label]:
    if not isinstance(obj, dict):
        raise RecordError(f"must be a JSON object with prompt/chosen/rejected, got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise RecordError(f"missing field(s) {missing}")
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(obj[key], list) and obj[key] and isinstance(obj[key][0], dict):
            raise RecordError(f'"{key}" is a list of chat messages: give text or token ids')
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError(f'"meta" must be an object, got {type(meta).__name__}')
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    pair_id = obj.get("id", "ds-" + hashlib.sha256(raw.strip()).hexdigest()[:24])
    check_id(pair_id, "id")
    try:
        pair = Pair(
            prompt=obj["prompt"],
            responses=(obj["chosen"], obj["rejected"]),
            policy_version=obj.get("policy_version", 0),
            pair_id=pair_id,
            prompt_id=obj.get("prompt_id"),
            meta={**meta, **extra},
        )
    except RecordError as exc:  # name the dataset's fields, not the queue's
        msg = str(exc).replace(f"pair {pair_id}: ", "").replace("responses[0]", "chosen")
        msg = msg.replace("responses[1]", "rejected").replace("prompt and responses", "prompt, chosen and rejected")
        raise RecordError(msg) from None
    judge = obj.get("judge_id", "dataset")
    check_id(judge, "judge_id", JUDGE_RE)
    return pair, Label(0, judge, now)


def read_jsonl(path: str | Path) -> list[tuple[Pair, Label]]:
    """Every pair of a JSONL file with its label (chosen = response 0); DatasetError naming the
    malformed lines (all of them counted, the first few shown) when any line is bad."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None
    out: list[tuple[Pair, Label]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    now = time.time()
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise RecordError(f"not valid JSON ({exc})") from None
            pair, label = _line_pair(obj, raw, now)
            if pair.pair_id in seen:
                raise RecordError(f"id {pair.pair_id} repeats line {seen[pair.pair_id]}")
            seen[pair.pair_id] = lineno
            out.append((pair, label))
        except RecordError as exc:
            errors.append(f"line {lineno}: {exc}")
    if errors:
        more = f" (and {len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
        raise DatasetError(
            f"{path}: {len(errors)} malformed line(s), nothing imported: {'; '.join(errors[:_SHOWN_ERRORS])}{more}"
        )
    return out


def import_jsonl(
    queue: PreferenceQueue,
    path: str | Path,
    *,
    epoch: int | None = None,
    batch: int = 500,
    skip: int = 0,
    timeout: float | None = 30.0,
) -> int:
    """Check the whole file, then add its pairs (after the first `skip`) as labelled pairs of `epoch`, in
    batches; returns how many were added. A full queue raises QueueFull saying how many went in."""
    items = read_jsonl(path)[skip:]
    done = 0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        try:
            queue.add_labelled(chunk, epoch=epoch, timeout=timeout)
        except QueueFull as exc:
            raise QueueFull(
                f"{exc}; {done} pair(s) of {path} were imported before it filled: import again with skip={skip + done}"
            ) from None
        done += len(chunk)
    return done


def _export_line(item: LabelledPair) -> dict[str, Any]:
    p = item.pair.to_obj()
    line: dict[str, Any] = {"prompt": p["prompt"]}
    line["chosen"], line["rejected"] = p["responses"][item.label.preferred], p["responses"][1 - item.label.preferred]
    line |= {"id": item.pair_id, "policy_version": item.pair.policy_version, "judge_id": item.label.judge_id}
    for key in ("prompt_id", "meta"):
        if key in p:
            line[key] = p[key]
    return line


def write_jsonl(pairs: Iterable[LabelledPair], out: str | Path | IO[bytes]) -> dict[str, int]:
    """Write labelled pairs as prompt/chosen/rejected lines; returns {"written": n, "skipped_ties": k}."""
    lines, ties = [], 0
    for item in pairs:
        if item.label.preferred == "tie":
            ties += 1
            continue
        lines.append(dumps(_export_line(item)) + b"\n")
    if isinstance(out, (str, Path)):
        Path(out).write_bytes(b"".join(lines))
    else:
        out.writelines(lines)
    return {"written": len(lines), "skipped_ties": ties}


def export_jsonl(queue: PreferenceQueue, out: str | Path | IO[bytes]) -> dict[str, int]:
    """Write the queue's labelled, not yet acknowledged pairs (a snapshot; nothing is consumed)."""
    return write_jsonl(queue.labelled_snapshot(), out)
