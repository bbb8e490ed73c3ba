"""Sampling a given number of env steps from an Algorithm's EnvRunners, for rules that update between chunks.

RLlib's PPO samples one whole train batch per iteration. Rules whose behaviour changes inside a batch (PROPS
re-fits its behaviour policy every m steps, MAC updates after every MLMC rollout) sample chunks of a few steps,
update, sync weights, and sample again; EnvRunners keep their ongoing episodes between calls, so consecutive
chunks continue the same trajectories.
"""

from __future__ import annotations

import numpy as np


def sample_env_steps(algo, num_steps: int) -> tuple[list, list]:
    """About `num_steps` env steps (split over the remote EnvRunners, or the local one when there are none).

    Returns (episode chunks, one metrics dict per EnvRunner) for `algo.metrics.aggregate(..., ENV_RUNNER_RESULTS)`.
    """
    group = algo.env_runner_group
    if group.num_remote_workers() <= 0:
        runner = group.local_env_runner
        return runner.sample(num_timesteps=num_steps), [runner.get_metrics()]
    per_runner = max(num_steps // group.num_remote_workers(), 1)
    results = group.foreach_env_runner(lambda w: (w.sample(num_timesteps=per_runner), w.get_metrics()),
                                       local_env_runner=False, timeout_seconds=algo.config.sample_timeout_s)
    return [e for episodes, _ in results for e in episodes], [metrics for _, metrics in results]


def episode_arrays(episodes: list) -> dict[str, np.ndarray]:
    """Every step of the given chunks, in order: obs, actions, rewards, next_obs, terminateds."""
    columns: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "next_obs": [], "terminateds": []}
    for episode in episodes:
        n = len(episode)
        if n == 0:
            continue
        observations = np.asarray(episode.get_observations())
        columns["obs"].append(observations[:n])
        columns["next_obs"].append(observations[1 : n + 1])
        columns["actions"].append(np.asarray(episode.get_actions()))
        columns["rewards"].append(np.asarray(episode.get_rewards(), dtype=np.float32))
        terminated = np.zeros(n, dtype=np.float32)
        terminated[-1] = float(episode.is_terminated)
        columns["terminateds"].append(terminated)
    if not columns["obs"]:
        return {key: np.zeros((0,)) for key in columns}
    return {key: np.concatenate(value) for key, value in columns.items()}


def call_learners(learner_group, fn) -> list:
    """fn(learner) on every Learner (local or remote); their results, raising any Learner's error here."""
    return [result.get() for result in learner_group.foreach_learner(fn)]


def update_on_episodes(algo, episodes: list) -> None:
    """RLlib PPO's learner step on `episodes` (the config's epochs and minibatches), results into algo.metrics."""
    from ray.rllib.utils.metrics import (
        ALL_MODULES,
        ENV_RUNNER_RESULTS,
        LEARNER_RESULTS,
        LEARNER_UPDATE_TIMER,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
        NUM_MODULE_STEPS_TRAINED_LIFETIME,
        TIMERS,
    )

    config = algo.config
    with algo.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
        results = algo.learner_group.update(
            episodes=episodes,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                NUM_MODULE_STEPS_TRAINED_LIFETIME: algo.metrics.peek(
                    (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0),
            },
            num_epochs=config.num_epochs,
            minibatch_size=config.minibatch_size,
            shuffle_batch_per_epoch=config.shuffle_batch_per_epoch,
        )
        algo.metrics.aggregate(results, key=LEARNER_RESULTS)
