"""Where checkpoints live in a run directory, and how a user's path is resolved to one.

A run directory looks like::

    runs/ppo-CartPole-v1-20261121-101500/
        config.json            resolved rule options + env + seed
        metrics.jsonl          one JSON line per training iteration
        curve.png              mean return against env steps
        checkpoints/iter_000010/   RLlib Algorithm checkpoints (save_to_path)
        checkpoints/final/
"""

from __future__ import annotations

import json
from pathlib import Path

from rlfleet.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"


def is_algorithm_checkpoint(path: Path) -> bool:
    """An RLlib Algorithm checkpoint directory holds learner_group/ and a metadata file."""
    return path.is_dir() and (path / "learner_group").is_dir()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (names are iter_NNNNNN, zero-padded, so name order is age order)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_algorithm_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (-> its latest checkpoint) or a checkpoint directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint not found: {p} does not exist (give a run directory or a checkpoint directory)")
    if is_algorithm_checkpoint(p):
        return p.resolve()
    checkpoints = list_checkpoints(p)
    if checkpoints:
        return checkpoints[-1].resolve()
    raise UserError(
        f"no checkpoint in {p}: expected a run directory with {CHECKPOINTS_DIR}/<name>/learner_group "
        "or an RLlib algorithm checkpoint directory"
    )


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to, if it sits inside one."""
    candidate = checkpoint.parent.parent
    return candidate if (candidate / RUN_CONFIG_FILE).is_file() else None


def read_run_config(run_dir: Path) -> dict:
    """The resolved config a run was started with (rule name, env id, options, seed)."""
    cfg_path = run_dir / RUN_CONFIG_FILE
    try:
        return json.loads(cfg_path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{run_dir} is not a run directory: {RUN_CONFIG_FILE} is missing") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path} is not valid JSON: {exc}") from exc
