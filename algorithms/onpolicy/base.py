"""The on-policy engine every PG / trust-region rule shares: RLlib's PPO data flow, our advantage step.

RLlib's `PPO` algorithm already does what on-policy rules need (synchronous sampling on EnvRunner actors,
a learner update on the fresh episodes, weights back to the runners). A rule changes two things at most:

- the loss (`compute_loss_for_module` in its learner), or its whole update (`_uncompiled_update`);
- its options (an `OnPolicyConfig` subclass with its own defaults and `training()` keywords).

This module swaps RLlib's built-in GAE piece for the selectable advantage estimators of
`ADVANTAGE_ESTIMATORS` (GAE, P158, with a switch for raw advantages; RLOO, P229).

It also removes RLlib's per-step and per-minibatch overhead without touching the math (docs/bench-ppo-throughput.md):
`OnPolicyEnvRunner` runs RLlib's default connector pipelines as two fused calls (episodes bit-identical to
RLlib's), `OnPolicyLearner.update` runs the minibatch epochs as a lean loop over one tensor batch, the gradient
step checks finiteness once instead of per tensor, Adam is torch's fused kernel, and the local learner's process
uses one torch thread. Each has a config switch back to RLlib's own code (`lean_sampling`,
`lean_learner_update`, `fused_adam`, `learner_torch_threads`); `rlfleet.bench.check_lean_paths` compares them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.common import (
    AddObservationsFromEpisodesToBatch,
    AddStatesFromEpisodesToBatch,
    AddTimeDimToBatchAndZeroPad,
    BatchIndividualItems,
    NumpyToTensor,
    TensorToNumpy,
)
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.module_to_env import (
    GetActions,
    ListifyDataForVectorEnv,
    NormalizeAndClipActions,
    RemoveSingleTsTimeRankFromBatch,
    UnBatchToIndividualItems,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.env.env_errors import StepFailedRecreateEnvError
from ray.rllib.env.env_runner import ENV_STEP_FAILURE, NUM_ENV_STEP_FAILURES_LIFETIME
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_STEP_TIMER,
    RLMODULE_INFERENCE_TIMER,
    MODULE_TRAIN_BATCH_SIZE_MEAN,
    NUM_ENV_STEPS_TRAINED,
    NUM_ENV_STEPS_TRAINED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.metrics.ray_metrics import TimerAndPrometheusLogger
from ray.rllib.utils.minibatch_utils import MiniBatchCyclicIterator
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.spaces.space_utils import batch as batch_fn
from ray.rllib.utils.spaces.space_utils import clip_action, unbatch, unsquash_action
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

from algorithms.common.rloo_connector import RLOOConnector
from algorithms.onpolicy.gae import GAEConnector

_rllib_logger = logging.getLogger("ray.rllib")

# name -> factory(config) building the learner connector piece that writes ADVANTAGES and VALUE_TARGETS.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Any], ConnectorV2]] = {
    "gae": lambda config: GAEConnector(
        gamma=config.gamma, lambda_=config.lambda_, standardize_advantages=config.standardize_advantages
    ),
    # P229's leave-one-out advantages (episodes grouped by their reset context; gamma and lambda_ unused).
    "rloo": lambda config: RLOOConnector(standardize_advantages=config.standardize_advantages),
}


class OnPolicyConfig(PPOConfig):
    """PPOConfig plus the options every on-policy rule shares."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OnPolicyAlgorithm)
        self.advantage_estimator = "gae"
        # False = the paper's raw advantages (P158); True = per-batch standardisation (most PPO code).
        self.standardize_advantages = True
        # None = plain squared value error; a float = clip the value change around the old prediction.
        self.value_clip = None
        # RLlib's PPO defaults to the KL penalty on; the clipped rule (P147 eq. 7) does not use it.
        self.use_kl_loss = False
        # One EnvRunner actor: experience comes through the real Ray path; the learner runs in the driver.
        self.num_env_runners = 1
        # Separate 64-64 tanh MLPs for policy and value: the PPO/TRPO papers' networks.
        self._model_config = {"fcnet_hiddens": [64, 64], "fcnet_activation": "tanh", "vf_share_layers": False}
        # Engineering knobs (no effect on the math):
        # torch intra-op threads of the process holding a local learner (num_learners=0, i.e. the driver).
        # 64-wide MLPs on 64-row minibatches gain nothing from a thread pool, and OpenMP's spinning threads
        # collapse when the machine is busy (measured: a 2-thread update 3-30x slower under load). None keeps
        # torch's default. Remote learners/EnvRunners already get 1 thread from Ray (OMP_NUM_THREADS).
        self.learner_torch_threads = 1
        # The learner's lean minibatch loop (see OnPolicyLearner.update); False = RLlib's own loop.
        self.lean_learner_update = True
        # EnvRunners run RLlib's default connector pipelines through fused equivalents (see OnPolicyEnvRunner);
        # False = RLlib's SingleAgentEnvRunner as is.
        self.lean_sampling = True
        # torch's fused Adam kernel (the same update rule, one kernel for all tensors instead of a Python loop
        # over them; 4x faster for these small nets on CPU). False = torch.optim.Adam's default implementation.
        self.fused_adam = True

    @override(PPOConfig)
    def training(
        self,
        *,
        advantage_estimator: str = NotProvided,
        standardize_advantages: bool = NotProvided,
        value_clip: float | None = NotProvided,
        learner_torch_threads: int | None = NotProvided,
        lean_learner_update: bool = NotProvided,
        fused_adam: bool = NotProvided,
        lean_sampling: bool = NotProvided,
        **kwargs,
    ) -> "OnPolicyConfig":
        super().training(**kwargs)
        if learner_torch_threads is not NotProvided:
            self.learner_torch_threads = learner_torch_threads
        if lean_learner_update is not NotProvided:
            self.lean_learner_update = lean_learner_update
        if fused_adam is not NotProvided:
            self.fused_adam = fused_adam
        if lean_sampling is not NotProvided:
            self.lean_sampling = lean_sampling
        if advantage_estimator is not NotProvided:
            self.advantage_estimator = advantage_estimator
        if standardize_advantages is not NotProvided:
            self.standardize_advantages = standardize_advantages
        if value_clip is not NotProvided:
            self.value_clip = value_clip
        return self

    @override(PPOConfig)
    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            self._value_error(
                f"advantage_estimator={self.advantage_estimator!r} is unknown; "
                f"valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
            )
        if self.value_clip is not None and self.value_clip <= 0:
            self._value_error(f"value_clip must be > 0 or None, got {self.value_clip}")
        if (
            self.lean_sampling
            and self.env_runner_cls is None
            and self.enable_env_runner_and_connector_v2
            and not self.is_multi_agent
            and not self.output
        ):
            self.env_runner_cls = OnPolicyEnvRunner


