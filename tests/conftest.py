"""Shared fixtures: one embedded Ray session per test run, and tiny stock-PPO checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

# Ray's raylet gets 30 s to start by default; on a busy 2-core machine it has taken longer (the test would then
# fail on start-up, not on what it tests). This only bounds a hang, it is no speed requirement.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """An embedded 2-CPU Ray cluster (address="local": never join another session's cluster)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models on shared cores: one torch thread (the preference loop does the same; two were 20x slower).
    Preference test modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    from algorithms.common.sequence import one_torch_thread as one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def make_ppo_checkpoint(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: train stock PPO for one iteration and save a run dir; returns the run dir.

    `mean_std_filter=True` adds RLlib's MeanStdFilter connector the new-API-stack way;
    `config_overrides` are applied as `.env_runners(**config_overrides)`.
    """
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module import MeanStdFilter

    cache: dict[tuple, Path] = {}

    def make(env: str = "CartPole-v1", mean_std_filter: bool = False, iterations: int = 1, **config_overrides) -> Path:
        key = (env, mean_std_filter, iterations, tuple(sorted(config_overrides.items())))
        if key in cache:
            return cache[key]
        config = (
            PPOConfig()
            .environment(env)
            .env_runners(num_env_runners=0, **config_overrides)
            .training(train_batch_size=500, minibatch_size=100, num_epochs=2)
            .debugging(seed=0)
        )
        if mean_std_filter:
            config = config.env_runners(env_to_module_connector=lambda env, spaces, device: MeanStdFilter())
        algo = config.build_algo()
        try:
            for _ in range(iterations):
                algo.train()
            run_dir = tmp_path_factory.mktemp(f"run-{env}")
            algo.save_to_path(run_dir / "checkpoints" / f"iter_{iterations:06d}")
        finally:
            algo.stop()
        (run_dir / "config.json").write_text(json.dumps({"algo": "ppo", "env": env, "seed": 0, "options": {}}))
        cache[key] = run_dir
        return run_dir

    return make


@pytest.fixture(scope="session")
def ppo_cartpole_checkpoint(make_ppo_checkpoint: Callable[..., Path]) -> Path:
    """Run dir of a stock PPO trained one iteration on CartPole-v1 (checkpoints/iter_000001, config.json)."""
    return make_ppo_checkpoint("CartPole-v1")
