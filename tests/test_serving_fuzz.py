"""Bounded, seeded fuzzing of the HTTP API over real HTTP: no 5xx ever, and the server still answers right after.

Each case is drawn from a fixed-seed generator (so a failure replays exactly): random and malformed
bodies, random JSON of any shape, huge arrays and bodies, deep nesting, NaN/Infinity and huge numbers,
invalid UTF-8 and lone surrogates, wrong content types, odd methods, paths and headers.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.policy import LoadedPolicy
from services.serving import serve_policies, shutdown_serving

SEED = 20261121
CASES = 400
OBS = [[0.0, 0.1, 0.02, -0.3], [0.5, -1.0, 0.1, 0.7]]
PATHS = ["/v1/policies/cartpole/act", "/v1/policies/cartpole/value", "/v1/policies/cartpole/versions/1/act",
         "/v1/policies/cartpole/versions/latest/value", "/v1/policies", "/healthz"]
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/octet-stream", "application/json; charset=latin-1",
                 "image/png", "\u00e9/\u00e9"]
NUMBER_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "-0", "0.0000001e-400",
                 "4.9e-324", "1.7976931348623157e308", "3", "-2.5", "true", "null", '"1"']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([rng.randint(-10**30, 10**30), rng.randint(-3, 3)])
    if kind == 2:
        return rng.uniform(-1e6, 1e6) if rng.random() < 0.5 else rng.uniform(-1, 1)
    if kind == 3:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice([[], {}, "", 0])
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["observations", "deterministic", "obs", "", "\u2603", "__proto__"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _observations_text(rng: random.Random) -> str:
    """A JSON text for "observations" that is nearly right: 4 numbers per row, some tokens wrong."""
    rows = []
    for _ in range(rng.randrange(1, 5)):
        cells = [repr(rng.uniform(-0.2, 0.2)) for _ in range(4)]
        for _ in range(rng.randrange(3)):
            cells[rng.randrange(4)] = rng.choice(NUMBER_TOKENS)
        rows.append("[" + ", ".join(cells) + "]")
    return "[" + ", ".join(rows) + "]"


def _case(rng: random.Random) -> dict[str, Any]:
    """One request: method, path, body bytes, headers."""
    kind = rng.randrange(12)
    method, path = "POST", rng.choice(PATHS[:4])
    headers = {}
    content_type = rng.choice(CONTENT_TYPES)
    if content_type:
        headers["content-type"] = content_type
    if kind == 0:  # random bytes
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    elif kind == 1:  # random JSON, anything at all
        body = json.dumps(_random_json(rng)).encode()
    elif kind == 2:  # the right field with a random value
        body = json.dumps({"observations": _random_json(rng), "deterministic": _random_json(rng)}).encode()
    elif kind == 3:  # nearly right observations with NaN, Infinity, huge numbers, strings, null
        body = ('{"observations": ' + _observations_text(rng) + "}").encode()
    elif kind == 4:  # deep nesting, in the body or inside the observations
        depth = rng.choice([50, 1000, 100_000])
        inner = "[" * depth + "0" + "]" * depth
        body = rng.choice([inner, '{"observations": ' + inner + "}", '{"observations": [' + inner + "]}",
                           '{"a":' * depth + "1" + "}" * depth]).encode()
    elif kind == 5:  # huge arrays: many rows, wide rows, or past the body limit
        body = rng.choice([
            json.dumps({"observations": [[0.0, 0.0, 0.0, 0.0]] * rng.choice([1024, 1025, 50_000])}),
            json.dumps({"observations": [[0.0] * 100_000]}),
            json.dumps({"observations": [[rng.random() for _ in range(4)] for _ in range(1024)]}),
        ]).encode()
    elif kind == 6:  # invalid UTF-8, lone surrogates, odd unicode
        text = rng.choice(['{"observations": "\udcff"}', '{"observations": [[0, 0, 0, 0]], "\ud800": 1}',
                           '{"\u0000": [[0,0,0,0]]}', '{"observations": [["\u2603", 0, 0, 0]]}'])
        body = rng.choice([text.encode("utf-8", "surrogatepass"), b'{"observations": "\xc3\x28"}',
                           b"\xef\xbb\xbf" + json.dumps({"observations": OBS}).encode(),
                           text.encode("utf-16", "surrogatepass")])
    elif kind == 7:  # truncated or padded valid bodies
        good = json.dumps({"observations": OBS}).encode()
        cut = rng.randrange(len(good))
        body = rng.choice([good[:cut], good + b" garbage", good[cut:], b" " * 1000 + good])
    elif kind == 8:  # odd methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"])
        path = rng.choice(PATHS + ["/", "//", "/v1", "/v1/policies/", "/v1/policies/%00/act", "/v1/policies/../act",
                                   "/v1/policies/" + "x" * 3000 + "/act", "/v1/policies/cartpole/versions/%ff/act",
                                   "/v1/policies/\u2603/act", "/v1/policies/cartpole/act?x=1&x=2"])
        body = json.dumps({"observations": OBS}).encode() if rng.random() < 0.5 else b""
    elif kind == 9:  # odd headers
        body = json.dumps({"observations": OBS}).encode()
        headers.update(rng.choice([{"authorization": "Bearer " + "x" * 5000}, {"x-api-key": "\u00e9"},
                                   {"content-encoding": "gzip"}, {"accept": "text/html"}, {"expect": "100-continue"}]))
    elif kind == 10:  # good requests mixed in: they must keep succeeding
        path = PATHS[rng.randrange(2)]
        fields: dict = {"observations": OBS}
        if path.endswith("act"):
            fields["deterministic"] = rng.random() < 0.5
        return {"method": "POST", "path": path, "body": json.dumps(fields).encode(), "headers": {}, "good": True}
    else:  # empty and whitespace bodies
        body = rng.choice([b"", b" ", b"\n\n", b"null", b"{}", b"[]", b'""'])
    return {"method": method, "path": path, "body": body, "headers": headers, "good": False}


@pytest.fixture(scope="module")
def server(ray_session: None, ppo_cartpole_checkpoint: Path) -> Iterator[httpx.Client]:
    url = serve_policies({"cartpole": ppo_cartpole_checkpoint}, port=_free_port())
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    shutdown_serving()


def test_fuzzed_requests_never_get_a_5xx_and_the_server_still_answers(server: httpx.Client) -> None:
    rng = random.Random(SEED)
    local = LoadedPolicy.from_checkpoint(server.get("/v1/policies").json()["policies"][0]["checkpoint"])
    expected = {"act": local.act(local.validate_observations(OBS), True)}
    statuses: dict[int, int] = {}
    for n in range(CASES):
        case = _case(rng)
        headers = {k: v.encode() for k, v in case["headers"].items()}  # raw UTF-8 bytes, as a client may send
        r = server.request(case["method"], case["path"], content=case["body"], headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        where = f"case {n}: {case['method']} {case['path'][:80]} {case['body'][:120]!r} -> {r.status_code}"
        assert r.status_code < 500, f"{where} {r.text[:300]}"
        if case["method"] != "HEAD":
            assert r.headers["content-type"].startswith("application/json"), where
            answer = r.json()
            assert (set(answer) == {"error"}) == (r.status_code >= 400), where
        if case["good"]:
            assert r.status_code == 200, where
            if json.loads(case["body"]).get("deterministic"):
                assert r.json()["actions"] == expected["act"], where
    assert statuses.get(200, 0) >= 20 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= CASES // 2, statuses

    # A body past the 32 MiB limit, once (it is slow to send): 413, not a crash.
    r = server.post("/v1/policies/cartpole/act", content=b'{"observations": [' + b"0," * (17 << 20) + b"0]}")
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    # Afterwards: still alive and still right.
    assert server.get("/healthz").json() == {"status": "ok"}
    r = server.post("/v1/policies/cartpole/act", json={"observations": OBS})
    assert r.status_code == 200 and r.json() == {"actions": expected["act"], "version": "1"}
    values = server.post("/v1/policies/cartpole/value", json={"observations": OBS}).json()["values"]
    assert values == pytest.approx(local.value(local.validate_observations(OBS)), rel=1e-5)