class _LeanEnvToModule:
    """RLlib's default single-agent env-to-module pipeline, fused: the last observation of each episode,
    batched and made a float32 tensor (AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad and
    AddStatesFromEpisodesToBatch (no-ops without recurrent state), BatchIndividualItems, NumpyToTensor)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        numpy_to_tensor = pipeline.connectors[-1]
        self.device = numpy_to_tensor._device
        self.pin_memory = numpy_to_tensor._pin_memory
        self.on_cpu = self.device is None or torch.device(self.device).type == "cpu"

    def __call__(self, *, episodes, shared_data=None, **kwargs):
        observations = batch_fn([episode.get_observations(-1) for episode in episodes],
                                individual_items_already_have_batch_dim="auto")
        if shared_data is not None:  # what BatchIndividualItems leaves for UnBatchToIndividualItems
            shared_data["memorized_map_structure"] = [episode.id_ for episode in episodes]
        if self.on_cpu and isinstance(observations, np.ndarray) and observations.dtype != object:
            # convert_to_torch_tensor's CPU path for one array.
            tensor = torch.from_numpy(observations)
            if tensor.is_floating_point() and tensor.dtype != torch.float16:
                tensor = tensor.float()
            return {Columns.OBS: tensor}
        return convert_to_torch_tensor({Columns.OBS: observations}, pin_memory=self.pin_memory, device=self.device)


# numpy dtype -> what convert_to_numpy(reduce_type=True) casts it to (False: left as is).
_NUMPY_CAST: dict = {}
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _diag_gaussian_sample_and_logp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchDiagGaussian.from_logits(logits): sample() and logp(sample), op for op (same values, same RNG
    draws) without building the distribution objects: loc, log_std = chunk; scale = exp(log_std);
    torch.distributions.Normal's sample and log_prob, summed over the action dims."""
    loc, log_std = logits.chunk(2, dim=-1)
    loc, scale = torch.broadcast_tensors(loc, log_std.exp())
    with torch.no_grad():
        actions = torch.normal(loc, scale)
    logp = (-((actions - loc) ** 2) / (2 * scale**2) - scale.log() - _LOG_SQRT_2PI).sum(-1)
    return actions, logp


