"""Training metrics (cluster/metrics.py) reach Ray's metrics agent with the right names, labels and values.

The real path: `cluster.train.train` runs PPO (and DQN on the Redis replay) in the shared Ray session, and
the test reads the node's Prometheus endpoint, the one Prometheus scrapes, until the run's series appear.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import COUNTERS, GAUGES, ITERATION_HISTOGRAM, iteration_values, learner_values, weight_sync_lag
from cluster.train import LOSS_KEYS, read_history, train

RAY_PREFIX = "ray_"  # Ray's metrics agent prefixes every custom metric
Samples = dict[tuple[str, frozenset], float]  # (sample name, labels) -> value

# The shape of a real RLlib 2.60 PPO result (trimmed), as cluster/metrics.py reads it.
RESULT = {
    "env_runners": {"episode_return_mean": 33.5, "episode_return_min": 15.0, "episode_return_max": 76.0,
                    "episode_len_mean": 33.5, "weights_seq_no": 1.0, "num_env_steps_sampled": 512},
    "learners": {
        "default_policy": {"policy_loss": 0.13, "vf_loss": 110.8, "entropy": 0.69, "weights_seq_no": 3.0,
                           "gradients_default_optimizer_global_norm": 19.0, "curr_entropy_coeff": 0.0,
                           "num_trainable_parameters": float("nan")},
        "__all_modules__": {"num_env_steps_trained": 512, "total_loss": 99.0},
    },
    "timers": {"learner_update_timer": 0.0157, "synch_weights": 0.0034},
    "fault_tolerance": {"num_healthy_workers": 1, "num_remote_worker_restarts": 2},
    "time_this_iter_s": 0.26,
}


def test_result_dict_maps_to_metric_values() -> None:
    values = iteration_values(RESULT, {"steps_per_s": 1960.0, "return_mean_100": 30.0})
    assert values["rlfleet_train_episode_return_min_reward"] == 15.0
    assert values["rlfleet_train_episode_length_mean_steps"] == 33.5
    assert values["rlfleet_train_env_steps_per_second"] == 1960.0
    assert values["rlfleet_train_env_runner_restarts_count"] == 2
    assert values["rlfleet_learner_update_time_seconds"] == 0.0157
    assert values["rlfleet_train_weight_sync_lag_updates"] == 2.0  # learner at version 3, runners sampled with 1
    learner = {(name, tuple(sorted(labels.items()))): v for name, labels, v in learner_values(RESULT, LOSS_KEYS)}
    assert learner == {
        ("rlfleet_learner_loss_value", (("loss", "policy_loss"), ("module", "default_policy"))): 0.13,
        ("rlfleet_learner_loss_value", (("loss", "vf_loss"), ("module", "default_policy"))): 110.8,
        ("rlfleet_learner_loss_value", (("loss", "entropy"), ("module", "default_policy"))): 0.69,
        ("rlfleet_learner_gradient_global_norm", (("module", "default_policy"), ("optimizer", "default_optimizer"))):
            19.0,
    }  # NaN, counters and the __all_modules__ entry are not losses of a module
    missing = iteration_values({}, {})
    assert all(v is None for v in missing.values())  # a rule that reports nothing exports nothing
    assert weight_sync_lag({"env_runners": {"weights_seq_no": 5.0}, "learners": {}}) is None


def test_names_follow_the_convention() -> None:
    for name in [*GAUGES, *COUNTERS, ITERATION_HISTOGRAM]:
        area = name.split("_")[1]
        assert name.startswith("rlfleet_") and area in ("train", "learner"), name
    assert all(name.endswith("_total") for name in COUNTERS)


def _metrics_url() -> str:
    node = ray._private.worker.global_worker.node
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def _scrape() -> Samples:
    body = urllib.request.urlopen(_metrics_url(), timeout=30).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _find(samples: Samples, name: str, **labels: str) -> float | None:
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == RAY_PREFIX + name and set(labels.items()) <= sample_labels:
            return value
    return None


def _wait_for(ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready` (Ray's agent exports on an interval, 10 s by default)."""
    deadline = time.monotonic() + 180  # only stops a hang: the first export normally lands within seconds
    while True:
        samples = _scrape()
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)


