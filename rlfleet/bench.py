"""`rlfleet bench ppo-throughput`: rlfleet's PPO against Stable-Baselines3's PPO at equal settings.

Both train the same number of env steps on the same env, in this one process, with the same PPO settings
(read from rlfleet's `ppo` rule so they cannot drift): 2048 steps per rollout from one env, minibatch 64,
10 epochs, lr 3e-4, gamma 0.99, lambda 0.95, clip 0.2, value coefficient 0.5, entropy 0, grad-norm clip 0.5,
separate 64-64 tanh MLPs for policy and value. Runs alternate (SB3, rlfleet, then rlfleet, SB3, ...) so that
drift in machine load hits both; each run starts from a freshly built model.

Only training is timed: Ray start-up, `build_algo()` and SB3's model construction are excluded (SB3's
`learn()` and rlfleet's `train()` calls are timed, each including its own first env reset).

`run_ppo_throughput` prints nothing; `format_table` renders its result.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any

from rlfleet.errors import UserError

# Model differences that remain at "equal settings" (reported with the result).
DIFFERENCES = (
    "policy std: SB3 a state-independent log-std parameter; RLlib's default module a state-dependent "
    "log-std output of the policy net",
    "init: SB3 orthogonal (gain sqrt 2, policy head 0.01, value head 1); RLlib torch's default init",
    "Adam: SB3 eps 1e-5; rlfleet eps 1e-8 (torch default), fused kernel (same update rule)",
    "advantage standardisation: SB3 per minibatch; rlfleet per batch",
    "critic during rollouts: SB3 evaluates V(s) every step; rlfleet once per batch in the learner",
)


def _bare_env_steps_per_s(env_id: str, seed: int, steps: int) -> float:
    import gymnasium as gym

    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(min(steps, 1000))]
    start = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[i % len(actions)])
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def _rlfleet_config(env_id: str, seed: int):
    from algorithms.registry import build_config, get_rule

    config, _ = build_config(get_rule("ppo"), env_id, seed, {"num_env_runners": "0"})
    return config


def _rllib_paths(config):
    """The same config with every lean path switched off: RLlib's own sampler, minibatch loop and Adam."""
    config = config.copy(copy_frozen=False)
    config.lean_sampling = False
    config.lean_learner_update = False
    config.fused_adam = False
    config.env_runner_cls = None
    return config


def _run_rlfleet(config, steps: int, default_threads: int) -> dict[str, Any]:
    import torch
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    algo = config.build_algo()
    threads = config.learner_torch_threads or default_threads
    torch.set_num_threads(threads)  # another run in between may have changed the process-wide setting
    sampled, result, timers = 0, {}, {"sampling": 0.0, "learner": 0.0}
    try:
        start = time.perf_counter()
        while sampled < steps:
            result = algo.train()
            sampled = int(result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME])
        elapsed = time.perf_counter() - start
        episode_return = result[ENV_RUNNER_RESULTS].get("episode_return_mean", math.nan)
        for key, name in (("sampling", "env_runner_sampling_timer"), ("learner", "learner_update_timer")):
            timers[key] = float(result.get("timers", {}).get(name, math.nan))
    finally:
        algo.stop()
    return {
        "env_steps": sampled,
        "seconds": elapsed,
        "steps_per_s": sampled / elapsed,
        "mean_return": float(episode_return),
        "torch_threads": threads,
        "iteration_seconds_last": timers,
    }


def _sb3_model(env_id: str, seed: int, config):
    try:
        import torch
        from stable_baselines3 import PPO
    except ImportError as exc:  # optional dependency
        raise UserError(f"the benchmark needs Stable-Baselines3 ({exc}); install it with: pip install 'rlfleet[bench]'")
    hidden = list(config.model_config["fcnet_hiddens"])
    return PPO(
        "MlpPolicy",
        env_id,
        n_steps=config.train_batch_size_per_learner,
        batch_size=config.minibatch_size,
        n_epochs=config.num_epochs,
        learning_rate=config.lr,
        gamma=config.gamma,
        gae_lambda=config.lambda_,
        clip_range=config.clip_param,
        vf_coef=config.vf_loss_coeff,
        ent_coef=config.entropy_coeff,
        max_grad_norm=config.grad_clip,
        policy_kwargs={"net_arch": {"pi": hidden, "vf": hidden}, "activation_fn": torch.nn.Tanh},
        seed=seed,
        device="cpu",
        verbose=0,
    )