class _LeanModuleToEnv:
    """RLlib's default single-agent module-to-env pipeline, fused: sample actions and their log-probs from the
    module's action distribution (GetActions), numpy them (TensorToNumpy), one item per env
    (UnBatchToIndividualItems, ListifyDataForVectorEnv), actions for the env unsquashed or clipped to the
    action space (NormalizeAndClipActions). RemoveSingleTsTimeRankFromBatch is a no-op without recurrent state.
    Flat tensor outputs and a Box or Discrete action space take a direct numpy route; anything else goes
    through RLlib's own helper functions.
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline
        normalize_and_clip = pipeline.connectors[4]
        self.normalize_actions = normalize_and_clip.normalize_actions
        self.clip_actions = normalize_and_clip.clip_actions
        self.action_space_struct = space = normalize_and_clip._action_space_struct
        # RLlib's unsquash_action / clip_action on a Box, vectorised over the env axis (elementwise, same ops).
        self.box = isinstance(space, gym.spaces.Box)
        self.box_float_bounded = (
            self.box and bool(np.all(space.bounded_below)) and bool(np.all(space.bounded_above))
            and (space.dtype == np.float32 or space.dtype == np.float64)
        )
        self.box_int_bounded = (
            self.box and bool(np.all(space.bounded_below)) and bool(np.all(space.bounded_above))
            and np.issubdtype(space.dtype, np.integer)
        )
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.box_span = (space.high - space.low) if self.box_float_bounded else None

    def __call__(self, *, rl_module, batch, episodes, explore=None, **kwargs):
        if Columns.ACTIONS not in batch and Columns.ACTION_DIST_INPUTS in batch:
            if explore:
                dist_cls = rl_module.get_exploration_action_dist_cls()
                if dist_cls is TorchDiagGaussian:
                    actions, logp = _diag_gaussian_sample_and_logp(batch[Columns.ACTION_DIST_INPUTS])
                    batch[Columns.ACTIONS] = actions
                    if Columns.ACTION_LOGP not in batch:
                        batch[Columns.ACTION_LOGP] = logp
                    return self._to_env(batch)
                dist = dist_cls.from_logits(batch[Columns.ACTION_DIST_INPUTS])
            else:
                dist = rl_module.get_inference_action_dist_cls().from_logits(batch[Columns.ACTION_DIST_INPUTS])
                dist = dist.to_deterministic()
            actions = dist.sample()
            batch[Columns.ACTIONS] = actions
            if Columns.ACTION_LOGP not in batch:
                batch[Columns.ACTION_LOGP] = dist.logp(actions)
        return self._to_env(batch)

    def _to_env(self, batch):
        arrays = self._flat_numpy(batch)
        if arrays is None or not (self.box or self.discrete):
            return self._generic(batch)
        out = {column: list(array) for column, array in arrays.items()}
        actions = arrays[Columns.ACTIONS]
        out[Columns.ACTIONS] = actions
        if self.normalize_actions or self.clip_actions:
            out[Columns.ACTIONS_FOR_ENV] = self._for_env(actions)
        return out

    @staticmethod
    def _flat_numpy(batch):
        """`convert_to_numpy(batch)` (float -> float32, int -> int32) for a flat dict of batched tensors."""
        arrays = {}
        for column, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                return None
            array = value.detach().cpu().numpy()
            cast = _NUMPY_CAST.get(array.dtype)
            if cast is None:
                cast = _NUMPY_CAST.setdefault(
                    array.dtype,
                    np.float32 if np.issubdtype(array.dtype, np.floating)
                    else np.int32 if np.issubdtype(array.dtype, int) else False,
                )
            arrays[column] = array.astype(cast) if cast is not False else array
        return arrays

    def _for_env(self, actions: np.ndarray) -> np.ndarray:
        space = self.action_space_struct
        if self.normalize_actions:
            if self.box_float_bounded:  # np.clip(low + (a + 1) * (high - low) / 2, low, high)
                unsquashed = space.low + (actions + 1.0) * self.box_span / 2.0
                return np.minimum(np.maximum(unsquashed, space.low, out=unsquashed), space.high, out=unsquashed)
            if self.box_int_bounded:
                return space.low + actions
            return actions.copy()
        if self.box:
            return np.clip(actions, space.low, space.high)
        return actions.copy()

    def _generic(self, batch):
        batch = convert_to_numpy(batch)
        out = {column: unbatch(data) for column, data in batch.items()}
        if self.normalize_actions or self.clip_actions:
            fn = unsquash_action if self.normalize_actions else clip_action
            out[Columns.ACTIONS_FOR_ENV] = [
                fn(action, self.action_space_struct) for action in copy.deepcopy(out[Columns.ACTIONS])
            ]
        for column in (Columns.ACTIONS, Columns.ACTIONS_FOR_ENV):
            if column in out:
                out[column] = batch_fn(out[column])
        return out


class OnPolicyEnvRunner(SingleAgentEnvRunner):
    """RLlib's SingleAgentEnvRunner with its default per-step connector pipelines fused into two plain calls.

    RLlib's sampling loop runs 11 connector pieces per env step, each timed into the MetricsLogger, and toggles
    the module between train and eval mode around every forward pass: about 0.4 ms of Python per step, several
    times the cost of a MuJoCo step. When the pipelines are exactly RLlib's defaults (no user connectors, no
    observation filter, no recurrent state, Box observations), `_sample` runs RLlib's own loop with the fused
    equivalents above swapped in, and the module held in eval mode for the whole rollout. The episodes it
    returns are the same (tested bit for bit against RLlib's pipelines). Not logged on this path: the
    per-connector timers and the env-to-module episode-length sums. Anything else: RLlib's path, unchanged.
    """

    _DEFAULT_ENV_TO_MODULE = (
        AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad, AddStatesFromEpisodesToBatch,
        BatchIndividualItems, NumpyToTensor,
    )
    _DEFAULT_MODULE_TO_ENV = (
        GetActions, TensorToNumpy, UnBatchToIndividualItems, RemoveSingleTsTimeRankFromBatch,
        NormalizeAndClipActions, ListifyDataForVectorEnv,
    )

    def _lean_pipelines(self, random_actions: bool):
        if random_actions or not getattr(self.config, "lean_sampling", True) or self.module is None:
            return None
        if not isinstance(self.module, TorchRLModule) or self.module.is_stateful():
            return None
        if not isinstance(self.env.single_observation_space, gym.spaces.Box):
            return None
        env_to_module, module_to_env = self._env_to_module, self._module_to_env
        if tuple(type(c) for c in getattr(env_to_module, "connectors", ())) != self._DEFAULT_ENV_TO_MODULE:
            return None
        if tuple(type(c) for c in getattr(module_to_env, "connectors", ())) != self._DEFAULT_MODULE_TO_ENV:
            return None
        return _LeanEnvToModule(env_to_module), _LeanModuleToEnv(module_to_env)

    @override(SingleAgentEnvRunner)
    def _sample(
        self,
        *,
        num_timesteps: int | None = None,
        num_episodes: int | None = None,
        explore: bool,
        random_actions: bool = False,
        force_reset: bool = False,
    ):
        lean = self._lean_pipelines(random_actions) if num_timesteps is not None else None
        if lean is None:
            return super()._sample(
                num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                random_actions=random_actions, force_reset=force_reset,
            )
        module = self.module
        saved = self._env_to_module, self._module_to_env
        was_training = module.training
        self._env_to_module, self._module_to_env = lean
        module.eval()
        try:
            return self._lean_sample(num_timesteps=num_timesteps, explore=explore, force_reset=force_reset)
        finally:
            self._env_to_module, self._module_to_env = saved
            if was_training:
                module.train()

    def _lean_sample(self, *, num_timesteps: int, explore: bool, force_reset: bool):
        """SingleAgentEnvRunner._sample (timesteps mode) with the fused pipelines and per-rollout bookkeeping.

        Step for step the same as RLlib's loop (same env calls, same episode contents, same callbacks); the
        per-step inference and env-step timers are logged once per rollout as their mean, and the Prometheus
        env-step counter once with the count.
        """
        ts = 0
        done_episodes_to_return = []
        if force_reset or self._needs_initial_reset:
            self._reset_envs_and_episodes(explore)

        module = self.module
        # TorchRLModule.forward_exploration/inference = switch to eval mode + _forward_...(). The module is in
        # eval mode for the whole rollout, so call the inner method (the switch walks every submodule).
        if explore:
            overridden = type(module).forward_exploration is not TorchRLModule.forward_exploration
            forward = module.forward_exploration if overridden else module._forward_exploration
        else:
            overridden = type(module).forward_inference is not TorchRLModule.forward_inference
            forward = module.forward_inference if overridden else module._forward_inference
        env_to_module, module_to_env = self._env_to_module, self._module_to_env
        num_runners = self.config.num_env_runners or 1
        num_envs = self.num_envs
        inference_s = env_step_s = 0.0
        env_steps_tried = 0
        clock = time.perf_counter

        while ts < num_timesteps:
            to_module = self._cached_to_module
            assert to_module is not None
            self._cached_to_module = None
            t0 = clock()
            if explore:
                global_env_steps_lifetime = (self.num_env_steps_sampled_lifetime // num_runners + ts) * num_runners
                to_env = forward(to_module, t=global_env_steps_lifetime)
            else:
                to_env = forward(to_module)
            inference_s += clock() - t0
            to_env = module_to_env(
                rl_module=module, batch=to_env, episodes=self._ongoing_episodes, explore=explore,
                shared_data=self._shared_data,
            )
            actions = to_env.pop(Columns.ACTIONS)
            actions_for_env = to_env.pop(Columns.ACTIONS_FOR_ENV, actions)

            t0 = clock()
            try:
                results = self.env.step(actions_for_env)
            except Exception as error:
                results = self._lean_step_failed(error)
            env_step_s += clock() - t0
            env_steps_tried += 1
            if results is ENV_STEP_FAILURE:
                ts = 0
                self._reset_envs_and_episodes(explore)
                continue

            observations, rewards, terminateds, truncateds, infos = results
            observations, actions = unbatch(observations), unbatch(actions)

            episodes = self._ongoing_episodes
            call_on_episode_start = set()
            for env_index in range(num_envs):
                extra_model_output = {k: v[env_index] for k, v in to_env.items()}
                extra_model_output[WEIGHTS_SEQ_NO] = self._weights_seq_no
                if not episodes[env_index].is_reset:
                    episodes[env_index].add_env_reset(observation=observations[env_index], infos=infos[env_index])
                    call_on_episode_start.add(env_index)
                else:
                    ts += 1
                    episodes[env_index].add_env_step(
                        observation=observations[env_index],
                        action=actions[env_index],
                        reward=rewards[env_index],
                        infos=infos[env_index],
                        terminated=terminateds[env_index],
                        truncated=truncateds[env_index],
                        extra_model_outputs=extra_model_output,
                    )

            self._cached_to_module = env_to_module(episodes=episodes, shared_data=self._shared_data)

            for env_index in range(num_envs):
                if env_index in call_on_episode_start:
                    self._make_on_episode_callback("on_episode_start", env_index, episodes)
                else:
                    self._make_on_episode_callback("on_episode_step", env_index, episodes)
                if episodes[env_index].is_done:
                    self._make_on_episode_callback("on_episode_end", env_index, episodes)
                    if self.episodes_to_numpy:
                        done_episodes_to_return.append(episodes[env_index].to_numpy())
                    else:
                        done_episodes_to_return.append(episodes[env_index])
                    self._new_episode(env_index, episodes)

        if env_steps_tried:
            self.metrics.log_value(RLMODULE_INFERENCE_TIMER, inference_s / env_steps_tried, reduce="ema")
            self.metrics.log_value(ENV_STEP_TIMER, env_step_s / env_steps_tried, reduce="ema")
            self._log_env_steps(metric=self._metrics_num_try_env_step, num_steps=env_steps_tried)

        # From here on as SingleAgentEnvRunner._sample.
        self._done_episodes_for_metrics.extend(done_episodes_to_return)
        ongoing_episodes_to_return = []
        continuations = [
            episode.cut(len_lookback_buffer=self.config.episode_lookback_horizon) for episode in self._ongoing_episodes
        ]
        for episode in self._ongoing_episodes:
            if episode.t == 0:
                continue
            episode.validate()
            self._ongoing_episodes_for_metrics[episode.id_].append(episode)
            ongoing_episodes_to_return.append(episode.to_numpy() if self.episodes_to_numpy else episode)
        self._ongoing_episodes = continuations
        self._log_env_steps(metric=self._metrics_num_env_steps_sampled, num_steps=ts)
        self._increase_sampled_metrics(ts, len(done_episodes_to_return))
        return done_episodes_to_return + ongoing_episodes_to_return

    def _lean_step_failed(self, error: Exception):
        """`EnvRunner._try_env_step`'s handling of an env step that raised: count it, then recreate the env
        and report ENV_STEP_FAILURE (the loop resets and goes on), or raise if restarts are off."""
        self.metrics.log_value(NUM_ENV_STEP_FAILURES_LIFETIME, 1, reduce="lifetime_sum")
        if self.config.restart_failed_sub_environments:
            if not isinstance(error, StepFailedRecreateEnvError):
                _rllib_logger.exception(f"RLlib {type(self).__name__}: Environment step failed. Will force reset "
                                        f"env(s) in this EnvRunner. The original error is: {error}")
            self.make_env()
            return ENV_STEP_FAILURE
        _rllib_logger.exception(f"RLlib {type(self).__name__}: Environment step failed and "
                                "'config.restart_failed_sub_environments' is False. The original error type: "
                                f"{type(error)}. {error}")
        raise RuntimeError from error

class OnPolicyAlgorithm(PPO):
    """RLlib's PPO training step (sample -> learner update -> sync weights), with our config class."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> OnPolicyConfig:
        return OnPolicyConfig()


class OnPolicyLearner(PPOTorchLearner):
    """PPOTorchLearner whose advantage step is the rule's selected estimator instead of RLlib's GAE.

    It also replaces RLlib's per-minibatch machinery (`Learner.update`'s loop) with a lean loop for the common
    case (one module, no recurrent state, one learner, minibatches): see `update`. The losses, the gradient
    clipping and the optimizer step are the same; what goes is bookkeeping that RLlib repeats per minibatch.
    """

    # True while the minibatch being trained is the last one of an update (and always outside the lean loop).
    # Rules log their per-minibatch loss terms only then: those metrics are window=1 snapshots, so RLlib only
    # ever reports the last minibatch's values anyway.
    log_minibatch_metrics: bool = True

    @override(PPOTorchLearner)
    def build(self) -> None:
        threads = getattr(self.config, "learner_torch_threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        super().build()
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.remove("GeneralAdvantageEstimation")
            self._learner_connector.append(ADVANTAGE_ESTIMATORS[self.config.advantage_estimator](self.config))
        self._lean_step_checked = False
        self._lean_step_ok = False

    @override(PPOTorchLearner)
    def configure_optimizers_for_module(self, module_id: str, config=None) -> None:
        """RLlib's default (one Adam over all the module's parameters, lr from config.lr), optionally fused."""
        if not getattr(config, "fused_adam", False):
            return super().configure_optimizers_for_module(module_id, config)
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.Adam(params, fused=True),
            params=params,
            lr_or_lr_schedule=config.lr,
        )

    # ------------------------------------------------------------------------------------------------------
    # The lean update loop.

    def _lean_update_applies(self, minibatch_size, data_iterators, training_data, num_total_minibatches) -> bool:
        if not getattr(self.config, "lean_learner_update", True) or minibatch_size is None:
            return False
        if data_iterators or (training_data is not None and training_data.data_iterators) or num_total_minibatches:
            return False
        if self.config.num_learners > 1:  # DDP: every learner must run the same number of minibatches
            return False
        modules = list(self.module.keys())
        return len(modules) == 1 and not self.module[modules[0]].unwrapped().is_stateful()

    @override(PPOTorchLearner)
    def update(
        self,
        batch=None,
        batches=None,
        batch_refs=None,
        episodes=None,
        episodes_refs=None,
        data_iterators=None,
        training_data: TrainingData | None = None,
        *,
        timesteps: dict[str, Any] | None = None,
        num_total_minibatches: int = 0,
        num_epochs: int = 1,
        minibatch_size: int | None = None,
        shuffle_batch_per_epoch: bool = False,
        _no_metrics_reduce: bool = False,
        **kwargs,
    ):
        """`num_epochs` passes of minibatch updates over the batch, without RLlib's per-minibatch overhead.

        RLlib's `Learner.update` slices a `MultiAgentBatch` into new `SampleBatch`es per minibatch (its cyclic
        iterator), logs about ten metrics per minibatch and checks every gradient tensor for NaNs one by one.
        Here the train batch is one dict of tensors; its real rows (LOSS_MASK True; the phantom bootstrap rows
        only carried V(s_T) for the advantage step) are permuted once per epoch and cut into contiguous
        minibatches of `minibatch_size` rows (the last one may be smaller), as Stable-Baselines3 and the PPO
        paper do. Each minibatch goes through `self._update` (so a rule's `_uncompiled_update` still runs), and
        step counters are logged once per update with the totals RLlib would have summed.

        Differences from RLlib's loop, none in the loss: RLlib's first epoch is in sample order (it shuffles
        only when it wraps around), its minibatches may straddle epochs and contain phantom rows (masked out, so
        a minibatch has fewer than `minibatch_size` real rows), and it shuffles only when num_epochs > 1.

        Falls back to RLlib's loop for anything else (several modules or learners, recurrent modules, data
        iterators, minibatch_size=None as TRPO uses, or `config.lean_learner_update = False`).
        """
        if not self._lean_update_applies(minibatch_size, data_iterators, training_data, num_total_minibatches):
            return super().update(
                batch=batch, batches=batches, batch_refs=batch_refs, episodes=episodes,
                episodes_refs=episodes_refs, data_iterators=data_iterators, training_data=training_data,
                timesteps=timesteps, num_total_minibatches=num_total_minibatches, num_epochs=num_epochs,
                minibatch_size=minibatch_size, shuffle_batch_per_epoch=shuffle_batch_per_epoch,
                _no_metrics_reduce=_no_metrics_reduce, **kwargs,
            )
        self._check_is_built()
        self.before_gradient_based_update(timesteps=timesteps or {})
        if training_data is None:
            training_data = TrainingData(
                batch=batch, batches=batches, batch_refs=batch_refs, episodes=episodes, episodes_refs=episodes_refs
            )
        training_data.validate()
        training_data.solve_refs()
        assert training_data.batches is None, "`training_data.batches` must be None!"
        self._weights_seq_no += 1

        train_batch = self._make_batch_if_necessary(training_data=training_data)
        for module_id in list(train_batch.policy_batches.keys()):
            if not self.should_module_be_updated(module_id, train_batch):
                del train_batch.policy_batches[module_id]

        loss_per_module: dict[str, Any] = {}
        for module_id, module_batch in train_batch.policy_batches.items():
            columns = self._lean_columns(module_batch)
            if columns is None:  # something that is not a row-indexed tensor: RLlib's own loop
                loss_per_module = self._rllib_minibatch_loop(
                    train_batch, num_epochs, minibatch_size, shuffle_batch_per_epoch
                )
            else:
                loss_per_module = self._lean_minibatch_loop(
                    module_id, columns, train_batch.env_steps(), num_epochs, minibatch_size, shuffle_batch_per_epoch
                )

        for module_id, loss in loss_per_module.items():
            self.metrics.log_value(key=(module_id, self.TOTAL_LOSS_KEY), value=loss, window=1)
        self.after_gradient_based_update(timesteps=timesteps or {})
        if not _no_metrics_reduce:
            return self.metrics.reduce()

    def _lean_columns(self, module_batch) -> dict[str, torch.Tensor] | None:
        """The batch's columns as row-indexed tensors on the learner's device, phantom rows dropped."""
        num_rows = len(module_batch)
        columns = {}
        for key, value in module_batch.items():
            if isinstance(value, np.ndarray) and value.dtype != object:
                value = torch.as_tensor(value, device=self._device)
            if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != num_rows:
                return None
            columns[key] = value
        mask = columns.pop(Columns.LOSS_MASK, None)
        if mask is not None and not bool(mask.all()):
            rows = mask.nonzero().squeeze(-1)
            columns = {key: value.index_select(0, rows) for key, value in columns.items()}
        return columns

    def _lean_minibatch_loop(self, module_id, columns, env_steps, num_epochs, minibatch_size, shuffle):
        num_rows = next(iter(columns.values())).shape[0] if columns else 0
        loss_per_module: dict[str, Any] = {}
        num_minibatches = rows_trained = 0
        device = next(iter(columns.values())).device if columns else None
        if module_id in self.module:
            self.module[module_id].train()  # the whole tree, once; _lean_forward_train then checks the root flag
        try:
            for epoch in range(num_epochs if num_rows else 0):
                if shuffle:
                    order = torch.randperm(num_rows, device=device)
                    epoch_columns = {key: value.index_select(0, order) for key, value in columns.items()}
                else:
                    epoch_columns = columns
                for start in range(0, num_rows, minibatch_size):
                    minibatch = {key: value[start : start + minibatch_size] for key, value in epoch_columns.items()}
                    self.log_minibatch_metrics = epoch == num_epochs - 1 and start + minibatch_size >= num_rows
                    with TimerAndPrometheusLogger(self._metrics_learner_inner_update):
                        _, loss_per_module, _ = self._update({module_id: minibatch})
                    num_minibatches += 1
                    rows_trained += min(minibatch_size, num_rows - start)
        finally:
            self.log_minibatch_metrics = True
        if num_minibatches:
            self._log_lean_steps_trained(module_id, rows_trained, num_minibatches, env_steps)
        return loss_per_module

    def _log_lean_steps_trained(self, module_id, rows_trained, num_minibatches, env_steps) -> None:
        """What RLlib's per-minibatch `_log_metrics` + `_log_steps_trained_metrics` add up to, logged once.

        RLlib counts the whole batch's env steps once per minibatch (its minibatches carry the parent batch's
        env_steps), so NUM_ENV_STEPS_TRAINED is env_steps * num_minibatches here too.
        """
        env_steps_trained = env_steps * num_minibatches
        if env_steps_trained > 0:
            self._metrics_all_modules_num_env_steps_trained.inc(value=env_steps_trained)
            self._metrics_all_modules_num_module_steps_trained.inc(value=rows_trained)
        log = self.metrics.log_value
        log((module_id, WEIGHTS_SEQ_NO), self._weights_seq_no, window=1)
        log((module_id, MODULE_TRAIN_BATCH_SIZE_MEAN), rows_trained / num_minibatches, reduce="mean")
        log((module_id, NUM_MODULE_STEPS_TRAINED), rows_trained, reduce="sum")
        log((module_id, NUM_MODULE_STEPS_TRAINED_LIFETIME), rows_trained, reduce="lifetime_sum", with_throughput=True)
        log((ALL_MODULES, NUM_MODULE_STEPS_TRAINED), rows_trained, reduce="sum", with_throughput=True)
        log((ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), rows_trained, reduce="lifetime_sum", with_throughput=True)
        log((ALL_MODULES, NUM_ENV_STEPS_TRAINED), env_steps_trained, reduce="sum", with_throughput=True)
        log((ALL_MODULES, NUM_ENV_STEPS_TRAINED_LIFETIME), env_steps_trained, reduce="lifetime_sum",
            with_throughput=True)

    def _rllib_minibatch_loop(self, train_batch, num_epochs, minibatch_size, shuffle):
        """RLlib's own minibatch loop (`Learner.update`'s body), for batches the lean loop cannot slice."""
        train_batch = self._set_slicing_by_batch_id(train_batch, value=True)
        iterator = MiniBatchCyclicIterator(
            train_batch, num_epochs=num_epochs, minibatch_size=minibatch_size,
            shuffle_batch_per_epoch=shuffle and num_epochs > 1,
        )
        loss_per_module: dict[str, Any] = {}
        for minibatch in iterator:
            with TimerAndPrometheusLogger(self._metrics_learner_inner_update):
                _, loss_per_module, _ = self._update(minibatch.policy_batches)
            self._log_metrics(batch=minibatch)
            self._log_steps_trained_metrics(minibatch)
            self._set_slicing_by_batch_id(minibatch, value=False)
        return loss_per_module

    @override(PPOTorchLearner)
    def add_module(self, *args, **kwargs):
        self._lean_step_checked = False  # the optimizer set changes: re-check what the lean step supports
        return super().add_module(*args, **kwargs)

    @override(PPOTorchLearner)
    def remove_module(self, *args, **kwargs):
        self._lean_step_checked = False
        return super().remove_module(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # The lean gradient step.

    def _lean_step_supported(self) -> bool:
        """Whether `_lean_apply_gradients` does exactly what RLlib's postprocess + apply would."""
        if self._grad_scalers is not None or self._lr_scheduler_classes is not None or self.config.num_learners > 1:
            return False
        module_ids = set(self.module.keys())
        for module_id in self._module_optimizers:
            if module_id not in module_ids:  # e.g. an ALL_MODULES optimizer: RLlib would not clip it
                return False
            config = self.config.get_config_for_module(module_id)
            if config.grad_clip is not None and config.grad_clip_by != "global_norm":
                return False
        return True

    @override(PPOTorchLearner)
    def _uncompiled_update(self, batch: dict[str, Any], **kwargs):
        """RLlib's update step (forward, losses, backward, clip, optimizer step), minus per-minibatch logging.

        Off-policyness and gradient norms are logged on the update's last minibatch only (window=1 metrics).
        """
        if not self._lean_step_checked:
            self._lean_step_ok = self._lean_step_supported()
            self._lean_step_checked = True
        if not self._lean_step_ok:
            return super()._uncompiled_update(batch, **kwargs)
        if self.log_minibatch_metrics:
            self._compute_off_policyness(batch)
        fwd_out = self._lean_forward_train(batch)
        loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=batch)
        gradients = self.compute_gradients(loss_per_module)
        if not self._lean_apply_gradients(gradients):
            self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, loss_per_module, {}

    def _lean_forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`self.module.forward_train(batch)` without `TorchRLModule.forward_train`'s `self.train()`, which walks
        every submodule on every minibatch: the module is put in training mode once (checked per call)."""
        fwd_out = {}
        for module_id, module_batch in batch.items():
            if module_id not in self.module:
                continue
            module = self.module[module_id]
            if type(module).forward_train is not TorchRLModule.forward_train or module.inference_only:
                fwd_out[module_id] = module.forward_train(module_batch)  # RLlib's path (and its errors)
                continue
            if not module.training:
                module.train()
            fwd_out[module_id] = module._forward_train(module_batch)
        return fwd_out

    def _lean_apply_gradients(self, gradients: dict) -> bool:
        """Global-norm clipping + optimizer steps with one finiteness check for all gradients.

        Same math as RLlib's `clip_gradients(grad_clip_by="global_norm")` + `TorchLearner.apply_gradients` when
        every gradient is finite (RLlib's norm is also the 2-norm of the per-tensor 2-norms). Returns False,
        having changed nothing, when some gradient is not finite or there are none: then RLlib's own
        postprocess/apply run (they zero or skip non-finite gradients as configured).
        """
        if not gradients:
            return False
        plan = []
        for module_id, optimizer_names in self._module_optimizers.items():
            config = self.config.get_config_for_module(module_id)
            for full_name in optimizer_names:
                optimizer = self._named_optimizers[full_name]
                grads = [gradients[ref] for ref in self._optimizer_parameters[optimizer] if gradients.get(ref) is not None]
                total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0) if grads else None
                plan.append((module_id, full_name, optimizer, config, grads, total))
        totals = [total for *_, total in plan if total is not None]
        if totals and not bool(torch.isfinite(torch.stack(totals)).all()):
            return False
        for module_id, full_name, optimizer, config, grads, total in plan:
            if grads and config.grad_clip:
                coeff = config.grad_clip / torch.clamp(total + 1e-6, min=config.grad_clip)
                torch._foreach_mul_(grads, torch.clamp(coeff, max=1.0))
            if grads and self.log_minibatch_metrics and (config.grad_clip or config.log_gradients):
                name = full_name[len(module_id) + 1 :]
                self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), total, window=1)
            optimizer.step()
        return True
