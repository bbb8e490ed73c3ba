"""A trained policy loaded from an RLlib checkpoint, ready to answer act/value queries without Ray.

What the EnvRunner did around the network during training is reproduced here, read from the
checkpoint's ``env_runner/`` folder:

- ``env_to_module_connector/class_and_ctor_args.pkl``: the raw env observation/action spaces and
  the list of connector pieces. Serving only knows RLlib's default pieces plus ``MeanStdFilter``;
  any other piece (frame stacking, custom preprocessing) is refused rather than silently skipped.
- ``env_to_module_connector/MeanStdFilter/state.pkl``: the filter's running mean/std, applied
  frozen (no stats update), exactly like ``ray.rllib.utils.filter.MeanStdFilter``.
- ``module_to_env_connector/class_and_ctor_args.pkl``: ``NormalizeAndClipActions`` settings
  (``normalize_actions`` is on by default: Box actions are unsquashed from [-1, 1] to the bounds).

These files are read with an unpickler that only resolves RLlib connector classes, gymnasium
spaces and numpy internals, so a tampered checkpoint cannot run arbitrary code through them.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core import (
    COMPONENT_ENV_RUNNER,
    COMPONENT_ENV_TO_MODULE_CONNECTOR,
    COMPONENT_LEARNER,
    COMPONENT_LEARNER_GROUP,
    COMPONENT_MODULE_TO_ENV_CONNECTOR,
    COMPONENT_RL_MODULE,
    DEFAULT_MODULE_ID,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.utils.numpy import SMALL_NUMBER
from ray.rllib.utils.spaces.space_utils import clip_action, unsquash_action

from cluster.checkpoints import read_run_config, resolve_checkpoint, run_dir_of
from rlfleet.errors import UserError

DEFAULT_MAX_ROWS = 1024

# Connector pieces RLlib adds to every single-agent pipeline; they only move data between
# episodes, batches and tensors, so skipping them here changes nothing.
_PASSIVE_ENV_TO_MODULE = {
    "AddObservationsFromEpisodesToBatch",
    "AddTimeDimToBatchAndZeroPad",
    "AddStatesFromEpisodesToBatch",
    "BatchIndividualItems",
    "NumpyToTensor",
}
_PASSIVE_MODULE_TO_ENV = {
    "GetActions",  # reproduced in LoadedPolicy.act
    "TensorToNumpy",
    "UnBatchToIndividualItems",
    "RemoveSingleTsTimeRankFromBatch",
    "ListifyDataForVectorEnv",
}
_JSON_KIND = {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}


class ObservationError(ValueError):
    """Observations sent by a client do not fit the policy's observation space."""


class TooManyObservationsError(ObservationError):
    """More rows than one request may carry."""


class _ConnectorUnpickler(pickle.Unpickler):
    """Unpickler for RLlib's connector files: resolves only the classes those files hold."""

    _NUMPY_CORE = {"dtype", "ndarray", "scalar", "_frombuffer", "_reconstruct"}

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith(("ray.rllib.connectors.", "gymnasium.spaces.", "numpy.random."))
            or (module in ("numpy", "numpy._core.multiarray", "numpy._core.numeric",
                           "numpy.core.multiarray", "numpy.core.numeric") and name in self._NUMPY_CORE)
            or (module, name) == ("torch", "device")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_connector_pickle(path: Path) -> Any:
    if not path.is_file():
        if path.with_suffix(".msgpack").is_file():
            raise UserError(f"{path.with_suffix('.msgpack')}: msgpack checkpoints are not supported for serving")
        raise UserError(f"corrupt checkpoint: {path} is missing")
    try:
        with path.open("rb") as f:
            return _ConnectorUnpickler(f).load()
    except UserError:
        raise
    except Exception as exc:  # any unpickling failure means the file is not what RLlib writes
        raise UserError(f"corrupt or unsupported checkpoint file {path}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _Pipeline:
    observation_space: gym.Space | None
    action_space: gym.Space | None
    pieces: dict[str, dict]  # connector class name -> its constructor kwargs


def _read_pipeline(folder: Path) -> _Pipeline:
    """Spaces and connector pieces of an EnvToModule/ModuleToEnv pipeline, from its ctor args."""
    info = _load_connector_pickle(folder / "class_and_ctor_args.pkl")
    try:
        args, kwargs = info["ctor_args_and_kwargs"]
        obs_space, act_space = (list(args) + [None, None])[:2]
        pieces = {cls.__name__: dict(kw) for cls, _, kw in kwargs.get("connectors", [])}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"corrupt checkpoint: unexpected content in {folder}/class_and_ctor_args.pkl") from exc
    return _Pipeline(obs_space, act_space, pieces)


