"""`rlfleet compare`: several rules on one task with the same seeds; one picture of their curves and a table."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.registry import get_rule
from rlfleet.errors import UserError

GRID_POINTS = 50


def curve_on_grid(history: list[dict[str, Any]], grid: np.ndarray) -> np.ndarray:
    """Mean return at each grid step (step-wise: the last value logged at or before it; NaN before any)."""
    points = [(h["env_steps"], h["episode_return_mean"]) for h in history if h["episode_return_mean"] is not None]
    out = np.full(len(grid), np.nan)
    if not points:
        return out
    steps, returns = map(np.asarray, zip(*points))
    idx = np.searchsorted(steps, grid, side="right") - 1
    valid = idx >= 0
    out[valid] = returns[idx[valid]]
    return out


def compare(algos: list[str], env_id: str, steps: int, seeds: int, out_dir: str | Path = "runs/compare",
            overrides: dict[str, str] | None = None, progress: bool = False) -> dict[str, Any]:
    from cluster.train import train
    from envs import ensure_env

    if len(algos) < 1:
        raise UserError("--algos needs at least one rule, e.g. --algos ppo,trpo")
    if steps <= 0 or seeds <= 0:
        raise UserError(f"--steps and --seeds must be positive, got {steps} and {seeds}")
    for name in algos:
        get_rule(name)
    ensure_env(env_id)
    out = Path(out_dir).resolve() / f"{env_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    grid = np.linspace(0, steps, GRID_POINTS)
    results: dict[str, Any] = {}
    for name in algos:
        curves, finals, walls, run_dirs = [], [], [], []
        for seed in range(seeds):
            start = time.perf_counter()
            result = train(name, env_id, stop_steps=steps, seed=seed, runs_dir=out / "runs", overrides=overrides,
                           progress=progress)
            walls.append(time.perf_counter() - start)
            curves.append(curve_on_grid(result.history, grid))
            finals.append(result.episode_return_mean)
            run_dirs.append(str(result.run_dir))
        stacked = np.vstack(curves)
        results[name] = {
            "final_mean": statistics.fmean(finals), "final_std": statistics.pstdev(finals), "finals": finals,
            "auc": float(np.nanmean(stacked)), "wall_s_mean": statistics.fmean(walls),
            "curve_mean": np.nanmean(stacked, axis=0).tolist(), "curve_std": np.nanstd(stacked, axis=0).tolist(),
            "run_dirs": run_dirs,
        }
    summary = {"env": env_id, "steps": steps, "seeds": seeds, "grid": grid.tolist(), "rules": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "compare.png")
    (out / "compare.md").write_text(format_table(summary))
    summary["out_dir"] = str(out)
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(summary["grid"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in summary["rules"].items():
        mean, std = np.asarray(r["curve_mean"]), np.asarray(r["curve_std"])
        ax.plot(grid, mean, lw=1.8, label=f"{name} ({r['final_mean']:.0f} ± {r['final_std']:.0f})")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(f"{summary['env']}: mean ± std over {summary['seeds']} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['env']}, {summary['steps']:,} env steps, seeds 0..{summary['seeds'] - 1}",
        "",
        "| rule | final return (mean ± std) | mean return over training (AUC) | wall time per seed |",
        "|---|---|---|---|",
    ]
    ranked = sorted(summary["rules"].items(), key=lambda kv: -kv[1]["final_mean"])
    for name, r in ranked:
        lines.append(f"| {name} | {r['final_mean']:.1f} ± {r['final_std']:.1f} | {r['auc']:.1f} | "
                     f"{r['wall_s_mean']:.0f} s |")
    return "\n".join(lines) + "\n"
