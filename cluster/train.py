"""The training loop behind `rlfleet train`: a run directory, progress, metrics, checkpoints, resume.

    run_dir/config.json     rule, env, seed, resolved options, stop criteria
    run_dir/metrics.jsonl   one line per iteration: env steps, mean return, losses, steps/s
    run_dir/checkpoints/iter_NNNNNN/   every `checkpoint_every` iterations and at the end (last 5 kept)
    run_dir/curve.png       mean return against env steps
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from algorithms.options import set_option
from algorithms.registry import Rule, build_config, get_rule
from cluster.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE, list_checkpoints, read_run_config
from cluster.local import ensure_ray
from cluster.metrics import TrainingMetrics
from envs import ensure_env
from rlfleet.errors import UserError

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"
KEEP_CHECKPOINTS = 5
SMOOTHING_EPISODES = 100  # the stop criterion and the reported return average over this many episodes
# What the stop criterion and the reported return measure: the mean return of the last SMOOTHING_EPISODES training
# episodes (with the rule's exploration), or the mean return of greedy evaluation episodes (explore=False) on an
# RLlib evaluation EnvRunner, as the DQN paper (Mnih et al. 2015) and RL-Baselines3-Zoo score value-based agents.
SCORES = ("train_window", "greedy_eval")
# Learner result keys copied into metrics.jsonl when a rule reports them.
LOSS_KEYS = (
    "total_loss", "policy_loss", "vf_loss", "entropy", "mean_kl_loss", "approx_kl", "clip_fraction",
    "surrogate_improvement", "line_search_backtracks",
)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    env_steps: int
    episode_return_mean: float
    iterations: int
    reached_return: bool
    interrupted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def check_stop_values(stop_return: float | None, stop_steps: int | None, checkpoint_every: int) -> None:
    if stop_steps is not None and stop_steps <= 0:
        raise UserError(f"--stop-steps must be a positive number of env steps, got {stop_steps}")
    if stop_return is not None and not math.isfinite(stop_return):
        raise UserError(f"--stop-return must be a finite number, got {stop_return}")
    if checkpoint_every <= 0:
        raise UserError(f"--checkpoint-every must be >= 1 iteration, got {checkpoint_every}")


def new_run_dir(runs_dir: Path, rule: str, env_id: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = Path(runs_dir).resolve()  # RLlib's checkpoint writer (pyarrow fs) needs absolute paths
    run_dir = runs_dir / f"{rule}-{env_id}-s{seed}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{rule}-{env_id}-s{seed}-{stamp}-{suffix}"
    return run_dir


def smoothed_return(history: list[dict[str, Any]], window: int = SMOOTHING_EPISODES) -> float | None:
    """Mean return over (about) the last `window` finished episodes.

    RLlib's `episode_return_mean` covers only the episodes that finished in one iteration (a few, late in
    CartPole), so one lucky iteration could end a learning check. Each iteration's mean is weighted by its
    number of episodes, going back until `window` episodes are covered.
    """
    total, episodes = 0.0, 0
    for i in range(len(history) - 1, -1, -1):
        record = history[i]
        if record["episode_return_mean"] is None:
            continue
        before = history[i - 1]["episodes"] if i > 0 else 0
        count = max(record["episodes"] - before, 1)
        take = min(count, window - episodes)
        total += take * record["episode_return_mean"]
        episodes += take
        if episodes >= window:
            break
    return total / episodes if episodes else None


def configure_greedy_eval(config, episodes: int, interval: int) -> None:
    """RLlib evaluation for the "greedy_eval" score: every `interval` iterations, `episodes` whole episodes with
    explore=False on one EnvRunner in the driver (no extra actor), its weights synced from the learner first."""
    if episodes < 1 or interval < 1:
        raise UserError(f"greedy evaluation needs episodes >= 1 and interval >= 1, got {episodes}, {interval}")
    config.evaluation(
        evaluation_interval=interval, evaluation_duration=episodes, evaluation_duration_unit="episodes",
        evaluation_num_env_runners=0,
        # The smoothing window = one evaluation's episodes, so the reported mean never mixes in earlier evaluations.
        evaluation_config={"explore": False, "metrics_num_episodes_for_smoothing": episodes},
    )


def greedy_eval_return(result: dict[str, Any]) -> float | None:
    """Mean return of the latest greedy evaluation's episodes (None before the first one; RLlib's result repeats the
    latest evaluation in the iterations between two evaluations)."""
    value = result.get("evaluation", {}).get("env_runners", {}).get("episode_return_mean")
    return None if value is None or math.isnan(value) else float(value)


def iteration_record(result: dict[str, Any], iteration: int, elapsed_s: float, steps_before: int,
                     iter_time_s: float) -> dict[str, Any]:
    """One metrics.jsonl line from an RLlib result dict."""
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    env_steps = int(runners.get("num_env_steps_sampled_lifetime", 0))
    mean_return = runners.get("episode_return_mean")
    losses = {k: float(learner[k]) for k in LOSS_KEYS if k in learner}
    return {
        "iteration": iteration,
        "env_steps": env_steps,
        "episode_return_mean": None if mean_return is None or math.isnan(mean_return) else float(mean_return),
        "episodes": int(runners.get("num_episodes_lifetime", 0)),
        "steps_per_s": (env_steps - steps_before) / iter_time_s if iter_time_s > 0 else None,
        "time_s": round(elapsed_s, 3),
        "losses": losses,
    }


def plot_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["env_steps"], h["episode_return_mean"]) for h in history if h["episode_return_mean"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, lw=1.5)
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(algo, run_dir: Path, iteration: int) -> Path:
    path = run_dir / CHECKPOINTS_DIR / f"iter_{iteration:06d}"
    algo.save_to_path(str(path))
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def sync_runner_weights(algo) -> None:
    """Push the learner's weights to every EnvRunner and wait for it.

    After a restore, RLlib's fire-and-forget sync can leave remote runners with random weights
    (notes/rllib-2.60.md, "STALE WEIGHTS"); a timeout makes the call block until each runner has them.
    """
    group = getattr(algo, "env_runner_group", None)
    if group is None:
        return
    group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True, timeout_seconds=30)


def train(
    algo_name: str | None = None,
    env_id: str | None = None,
    *,
    stop_return: float | None = None,
    stop_steps: int | None = None,
    seed: int = 0,
    runs_dir: str | Path = "runs",
    overrides: dict[str, str] | None = None,
    resume: str | Path | None = None,
    checkpoint_every: int = 10,
    progress: bool = True,
    score: str | None = None,
    eval_episodes: int = 10,
    eval_interval: int = 2,
) -> TrainResult:
    """Train until the mean return reaches `stop_return` or `stop_steps` env steps; Ctrl-C stops cleanly.

    `score` (SCORES; default "train_window") says which mean return is meant: the last 100 training episodes', or
    ("greedy_eval") that of `eval_episodes` greedy episodes evaluated every `eval_interval` iterations."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # An ignored SIGINT inherited from a parent (a shell's `cmd &`, a Ray job) would make Ctrl-C and
        # `rlfleet stop` kill the run without its final checkpoint.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check_stop_values(stop_return, stop_steps, checkpoint_every)
    if resume is not None:
        run_dir = Path(resume).resolve()
        run_config = read_run_config(run_dir)
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise UserError(f"cannot resume {run_dir}: it has no checkpoint under {CHECKPOINTS_DIR}/")
        rule = get_rule(run_config["algo"])
        env_id = run_config["env"]
        seed = int(run_config["seed"])
        ensure_env(env_id)
        config, options = build_config(rule, env_id, seed, overrides, typed_overrides=run_config["options"])
        stop_return = stop_return if stop_return is not None else run_config.get("stop_return")
        stop_steps = stop_steps if stop_steps is not None else run_config.get("stop_steps")
        score = score or run_config.get("score", "train_window")
        eval_episodes = int(run_config.get("eval_episodes", eval_episodes))
        eval_interval = int(run_config.get("eval_interval", eval_interval))
    else:
        if algo_name is None or env_id is None:
            raise UserError("train needs --algo and --env (or --resume RUN_DIR)")
        rule = get_rule(algo_name)
        if not rule.trains_on_env_steps:
            raise UserError(f"{rule.name} does not train on env steps: it has its own loop: run its check with "
                            f"`rlfleet verify --algo {rule.name}` (run directories and checkpoints for these rules "
                            "are not built yet)")
        ensure_env(env_id)
        config, options = build_config(rule, env_id, seed, overrides)
        run_dir = new_run_dir(Path(runs_dir), rule.name, env_id, seed)
        checkpoints = []
        if "replay_namespace" in options and not options["replay_namespace"]:
            # Off-policy rules: the run's Redis replay table is named after the run, so --resume finds it again.
            set_option(config, "replay_namespace", run_dir.name)
            options["replay_namespace"] = run_dir.name
    if stop_return is None and stop_steps is None:
        raise UserError("give --stop-return, --stop-steps or both, so training has an end")
    score = score or "train_window"
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")
    if score == "greedy_eval":
        configure_greedy_eval(config, eval_episodes, eval_interval)

    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "algo": rule.name, "env": env_id, "seed": seed, "options": options,
        "stop_return": stop_return, "stop_steps": stop_steps, "family": rule.family, "paper_ids": list(rule.paper_ids),
        "score": score,
    }
    if score == "greedy_eval":
        run_config |= {"eval_episodes": eval_episodes, "eval_interval": eval_interval}
    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")

    ensure_ray()
    algo = config.build_algo()
    history = read_history(run_dir)
    if checkpoints:
        algo.restore_from_path(str(checkpoints[-1]))
        sync_runner_weights(algo)
    return _train_loop(algo, rule, env_id, run_dir, history, stop_return, stop_steps, checkpoint_every, progress,
                       greedy=score == "greedy_eval")