def _decode_array(b64: str) -> np.ndarray:
    # Same encoding as ray.rllib.utils.serialization._serialize_ndarray, read without pickle.
    return np.load(io.BytesIO(zlib.decompress(base64.b64decode(b64))), allow_pickle=False)


@dataclass(frozen=True)
class ObservationFilter:
    """Frozen MeanStdFilter: (obs - mean) / (std + 1e-6), clipped to +-clip, in the obs dtype."""

    mean: np.ndarray
    std: np.ndarray
    demean: bool
    destd: bool
    clip: float | None
    count: int

    @classmethod
    def from_connector_state(cls, state: Any, source: Path) -> ObservationFilter:
        """Build from RLlib's MeanStdFilter connector state ({agent_id: {...}}; None = single agent)."""
        try:
            if set(state) != {None}:
                raise UserError(f"{source}: multi-agent observation filters are not supported for serving")
            agent = state[None]
            if len(agent["running_stats"]) != 1:
                raise UserError(f"{source}: filters over nested observation spaces are not supported for serving")
            stats = agent["running_stats"][0]
            n = int(stats["num_pushes"])
            mean = _decode_array(stats["mean_array"])
            sum_sq_diff = _decode_array(stats["sum_sq_diff_array"])
            demean, destd, clip = bool(agent["de_mean_to_zero"]), bool(agent["de_std_to_one"]), agent["clip_by_value"]
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"corrupt observation-filter state in {source}: {type(exc).__name__}: {exc}") from exc
        # Mirrors RunningStat.var/std: unbiased variance, cast to float32, zero until 2 samples.
        var = (sum_sq_diff / (n - 1)).astype(np.float32) if n > 1 else np.zeros_like(mean, dtype=np.float32)
        std = np.sqrt(np.maximum(0, var))
        return cls(mean=mean, std=std, demean=demean, destd=destd, clip=clip, count=n)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        # Same operations and dtype handling as ray.rllib.utils.filter.MeanStdFilter(update=False).
        x = obs
        if self.demean:
            x = x - self.mean
        if self.destd:
            x = x / (self.std + SMALL_NUMBER)
        if self.clip:
            x = np.clip(x, -self.clip, self.clip)
        return x.astype(obs.dtype)


