"""`rlfleet bench sac`: rlfleet's SAC on the Redis replay against RLlib's stock SAC with its in-process buffer.

Both train on the same env with the same settings (one EnvRunner actor, 64-step fragments, 128-transition
minibatches, 64 sampled transitions per inserted one, 1000 learning starts, Adam 1e-3 for actor, critics and
temperature, tau 0.005, 256-256 ReLU MLPs, uniform replay), in the same process, alternating which goes first.
Reported: env steps/s of each, their ratio (rlfleet / RLlib), and the mean episode return each reached. What
still differs is the algorithms' own detail: RLlib's SAC regresses its critics with a Huber loss, rlfleet's with the
paper's squared error (algorithms/offpolicy/sac.py).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from rlfleet.errors import UserError

SHARED = {"rollout_fragment_length": 64, "train_batch_size": 128, "replay_ratio": 64.0, "learning_starts": 1000}


def _rlfleet_config(env_id: str, seed: int):
    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule("sac"), env_id, seed, {
        "num_env_runners": "1", "rollout_fragment_length": str(SHARED["rollout_fragment_length"]),
        "train_batch_size": str(SHARED["train_batch_size"]), "samples_per_insert": str(SHARED["replay_ratio"]),
        "learning_starts": str(SHARED["learning_starts"]),
    })
    return config


def _rllib_config(env_id: str, seed: int):
    from ray.rllib.algorithms.sac import SACConfig

    return (
        SACConfig()
        .environment(env_id)
        .debugging(seed=seed)
        .env_runners(num_env_runners=1, rollout_fragment_length=SHARED["rollout_fragment_length"])
        .training(
            actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3, gamma=0.99, tau=0.005, initial_alpha=1.0, twin_q=True,
            train_batch_size_per_learner=SHARED["train_batch_size"],
            # training_intensity is RLlib's replay ratio, but its round-robin weights count the local EnvRunner as
            # a sampler too (runners + 1), which does not sample when remote ones exist: with one remote runner
            # the ratio it runs is 2x the one given, so we give half (measured: see the result's "replayed").
            training_intensity=SHARED["replay_ratio"] / 2,
            num_steps_sampled_before_learning_starts=SHARED["learning_starts"],
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 1_000_000},
        )
        .reporting(min_sample_timesteps_per_iteration=500, min_time_s_per_iteration=0)
        .rl_module(model_config={"fcnet_hiddens": [256, 256], "fcnet_activation": "relu",
                                 "head_fcnet_hiddens": [], "head_fcnet_activation": "relu"})
    )


def _train(config, steps: int) -> dict[str, Any]:
    from ray.rllib.core import ALL_MODULES
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        LEARNER_RESULTS,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
        NUM_ENV_STEPS_TRAINED_LIFETIME,
    )

    algo = config.build_algo()
    sampled, result = 0, {}
    try:
        start = time.perf_counter()
        while sampled < steps:
            result = algo.train()
            sampled = int(result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME])
        elapsed = time.perf_counter() - start
        table = getattr(algo, "replay_table", None)
        if table is not None:  # rlfleet: the Redis table counts what the learner sampled
            trained = table.info()["samples"]
        else:  # RLlib: its learner's lifetime count of trained env steps
            trained = result.get(LEARNER_RESULTS, {}).get(ALL_MODULES, {}).get(NUM_ENV_STEPS_TRAINED_LIFETIME,
                                                                              math.nan)
    finally:
        algo.stop()
    return {"env_steps": sampled, "seconds": elapsed, "steps_per_s": sampled / elapsed,
            "mean_return": float(result[ENV_RUNNER_RESULTS].get("episode_return_mean", math.nan)),
            # transitions trained on per env step, after the learning starts: both must be ~ the replay ratio
            "replayed_per_step": float(trained) / max(1, sampled - SHARED["learning_starts"])}


def run_sac_bench(steps: int = 10_000, seed: int = 0, env_id: str = "Pendulum-v1",
                  repeats: int = 1) -> dict[str, Any]:
    """Train both SACs for `steps` env steps each, `repeats` times in alternating order; returns the numbers."""
    if steps < SHARED["learning_starts"] or repeats < 1:
        raise UserError(f"bench sac needs --steps >= {SHARED['learning_starts']} (the learning starts) and "
                        f"repeats >= 1, got steps={steps}, repeats={repeats}")
    from cluster.local import ensure_ray

    ensure_ray()
    builders = {"rlfleet": _rlfleet_config, "rllib": _rllib_config}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in builders}
    for rep in range(repeats):
        order = list(builders) if rep % 2 == 0 else list(reversed(builders))
        for name in order:
            runs[name].append(_train(builders[name](env_id, seed + rep), steps))
    summary = {name: {"steps_per_s": statistics.fmean(r["steps_per_s"] for r in rs),
                      "mean_return": statistics.fmean(r["mean_return"] for r in rs),
                      "replayed_per_step": statistics.fmean(r["replayed_per_step"] for r in rs), "runs": rs}
               for name, rs in runs.items()}
    return {"benchmark": "sac", "env": env_id, "steps": steps, "seed": seed, "repeats": repeats,
            "settings": SHARED, **summary,
            "ratio": summary["rlfleet"]["steps_per_s"] / summary["rllib"]["steps_per_s"]}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"SAC on {result['env']}, {result['steps']:,} env steps each, {result['repeats']} repeat(s), same "
             f"process, alternating order", "",
             "| contender | replay | env steps/s | mean return reached | transitions trained per env step |",
             "|---|---|---|---|---|"]
    for name, replay in (("rlfleet", "Redis table (services/replay)"), ("rllib", "in-process EpisodeReplayBuffer")):
        row = result[name]
        lines.append(f"| {name} | {replay} | {row['steps_per_s']:.1f} | {row['mean_return']:.1f} | "
                     f"{row['replayed_per_step']:.1f} |")
    lines += ["", f"ratio rlfleet / RLlib (env steps/s): {result['ratio']:.2f}x"]
    return "\n".join(lines)