def _run_sb3(model, steps: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    split = {"sampling": 0.0, "learner": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                split[key] += time.perf_counter() - t0

        return wrapper

    model.collect_rollouts = timed(model.collect_rollouts, "sampling")
    model.train = timed(model.train, "learner")
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    elapsed = time.perf_counter() - start
    done = int(model.num_timesteps)
    rollouts = max(1, math.ceil(done / model.n_steps))
    returns = [info["r"] for info in model.ep_info_buffer]
    return {
        "env_steps": done,
        "seconds": elapsed,
        "steps_per_s": done / elapsed,
        "mean_return": float(statistics.fmean(returns)) if returns else math.nan,
        "torch_threads": threads,
        "iteration_seconds_mean": {k: v / rollouts for k, v in split.items()},
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["steps_per_s"] for r in runs]
    returns = [r["mean_return"] for r in runs if not math.isnan(r["mean_return"])]
    return {
        "steps_per_s": statistics.fmean(rates),
        "steps_per_s_runs": rates,
        "mean_return": statistics.fmean(returns) if returns else math.nan,
        "runs": runs,
    }


def run_ppo_throughput(
    steps: int = 20480,
    seed: int = 0,
    env_id: str = "HalfCheetah-v5",
    *,
    repeats: int = 2,
    sb3_one_thread: bool = True,
    rllib_paths: bool = False,
    json_path: str | None = None,
) -> dict[str, Any]:
    """Train SB3 PPO and rlfleet PPO for `steps` env steps each, `repeats` times in alternating order.

    Also runs SB3 pinned to one torch thread (as rlfleet's learner is) when `sb3_one_thread`, rlfleet with its
    lean paths switched off (RLlib's own sampler, minibatch loop and Adam; still one torch thread) when
    `rllib_paths`, and measures the bare env's steps/s with random actions. Returns a dict (see
    `format_table`); writes it as JSON to `json_path` if given. Prints nothing.
    """
    if steps < 1 or repeats < 1:
        raise UserError(f"steps and repeats must be >= 1 (got steps={steps}, repeats={repeats})")
    import ray
    import torch

    default_threads = torch.get_num_threads()
    started_ray = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        started_ray = True
    try:
        config = _rlfleet_config(env_id, seed)
        bare = _bare_env_steps_per_s(env_id, seed, min(steps, 20000))
        contenders = ["sb3", "rlfleet"] + (["sb3_1thread"] if sb3_one_thread and default_threads != 1 else [])
        contenders += ["rlfleet_rllib_paths"] if rllib_paths else []
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for rep in range(repeats):
            order = contenders if rep % 2 == 0 else list(reversed(contenders))
            for name in order:
                if name == "rlfleet":
                    runs[name].append(_run_rlfleet(config, steps, default_threads))
                elif name == "rlfleet_rllib_paths":
                    runs[name].append(_run_rlfleet(_rllib_paths(config), steps, default_threads))
                else:
                    model = _sb3_model(env_id, seed, config)
                    runs[name].append(_run_sb3(model, steps, default_threads if name == "sb3" else 1))
                    model.env.close()
        torch.set_num_threads(default_threads)
    finally:
        if started_ray:
            ray.shutdown()

    result: dict[str, Any] = {
        "benchmark": "ppo-throughput",
        "env_id": env_id,
        "steps": steps,
        "seed": seed,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timed": "training only (SB3 learn(), rlfleet train() calls); Ray start-up, algo build and SB3 model "
        "construction excluded",
        "settings": {
            "rollout_steps": config.train_batch_size_per_learner,
            "num_envs": config.num_envs_per_env_runner,
            "minibatch_size": config.minibatch_size,
            "num_epochs": config.num_epochs,
            "lr": config.lr,
            "gamma": config.gamma,
            "lambda": config.lambda_,
            "clip": config.clip_param,
            "vf_coeff": config.vf_loss_coeff,
            "entropy_coeff": config.entropy_coeff,
            "grad_clip": config.grad_clip,
            "hidden": list(config.model_config["fcnet_hiddens"]),
            "activation": config.model_config["fcnet_activation"],
            "rlfleet_num_env_runners": config.num_env_runners,
            "rlfleet_torch_threads": config.learner_torch_threads,
            "sb3_torch_threads": default_threads,
        },
        "differences": list(DIFFERENCES),
        "bare_env_steps_per_s": bare,
        "sb3": _summary(runs["sb3"]),
        "rlfleet": _summary(runs["rlfleet"]),
    }
    for name in ("sb3_1thread", "rlfleet_rllib_paths"):
        if name in runs:
            result[name] = _summary(runs[name])
    result["ratio_rlfleet_over_sb3"] = result["rlfleet"]["steps_per_s"] / result["sb3"]["steps_per_s"]
    if "sb3_1thread" in result:
        result["ratio_rlfleet_over_sb3_1thread"] = (
            result["rlfleet"]["steps_per_s"] / result["sb3_1thread"]["steps_per_s"]
        )
    # The conservative figure: against whichever SB3 variant was faster in this run.
    best_sb3 = max(result[k]["steps_per_s"] for k in ("sb3", "sb3_1thread") if k in result)
    result["ratio_rlfleet_over_best_sb3"] = result["rlfleet"]["steps_per_s"] / best_sb3
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a `run_ppo_throughput` result."""
    s = result["settings"]
    lines = [
        f"PPO throughput on {result['env_id']}: {result['steps']} env steps per run, {result['repeats']} runs each "
        f"(alternating order), seed {result['seed']}",
        f"settings: {s['rollout_steps']} steps/rollout, {s['num_envs']} env, minibatch {s['minibatch_size']}, "
        f"{s['num_epochs']} epochs, {s['hidden']} {s['activation']} MLPs (policy and value separate)",
        f"timed: {result['timed']}",
        "",
        f"{'':26s} {'env steps/s':>12s} {'runs':>22s} {'mean return':>12s} {'sample s/iter':>14s} {'learn s/iter':>13s}",
    ]
    rows = [(f"SB3 PPO ({s['sb3_torch_threads']} threads)", "sb3")]
    if "sb3_1thread" in result:
        rows.append(("SB3 PPO (1 thread)", "sb3_1thread"))
    rows.append((f"rlfleet PPO ({s['rlfleet_torch_threads'] or 'default'} thread)", "rlfleet"))
    if "rlfleet_rllib_paths" in result:
        rows.append(("rlfleet, RLlib's paths", "rlfleet_rllib_paths"))
    for label, key in rows:
        entry = result[key]
        split = entry["runs"][-1].get("iteration_seconds_mean") or entry["runs"][-1].get("iteration_seconds_last")
        runs = ", ".join(f"{r:.0f}" for r in entry["steps_per_s_runs"])
        lines.append(
            f"{label:26s} {entry['steps_per_s']:12.0f} {runs:>22s} {entry['mean_return']:12.1f}"
            f" {split['sampling']:14.3f} {split['learner']:13.3f}"
        )
    lines += [
        f"{'bare env (random actions)':26s} {result['bare_env_steps_per_s']:12.0f}",
        "",
        f"ratio rlfleet / SB3: {result['ratio_rlfleet_over_sb3']:.2f}x (SB3 with its default "
        f"{s['sb3_torch_threads']} torch threads)"
        + (
            f"; {result['ratio_rlfleet_over_sb3_1thread']:.2f}x vs SB3 on 1 torch thread"
            if "ratio_rlfleet_over_sb3_1thread" in result
            else ""
        ),
        f"ratio vs the faster SB3 variant of this run: {result['ratio_rlfleet_over_best_sb3']:.2f}x",
        "",
        f"rlfleet: {s['rlfleet_num_env_runners']} remote EnvRunners (samples in the driver), learner in the driver.",
        "mean return: SB3 = mean of its ep_info_buffer (last 100 episodes); rlfleet = episode_return_mean at the "
        "end (last 100 episodes). s/iter: per 2048-step rollout and update; SB3 averaged over the last run, "
        "rlfleet RLlib's smoothed timers at the end of its last run.",
    ]
    if "rlfleet_rllib_paths" in result:
        lines.append("rlfleet, RLlib's paths: lean_sampling, lean_learner_update and fused_adam off (RLlib's own "
                     "EnvRunner loop, minibatch loop and Adam), same 1 torch thread.")
    lines.append("remaining model differences (not throughput):")
    lines += [f"  - {d}" for d in result["differences"]]
    if result.get("load_average"):
        lines.append(f"machine: {result['cpu_count']} CPUs, load average at the end {result['load_average'][0]:.1f} "
                     "(a busy machine slows both; multi-threaded torch suffers most)")
    return "\n".join(lines)


def check_lean_paths(
    env_ids: tuple[str, ...] = ("HalfCheetah-v5", "CartPole-v1", "Pendulum-v1"),
    steps: int = 1100,
    seed: int = 0,
) -> dict[str, Any]:
    """Regression check of the lean paths in `algorithms.onpolicy.base` against RLlib's own code.

    Sampling: for each env, RLlib's SingleAgentEnvRunner and OnPolicyEnvRunner sample `steps` env steps three
    times (crossing episode ends and rollout cuts) with the same weights and RNG state; every episode field
    (observations, actions, rewards, infos, flags, extra model outputs, dtypes included) must be identical.
    Learner: one full-batch update from the same state through RLlib's loop and the lean loop; the updated
    parameters must agree to float rounding (RLlib's batch also carries the masked phantom rows, which changes
    the matmul blocking) and the loss must be equal. Run after upgrading Ray. Returns {"ok": bool, ...}.
    """
    import copy

    import numpy as np
    import ray
    import torch
    from ray.rllib.core.learner.training_data import TrainingData
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from algorithms.registry import build_config, get_rule

    def episode_fields(episode) -> dict[str, Any]:
        fields = {
            "obs": np.asarray(episode.get_observations()), "actions": np.asarray(episode.get_actions()),
            "rewards": np.asarray(episode.get_rewards()), "infos": episode.get_infos(),
            "terminated": episode.is_terminated, "truncated": episode.is_truncated, "t_started": episode.t_started,
        }
        for key in episode.extra_model_outputs.keys():
            fields["extra:" + key] = np.asarray(episode.get_extra_model_outputs(key))
        return fields

    def same(a, b) -> bool:
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        return a == b

    def rollouts(env_id: str, lean: bool, weights):
        config, _ = build_config(get_rule("ppo"), env_id, seed, {"num_env_runners": "0"})
        config.lean_sampling = lean
        if not lean:
            config.env_runner_cls = None
        algo = config.build_algo()
        try:
            runner = algo.env_runner
            if weights is None:
                weights = copy.deepcopy(runner.module.state_dict())
            runner.module.load_state_dict(weights)
            torch.manual_seed(seed)
            chunks = [runner.sample(num_timesteps=steps, explore=True) for _ in range(3)]
            return [[episode_fields(e) for e in chunk] for chunk in chunks], weights, type(runner).__name__
        finally:
            algo.stop()

    started_ray = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        started_ray = True
    report: dict[str, Any] = {"sampling": {}, "learner": {}}
    try:
        for env_id in env_ids:
            stock, weights, stock_cls = rollouts(env_id, False, None)
            lean, _, lean_cls = rollouts(env_id, True, weights)
            mismatches = [
                key
                for chunk_a, chunk_b in zip(stock, lean)
                for ep_a, ep_b in zip(chunk_a, chunk_b)
                for key in ep_a
                if key not in ep_b or not same(ep_a[key], ep_b[key])
            ]
            counts_equal = [len(c) for c in stock] == [len(c) for c in lean]
            report["sampling"][env_id] = {
                "identical": counts_equal and not mismatches, "mismatched_fields": sorted(set(mismatches)),
                "runners": [stock_cls, lean_cls], "steps": 3 * steps,
            }

            config, _ = build_config(get_rule("ppo"), env_id, seed, {"num_env_runners": "0"})
            algo = config.build_algo()
            try:
                learner = algo.learner_group._learner
                episodes = algo.env_runner.sample(num_timesteps=2048, explore=True)
                state = copy.deepcopy(learner.get_state())
                rows = len(learner._make_batch_if_necessary(TrainingData(episodes=copy.deepcopy(episodes)))
                           .policy_batches["default_policy"])
                outcome = {}
                for lean_update in (False, True):
                    learner.set_state(copy.deepcopy(state))
                    learner.config.lean_learner_update = lean_update
                    learner._lean_step_checked = False
                    result = learner.update(
                        episodes=copy.deepcopy(episodes), timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 2048},
                        num_epochs=1, minibatch_size=rows, shuffle_batch_per_epoch=False,
                    )
                    params = {k: v.detach().clone() for k, v in learner.module["default_policy"].state_dict().items()}
                    outcome[lean_update] = (float(result["default_policy"]["total_loss"].peek()), params)
                learner.config.lean_learner_update = True
                (loss_stock, p_stock), (loss_lean, p_lean) = outcome[False], outcome[True]
                max_diff = max(float((p_stock[k] - p_lean[k]).abs().max()) for k in p_stock)
                report["learner"][env_id] = {
                    "loss_stock": loss_stock, "loss_lean": loss_lean, "max_param_diff": max_diff,
                    "ok": max_diff < 1e-5 and abs(loss_stock - loss_lean) <= 1e-5 * max(1.0, abs(loss_stock)),
                }
            finally:
                algo.stop()
    finally:
        if started_ray:
            ray.shutdown()
    report["ok"] = all(v["identical"] for v in report["sampling"].values()) and all(
        v["ok"] for v in report["learner"].values()
    )
    return report
