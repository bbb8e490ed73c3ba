"""LoadedPolicy (checkpoint loading, validation, act/value, observation filter) and evaluate()."""

from __future__ import annotations

import base64
import io
import pickle
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from cluster.evaluate import evaluate
from rlfleet.errors import UserError
from services.policy import LoadedPolicy, ObservationError, TooManyObservationsError

FILTER_STATE = Path("env_runner/env_to_module_connector/MeanStdFilter/state.pkl")


@pytest.fixture(scope="module")
def cartpole(ppo_cartpole_checkpoint: Path) -> LoadedPolicy:
    return LoadedPolicy.from_checkpoint(ppo_cartpole_checkpoint)


@pytest.fixture(scope="module")
def filtered_run(make_ppo_checkpoint) -> Path:
    return make_ppo_checkpoint("CartPole-v1", mean_std_filter=True)


@pytest.fixture(scope="module")
def pendulum(make_ppo_checkpoint) -> LoadedPolicy:
    return LoadedPolicy.from_checkpoint(make_ppo_checkpoint("Pendulum-v1"))


def _obs(policy: LoadedPolicy, n: int, seed: int = 0) -> np.ndarray:
    """n random observations inside the space (infinite bounds replaced by +-3)."""
    rng = np.random.default_rng(seed)
    low = np.maximum(policy.observation_space.low, -3.0)
    high = np.minimum(policy.observation_space.high, 3.0)
    return rng.uniform(low, high, size=(n, *low.shape)).astype(np.float32)


# ---- loading --------------------------------------------------------------------------------


def test_loads_from_run_dir_and_checkpoint_dir(ppo_cartpole_checkpoint: Path, cartpole: LoadedPolicy) -> None:
    assert cartpole.env_id == "CartPole-v1"
    assert cartpole.checkpoint == (ppo_cartpole_checkpoint / "checkpoints" / "iter_000001").resolve()
    assert cartpole.observation_space.shape == (4,)
    assert cartpole.action_space.n == 2
    assert cartpole.obs_filter is None
    direct = LoadedPolicy.from_checkpoint(cartpole.checkpoint)
    assert direct.checkpoint == cartpole.checkpoint and direct.env_id == "CartPole-v1"


def test_checkpoint_outside_run_dir_has_no_env_id(cartpole: LoadedPolicy, tmp_path: Path) -> None:
    copy = shutil.copytree(cartpole.checkpoint, tmp_path / "ckpt")
    assert LoadedPolicy.from_checkpoint(copy).env_id is None


def test_missing_checkpoint_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        LoadedPolicy.from_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        LoadedPolicy.from_checkpoint(tmp_path)


def test_corrupt_checkpoint_is_user_error(cartpole: LoadedPolicy, tmp_path: Path) -> None:
    broken = shutil.copytree(cartpole.checkpoint, tmp_path / "no_module")
    shutil.rmtree(broken / "learner_group/learner/rl_module/default_policy")
    with pytest.raises(UserError, match="default_policy"):
        LoadedPolicy.from_checkpoint(broken)

    garbled = shutil.copytree(cartpole.checkpoint, tmp_path / "garbled")
    (garbled / "learner_group/learner/rl_module/default_policy/module_state.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot load the policy network"):
        LoadedPolicy.from_checkpoint(garbled)

    no_runner = shutil.copytree(cartpole.checkpoint, tmp_path / "no_runner")
    shutil.rmtree(no_runner / "env_runner")
    with pytest.raises(UserError, match="is missing"):
        LoadedPolicy.from_checkpoint(no_runner)


def test_connector_files_cannot_run_code(cartpole: LoadedPolicy, tmp_path: Path) -> None:
    evil = shutil.copytree(cartpole.checkpoint, tmp_path / "evil")
    target = evil / "env_runner/env_to_module_connector/class_and_ctor_args.pkl"
    target.write_bytes(pickle.dumps(print))  # any callable outside RLlib connectors / spaces / numpy
    # (Ray may have swapped builtins.print for its own safe_print by now: either is refused.)
    with pytest.raises(UserError, match="refusing to load (builtins.print|ray.experimental.tqdm_ray.safe_print)"):
        LoadedPolicy.from_checkpoint(evil)


# ---- validation -----------------------------------------------------------------------------