def space_to_json(space: gym.Space) -> dict:
    """A JSON description of a Discrete or Box space (what /v1/policies shows)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):

        def finite_or_none(a: np.ndarray) -> list:
            return [float(v) if math.isfinite(v) else None for v in a.astype(np.float64).ravel()]

        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": finite_or_none(space.low),
            "high": finite_or_none(space.high),
        }
    return {"type": type(space).__name__}


class LoadedPolicy:
    """The greedy/stochastic policy and critic of one checkpoint, with the training-time preprocessing."""

    def __init__(
        self,
        module: RLModule,
        observation_space: gym.spaces.Box,
        action_space: gym.Space,
        checkpoint: Path,
        env_id: str | None = None,
        obs_filter: ObservationFilter | None = None,
        normalize_actions: bool = False,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        self.module = module
        self.observation_space = observation_space
        self.action_space = action_space
        self.checkpoint = checkpoint
        self.env_id = env_id
        self.obs_filter = obs_filter
        self.normalize_actions = normalize_actions
        self.max_rows = max_rows
        self.has_value_function = isinstance(module, ValueFunctionAPI)
        self._low = observation_space.low.astype(np.float64)
        self._high = observation_space.high.astype(np.float64)

    @classmethod
    def from_checkpoint(cls, path: str | Path, max_rows: int = DEFAULT_MAX_ROWS) -> LoadedPolicy:
        """Load from a run directory (its latest checkpoint) or an Algorithm checkpoint directory."""
        ckpt = resolve_checkpoint(path)
        run_dir = run_dir_of(ckpt)
        env_id = read_run_config(run_dir).get("env") if run_dir is not None else None

        module_dir = ckpt / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE / DEFAULT_MODULE_ID
        if not module_dir.is_dir():
            raise UserError(
                f"{ckpt} has no RLModule '{DEFAULT_MODULE_ID}' (expected {module_dir}); "
                "serving supports single-agent checkpoints"
            )
        try:
            module = RLModule.from_checkpoint(module_dir)
        except Exception as exc:
            raise UserError(f"cannot load the policy network from {module_dir}: {type(exc).__name__}: {exc}") from exc
        module.eval()
        if module.is_stateful():
            raise UserError(f"{ckpt}: recurrent (stateful) RLModules are not supported for serving")

        runner_dir = ckpt / COMPONENT_ENV_RUNNER
        env_to_module = _read_pipeline(runner_dir / COMPONENT_ENV_TO_MODULE_CONNECTOR)
        module_to_env = _read_pipeline(runner_dir / COMPONENT_MODULE_TO_ENV_CONNECTOR)
        unknown = sorted(set(env_to_module.pieces) - _PASSIVE_ENV_TO_MODULE - {"MeanStdFilter"})
        unknown += sorted(set(module_to_env.pieces) - _PASSIVE_MODULE_TO_ENV - {"NormalizeAndClipActions"})
        if unknown:
            raise UserError(
                f"{ckpt} was trained with connector(s) {', '.join(unknown)}, which serving does not "
                "reproduce (supported: RLlib's defaults and MeanStdFilter)"
            )

        obs_filter = None
        if "MeanStdFilter" in env_to_module.pieces:
            state_file = runner_dir / COMPONENT_ENV_TO_MODULE_CONNECTOR / "MeanStdFilter" / "state.pkl"
            obs_filter = ObservationFilter.from_connector_state(_load_connector_pickle(state_file), state_file)

        # The pipelines hold the raw env spaces; the module's own observation space is the
        # filter's output (e.g. Box(-10, 10)) and must not be used to validate client input.
        obs_space = env_to_module.observation_space
        obs_space = module.observation_space if obs_space is None else obs_space
        act_space = module_to_env.action_space
        act_space = module.action_space if act_space is None else act_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise UserError(f"{ckpt}: observation space {obs_space} is not supported (serving needs a Box)")
        if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
            raise UserError(f"{ckpt}: action space {act_space} is not supported (serving needs Discrete or Box)")
        if obs_space.shape != module.observation_space.shape:
            raise UserError(
                f"{ckpt}: env observations have shape {obs_space.shape} but the network expects "
                f"{module.observation_space.shape}; a preprocessing step is missing"
            )
        if obs_filter is not None and obs_filter.mean.shape != obs_space.shape:
            raise UserError(f"{ckpt}: observation filter shape {obs_filter.mean.shape} != {obs_space.shape}")

        normalize = bool(module_to_env.pieces.get("NormalizeAndClipActions", {}).get("normalize_actions", False))
        return cls(module, obs_space, act_space, ckpt, env_id, obs_filter, normalize, max_rows)

    # ---- input validation -------------------------------------------------------------------

    def _for(self) -> str:
        return f"for {self.env_id}" if self.env_id else "for this policy"

    def validate_observations(self, raw: Any) -> np.ndarray:
        """Check parsed JSON is a non-empty list of observations fitting the space; return them batched."""
        if not isinstance(raw, list):
            raise ObservationError(f"observations must be a list of observations, got {_kind(raw)}")
        if not raw:
            raise ObservationError("observations is empty: send at least one observation")
        if len(raw) > self.max_rows:
            raise TooManyObservationsError(
                f"too many observations: {len(raw)} rows, at most {self.max_rows} per request"
            )
        expected = self.observation_space.shape
        for i, row in enumerate(raw):
            self._check_row(i, row, expected)

        try:
            batch = np.array(raw, dtype=np.float64)
        except OverflowError:  # a JSON integer beyond float64's range
            row = _overflowing_row(raw)
            raise ObservationError(f"observations[{row}] holds an integer too large for a float") from None
        bad = ~np.isfinite(batch)
        if bad.any():
            idx = tuple(np.argwhere(bad)[0])
            raise ObservationError(f"{_where(idx)} is {float(batch[idx])}, expected a finite number")
        bad = (batch < self._low) | (batch > self._high)
        if bad.any():
            idx = tuple(np.argwhere(bad)[0])
            lo, hi = self._low[idx[1:]], self._high[idx[1:]]
            raise ObservationError(
                f"{_where(idx)} = {float(batch[idx])} is outside the observation space bounds "
                f"[{lo:.6g}, {hi:.6g}] {self._for()}"
            )
        with np.errstate(over="ignore"):  # overflow is reported just below
            obs = batch.astype(self.observation_space.dtype)
        bad = ~np.isfinite(obs)
        if bad.any():  # fits float64 but overflows e.g. float32
            idx = tuple(np.argwhere(bad)[0])
            raise ObservationError(f"{_where(idx)} = {float(batch[idx])} does not fit in {obs.dtype}")
        return obs

    def _check_row(self, i: int, row: Any, expected: tuple[int, ...]) -> None:
        if expected and not isinstance(row, list):
            raise ObservationError(
                f"observations[{i}] is {_kind(row)}, expected an observation of shape {expected} {self._for()}"
            )
        cells = np.array(row, dtype=object)  # nested lists -> object array of leaves (ragged -> wrong shape)
        if cells.shape != expected:
            raise ObservationError(f"observations[{i}] has shape {cells.shape}, expected {expected} {self._for()}")
        if not set(map(type, cells.flat)) <= {int, float}:  # bool is not int here: type() is exact
            for idx, value in np.ndenumerate(cells):
                if type(value) not in (int, float):
                    raise ObservationError(f"{_where((i, *idx))} is {_kind(value)}, expected a number")

    # ---- inference ------------------------------------------------------------------------

    def _module_input(self, obs: np.ndarray) -> dict:
        if self.obs_filter is not None:
            obs = self.obs_filter(obs)
        return {Columns.OBS: torch.as_tensor(obs, dtype=torch.float32)}

    def act(self, obs: np.ndarray, deterministic: bool) -> list:
        """Actions for a batch of (validated) observations: ints for Discrete, float lists for Box."""
        batch = self._module_input(obs)
        with torch.no_grad():
            # As RLlib's GetActions connector: inference dist made deterministic (argmax / mean),
            # or a sample from the exploration dist.
            if deterministic:
                out = self.module.forward_inference(batch)
                dist = self.module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
                dist = dist.to_deterministic()
            else:
                out = self.module.forward_exploration(batch)
                dist = self.module.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
            actions = dist.sample().cpu().numpy()
        if isinstance(self.action_space, gym.spaces.Discrete):
            return actions.astype(np.int64).tolist()
        # As NormalizeAndClipActions: unsquash [-1, 1] to the bounds when training did; always clip.
        if self.normalize_actions:
            actions = unsquash_action(actions, self.action_space)
        actions = clip_action(actions, self.action_space)
        return np.asarray(actions, dtype=self.action_space.dtype).tolist()

    def value(self, obs: np.ndarray) -> list[float]:
        """The critic's state-value estimates for a batch of (validated) observations."""
        if not self.has_value_function:
            raise UserError(f"{self.checkpoint}: this RLModule has no value function (ValueFunctionAPI)")
        with torch.no_grad():
            values = self.module.compute_values(self._module_input(obs))
        return values.reshape(-1).cpu().numpy().astype(np.float64).tolist()


def _where(idx: tuple) -> str:
    return f"observations[{idx[0]}]" + "".join(f"[{int(j)}]" for j in idx[1:])


def _kind(value: Any) -> str:
    return _JSON_KIND.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _overflowing_row(raw: list) -> int:
    for i, row in enumerate(raw):
        try:
            np.array(row, dtype=np.float64)
        except OverflowError:
            return i
    return 0