def test_ppo_run_exports_through_ray_agent(ray_session: None, tmp_path) -> None:
    result = train("ppo", "CartPole-v1", stop_steps=3 * 256, runs_dir=tmp_path, progress=False, checkpoint_every=1,
                   overrides={"train_batch_size": "256", "minibatch_size": "128", "num_epochs": "1"})
    run = {"run_id": result.run_dir.name, "algo": "ppo", "env": "CartPole-v1"}
    history = read_history(result.run_dir)
    assert len(history) == 3
    samples = _wait_for(lambda s: _find(s, "rlfleet_train_iterations_total", **run) == 3)
    assert _find(samples, "rlfleet_train_iterations_total", **run) == 3
    assert _find(samples, "rlfleet_train_env_steps_total", **run) == history[-1]["env_steps"]
    assert _find(samples, "rlfleet_train_iteration_duration_seconds_count", **run) == 3
    last = history[-1]
    assert _find(samples, "rlfleet_train_episode_return_mean_reward", **run) == pytest.approx(
        last["episode_return_mean"])
    assert _find(samples, "rlfleet_train_episode_return_smoothed_reward", **run) == pytest.approx(
        last["return_mean_100"])
    assert _find(samples, "rlfleet_train_episode_return_min_reward", **run) <= last["episode_return_mean"]
    assert _find(samples, "rlfleet_train_episode_return_max_reward", **run) >= last["episode_return_mean"]
    assert _find(samples, "rlfleet_train_env_steps_per_second", **run) == pytest.approx(last["steps_per_s"])
    assert _find(samples, "rlfleet_train_env_runner_restarts_count", **run) == 0
    assert _find(samples, "rlfleet_train_env_runners_healthy_count", **run) >= 1
    assert _find(samples, "rlfleet_train_weight_sync_lag_updates", **run) >= 0
    assert _find(samples, "rlfleet_learner_update_time_seconds", **run) > 0
    for loss, value in last["losses"].items():
        assert _find(samples, "rlfleet_learner_loss_value", module="default_policy", loss=loss, **run) == (
            pytest.approx(value, rel=1e-5)), loss
    assert _find(samples, "rlfleet_learner_gradient_global_norm", module="default_policy", **run) > 0
    # A checkpoint is written after the last export: the age exported is that of the one before it.
    assert 0 <= _find(samples, "rlfleet_train_checkpoint_age_seconds", **run) < 600
    assert _find(samples, "rlfleet_train_checkpoint_timestamp_seconds", **run) > time.time() - 600


def test_offpolicy_run_exports_its_replay_table(ray_session: None, tmp_path) -> None:
    result = train("dqn", "CartPole-v1", stop_steps=400, runs_dir=tmp_path, progress=False, checkpoint_every=100,
                   overrides={"learning_starts": "100", "train_batch_size": "32"})
    namespace = result.run_dir.name  # cluster/train.py names an off-policy run's table after the run
    history = read_history(result.run_dir)
    samples = _wait_for(lambda s: _find(s, "rlfleet_train_iterations_total", run_id=namespace) == len(history))
    inserted = _find(samples, "rlfleet_replay_inserted_items", namespace=namespace)
    assert inserted is not None and inserted >= 100
    assert _find(samples, "rlfleet_replay_size_items", namespace=namespace) == min(
        inserted, _find(samples, "rlfleet_replay_capacity_items", namespace=namespace))
    assert _find(samples, "rlfleet_replay_sampled_items", namespace=namespace) > 0
    assert _find(samples, "rlfleet_learner_loss_value", run_id=namespace, algo="dqn") is not None


@pytest.mark.slow
def test_gauges_stay_while_the_run_goes_and_go_stale_after(ray_session: None, tmp_path) -> None:
    """Ray's agent drops a gauge not set for two export intervals; the exporter re-sets its gauges until closed."""
    from cluster.metrics import TrainingMetrics

    ttl_s = 2 * max(ray._config.metrics_report_interval_ms(), 1000) / 1000  # as Ray's agent computes it
    run_dir = tmp_path / "ppo-CartPole-v1-s0-refresh"
    exporter = TrainingMetrics(run_dir, "ppo", "CartPole-v1")
    labels = {"run_id": run_dir.name}
    try:
        exporter.export(RESULT, {"steps_per_s": 100.0})
        _wait_for(lambda s: _find(s, "rlfleet_train_env_steps_per_second", **labels) is not None)
        until = time.monotonic() + 1.5 * ttl_s  # longer than the agent keeps a gauge nobody sets again
        while time.monotonic() < until:
            assert _find(_scrape(), "rlfleet_train_env_steps_per_second", **labels) == 100.0
            time.sleep(1)
    finally:
        exporter.close()
    gone = time.monotonic() + 3 * ttl_s
    while _find(_scrape(), "rlfleet_train_env_steps_per_second", **labels) is not None:
        assert time.monotonic() < gone, "a closed run's gauge is still exported"
        time.sleep(1)