def test_validate_returns_float32_batch(cartpole: LoadedPolicy) -> None:
    obs = cartpole.validate_observations([[0, 0.5, 0.1, -1], [1.0, 2, -0.2, 3]])
    assert obs.dtype == np.float32 and obs.shape == (2, 4)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"a": 1}, "observations must be a list of observations, got an object"),
        ("obs", "observations must be a list of observations, got a string"),
        ([], "observations is empty"),
        ([[0, 0, 0, 0], [0, 0, 0, 0, 0]], "observations[1] has shape (5,), expected (4,) for CartPole-v1"),
        ([[[0, 0], [0, 0]]], "observations[0] has shape (2, 2), expected (4,) for CartPole-v1"),
        ([0.1, 0.2, 0.3, 0.4], "observations[0] is a number, expected an observation of shape (4,)"),
        ([[0, 0, 0, "1"]], "observations[0][3] is a string, expected a number"),
        ([[0, True, 0, 0]], "observations[0][1] is a boolean, expected a number"),
        ([[0, 0, None, 0]], "observations[0][2] is null, expected a number"),
        ([[0, 0, [1], 0]], "observations[0][2] is a list, expected a number"),
        ([[0, 0, 0, float("nan")]], "observations[0][3] is nan, expected a finite number"),
        ([[0, float("-inf"), 0, 0]], "observations[0][1] is -inf, expected a finite number"),
        (
            [[0, 0, 0, 0], [5.0, 0, 0, 0]],
            "observations[1][0] = 5.0 is outside the observation space bounds [-4.8, 4.8] for CartPole-v1",
        ),
        ([[0, 1e39, 0, 0]], "observations[0][1] = 1e+39 does not fit in float32"),
        ([[0, 10**400, 0, 0]], "observations[0] holds an integer too large"),
    ],
)
def test_validate_rejects(cartpole: LoadedPolicy, raw: object, message: str) -> None:
    with pytest.raises(ObservationError) as info:
        cartpole.validate_observations(raw)
    assert message in str(info.value)


def test_validate_row_limit(cartpole: LoadedPolicy) -> None:
    assert cartpole.max_rows == 1024
    assert cartpole.validate_observations([[0, 0, 0, 0]] * 1024).shape == (1024, 4)
    with pytest.raises(TooManyObservationsError, match="1025 rows, at most 1024"):
        cartpole.validate_observations([[0, 0, 0, 0]] * 1025)


# ---- act / value ------------------------------------------------------------------------------


def test_discrete_act_and_value_types(cartpole: LoadedPolicy) -> None:
    obs = _obs(cartpole, 7)
    for deterministic in (True, False):
        actions = cartpole.act(obs, deterministic=deterministic)
        assert len(actions) == 7 and all(type(a) is int and a in (0, 1) for a in actions)
    values = cartpole.value(obs)
    assert len(values) == 7 and all(type(v) is float for v in values)


def test_deterministic_act_is_argmax_and_repeatable(cartpole: LoadedPolicy) -> None:
    obs = _obs(cartpole, 64, seed=1)
    first = cartpole.act(obs, deterministic=True)
    assert all(cartpole.act(obs, deterministic=True) == first for _ in range(5))
    with torch.no_grad():
        logits = cartpole.module.forward_inference({Columns.OBS: torch.as_tensor(obs)})[Columns.ACTION_DIST_INPUTS]
    assert first == logits.argmax(dim=-1).tolist()


def test_value_matches_critic(cartpole: LoadedPolicy) -> None:
    obs = _obs(cartpole, 5)
    with torch.no_grad():
        expected = cartpole.module.compute_values({Columns.OBS: torch.as_tensor(obs)}).numpy()
    np.testing.assert_allclose(cartpole.value(obs), expected, rtol=1e-6)


def test_box_actions_are_unsquashed_means(pendulum: LoadedPolicy) -> None:
    assert pendulum.normalize_actions  # RLlib's default: the net acts in [-1, 1], the env gets [low, high]
    obs = _obs(pendulum, 6)
    actions = pendulum.act(obs, deterministic=True)
    assert len(actions) == 6 and all(len(a) == 1 and type(a[0]) is float for a in actions)
    with torch.no_grad():
        inputs = pendulum.module.forward_inference({Columns.OBS: torch.as_tensor(obs)})[Columns.ACTION_DIST_INPUTS]
    mean = inputs[:, :1].numpy()  # DiagGaussian inputs: [mean, log_std]
    np.testing.assert_allclose(actions, np.clip(-2.0 + (mean + 1.0) * 2.0, -2.0, 2.0), rtol=1e-5)
    sampled = np.array(pendulum.act(obs, deterministic=False))
    assert sampled.shape == (6, 1) and np.all(np.abs(sampled) <= 2.0)
    assert len(pendulum.value(obs)) == 6


# ---- observation filter -----------------------------------------------------------------------


