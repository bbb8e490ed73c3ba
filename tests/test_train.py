"""The training loop's bookkeeping: relative run directories, periodic checkpoints, retention."""

import pytest

from cluster.checkpoints import list_checkpoints, resolve_checkpoint
from cluster.train import KEEP_CHECKPOINTS, read_history, train


def test_relative_runs_dir_and_periodic_checkpoints(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train("ppo", "CartPole-v1", stop_steps=7 * 256, runs_dir="runs", progress=False, checkpoint_every=1,
                   overrides={"train_batch_size": "256", "minibatch_size": "128", "num_epochs": "1"})
    assert result.run_dir.is_absolute() and result.run_dir.parent == tmp_path / "runs"
    assert len(read_history(result.run_dir)) == 7
    kept = list_checkpoints(result.run_dir)
    assert [p.name for p in kept] == [f"iter_{i:06d}" for i in range(8 - KEEP_CHECKPOINTS, 8)]
    assert resolve_checkpoint(result.run_dir) == kept[-1] == result.checkpoint


def test_smoothed_return_weights_iterations_by_episode_count():
    from cluster.train import smoothed_return

    history = [
        {"episode_return_mean": None, "episodes": 0},
        {"episode_return_mean": 20.0, "episodes": 90},   # 90 episodes of mean 20
        {"episode_return_mean": 200.0, "episodes": 100},  # 10 episodes of mean 200
        {"episode_return_mean": 500.0, "episodes": 102},  # 2 lucky episodes of 500
    ]
    # Last 100 episodes: 2 x 500 + 10 x 200 + 88 x 20 -> (1000 + 2000 + 1760) / 100 = 47.6
    assert smoothed_return(history) == pytest.approx(47.6)
    assert smoothed_return(history, window=12) == pytest.approx((1000 + 2000) / 12)
    assert smoothed_return(history[:1]) is None