def _train_loop(algo, rule: Rule, env_id: str, run_dir: Path, history: list[dict[str, Any]],
                stop_return: float | None, stop_steps: int | None, checkpoint_every: int,
                progress: bool, greedy: bool = False) -> TrainResult:
    from tqdm import tqdm

    iteration = history[-1]["iteration"] if history else 0
    env_steps = history[-1]["env_steps"] if history else 0
    if greedy:  # the score is the latest greedy evaluation
        mean_return = next((h["greedy_return_mean"] for h in reversed(history)
                            if h.get("greedy_return_mean") is not None), None)
    else:
        mean_return = smoothed_return(history) if history else None
    mean_return = float("nan") if mean_return is None else mean_return
    elapsed_before = history[-1]["time_s"] if history else 0.0
    bar = tqdm(total=stop_steps, initial=env_steps, unit="step", disable=not progress, dynamic_ncols=True,
               desc=f"{rule.name} {env_id}")
    start = time.perf_counter()
    last_checkpoint: Path | None = None
    exporter = TrainingMetrics(run_dir, rule.name, env_id, algo=algo, loss_keys=LOSS_KEYS)  # Prometheus via Ray
    interrupted = False
    reached = False
    try:
        with open(run_dir / METRICS_FILE, "a") as metrics_file:
            while True:
                iter_start = time.perf_counter()
                result = algo.train()
                iteration += 1
                record = iteration_record(result, iteration, elapsed_before + time.perf_counter() - start,
                                          env_steps, time.perf_counter() - iter_start)
                bar.update(record["env_steps"] - env_steps)
                env_steps = record["env_steps"]
                history.append(record)
                smoothed = smoothed_return(history)
                record["return_mean_100"] = smoothed
                score = smoothed
                if greedy:
                    score = record["greedy_return_mean"] = greedy_eval_return(result)
                if score is not None:
                    mean_return = score
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                exporter.export(result, record)
                bar.set_postfix(ret=f"{mean_return:.1f}", sps=f"{record['steps_per_s'] or 0:.0f}")
                reached = stop_return is not None and not math.isnan(mean_return) and mean_return >= stop_return
                if reached or (stop_steps is not None and env_steps >= stop_steps):
                    break
                if iteration % checkpoint_every == 0:
                    last_checkpoint = save_checkpoint(algo, run_dir, iteration)
    except KeyboardInterrupt:
        interrupted = True
        bar.write("interrupted: saving a final checkpoint (Ctrl-C again to abort)")
    finally:
        bar.close()
        exporter.close()
    final = run_dir / CHECKPOINTS_DIR / f"iter_{iteration:06d}"
    if last_checkpoint != final:
        final = save_checkpoint(algo, run_dir, iteration)
    plot_curve(history, run_dir / CURVE_FILE, f"{rule.name} on {env_id}")
    algo.stop()
    return TrainResult(run_dir=run_dir, checkpoint=final, env_steps=env_steps, episode_return_mean=mean_return,
                       iterations=iteration, reached_return=reached, interrupted=interrupted, history=history)