def _stored_mean_std(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std straight from RLlib's filter state file (the test trusts its own checkpoint)."""
    state = pickle.loads((checkpoint / FILTER_STATE).read_bytes())
    stats = state[None]["running_stats"][0]

    def arr(key: str) -> np.ndarray:
        return np.load(io.BytesIO(zlib.decompress(base64.b64decode(stats[key]))))

    n = stats["num_pushes"]
    return arr("mean_array"), np.sqrt(arr("sum_sq_diff_array") / (n - 1))


def test_obs_filter_is_applied(filtered_run: Path) -> None:
    policy = LoadedPolicy.from_checkpoint(filtered_run)
    assert policy.obs_filter is not None and policy.obs_filter.count >= 500
    # Client-facing space is the raw env space, not the filter's Box(-10, 10).
    assert policy.observation_space.high[0] == pytest.approx(4.8)

    mean, std = _stored_mean_std(policy.checkpoint)
    raw = _obs(policy, 20)
    raw[0] = mean + 50 * std  # far out: must be clipped to +10
    manual = np.clip((raw - mean) / (std + 1e-6), -10, 10).astype(np.float32)
    assert np.all(manual[0] == 10.0)
    np.testing.assert_allclose(policy.obs_filter(raw), manual, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        module_in = {Columns.OBS: torch.as_tensor(manual)}
        expected_values = policy.module.compute_values(module_in).numpy()
        logits = policy.module.forward_inference(module_in)[Columns.ACTION_DIST_INPUTS]
    np.testing.assert_allclose(policy.value(raw), expected_values, rtol=1e-4, atol=1e-5)
    assert policy.act(raw, deterministic=True) == logits.argmax(dim=-1).tolist()


def test_obs_filter_matches_rllib_connector(filtered_run: Path) -> None:
    from ray.rllib.connectors.env_to_module import MeanStdFilter

    policy = LoadedPolicy.from_checkpoint(filtered_run)
    connector = MeanStdFilter()
    # Set after construction: passing input_observation_space to MeanStdFilter() crashes in 2.60.
    connector.input_observation_space = policy.observation_space
    connector.set_state(pickle.loads((policy.checkpoint / FILTER_STATE).read_bytes()))
    raw = _obs(policy, 50, seed=3)
    expected = connector._filters[None](raw, update=False)
    assert np.array_equal(policy.obs_filter(raw), expected)


def test_old_stack_observation_filter_setting_writes_no_filter(make_ppo_checkpoint) -> None:
    # `.env_runners(observation_filter=...)` is old-API-stack only: the new stack ignores it and
    # writes no filter state. Serving must then apply none (the net was trained on raw observations).
    run = make_ppo_checkpoint("CartPole-v1", observation_filter="MeanStdFilter")
    policy = LoadedPolicy.from_checkpoint(run)
    assert policy.obs_filter is None
    assert not (policy.checkpoint / FILTER_STATE).exists()


# ---- evaluate -----------------------------------------------------------------------------------


def test_evaluate_returns_summary(ppo_cartpole_checkpoint: Path) -> None:
    result = evaluate(ppo_cartpole_checkpoint, episodes=3, seed=0)
    assert set(result) == {"mean", "std", "episodes", "returns", "env_id"}
    assert result["episodes"] == 3 and len(result["returns"]) == 3 and result["env_id"] == "CartPole-v1"
    assert result["mean"] == pytest.approx(np.mean(result["returns"]))
    assert result["std"] == pytest.approx(np.std(result["returns"]))
    assert all(r >= 1 for r in result["returns"])
    assert evaluate(ppo_cartpole_checkpoint, episodes=3, seed=0) == result  # greedy + seeded resets


def test_evaluate_box_actions(pendulum: LoadedPolicy) -> None:
    result = evaluate(pendulum.checkpoint, episodes=1)
    assert result["env_id"] == "Pendulum-v1" and result["returns"][0] < 0


@pytest.mark.parametrize("episodes", [0, -1, 1.5, True])
def test_evaluate_rejects_bad_episodes(ppo_cartpole_checkpoint: Path, episodes: object) -> None:
    with pytest.raises(UserError, match="episodes must be an integer >= 1"):
        evaluate(ppo_cartpole_checkpoint, episodes=episodes)


def test_evaluate_needs_env_id(cartpole: LoadedPolicy, tmp_path: Path) -> None:
    copy = shutil.copytree(cartpole.checkpoint, tmp_path / "ckpt")
    with pytest.raises(UserError, match="config.json"):
        evaluate(copy, episodes=1)


def test_evaluate_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        evaluate(tmp_path / "missing")
