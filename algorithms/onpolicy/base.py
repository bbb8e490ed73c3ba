"""The on-policy engine every PG / trust-region rule shares: RLlib's PPO data flow, our advantage step.

RLlib's `PPO` algorithm already does what on-policy rules need (synchronous sampling on EnvRunner actors,
a learner update on the fresh episodes, weights back to the runners). A rule changes two things at most:

- the loss (`compute_loss_for_module` in its learner), or its whole update (`_uncompiled_update`);
- its options (an `OnPolicyConfig` subclass with its own defaults and `training()` keywords).

This module swaps RLlib's built-in GAE piece for the selectable advantage estimators of
`ADVANTAGE_ESTIMATORS` (GAE, P158, with a switch for raw advantages).
"""

from __future__ import annotations

from typing import Any, Callable

import copy

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
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import (
    ALL_MODULES,
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

from algorithms.onpolicy.gae import GAEConnector

# name -> factory(config) building the learner connector piece that writes ADVANTAGES and VALUE_TARGETS.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Any], ConnectorV2]] = {
    "gae": lambda config: GAEConnector(
        gamma=config.gamma, lambda_=config.lambda_, standardize_advantages=config.standardize_advantages
    ),
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
        self.numpy_to_tensor = pipeline.connectors[-1]

    def __call__(self, *, episodes, shared_data=None, **kwargs):
        observations = batch_fn([episode.get_observations(-1) for episode in episodes],
                                individual_items_already_have_batch_dim="auto")
        if shared_data is not None:  # what BatchIndividualItems leaves for UnBatchToIndividualItems
            shared_data["memorized_map_structure"] = [episode.id_ for episode in episodes]
        return convert_to_torch_tensor(
            {Columns.OBS: observations},
            pin_memory=self.numpy_to_tensor._pin_memory,
            device=self.numpy_to_tensor._device,
        )


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

    def __call__(self, *, rl_module, batch, episodes, explore=None, **kwargs):
        if Columns.ACTIONS not in batch and Columns.ACTION_DIST_INPUTS in batch:
            if explore:
                dist = rl_module.get_exploration_action_dist_cls().from_logits(batch[Columns.ACTION_DIST_INPUTS])
            else:
                dist = rl_module.get_inference_action_dist_cls().from_logits(batch[Columns.ACTION_DIST_INPUTS])
                dist = dist.to_deterministic()
            actions = dist.sample()
            batch[Columns.ACTIONS] = actions
            if Columns.ACTION_LOGP not in batch:
                batch[Columns.ACTION_LOGP] = dist.logp(actions)
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
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            elif np.issubdtype(array.dtype, int):
                array = array.astype(np.int32)
            arrays[column] = array
        return arrays

    def _for_env(self, actions: np.ndarray) -> np.ndarray:
        space = self.action_space_struct
        if self.normalize_actions:
            if self.box_float_bounded:
                return np.clip(space.low + (actions + 1.0) * (space.high - space.low) / 2.0, space.low, space.high)
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
    def _sample(self, *, random_actions: bool = False, **kwargs):
        lean = self._lean_pipelines(random_actions)
        if lean is None:
            return super()._sample(random_actions=random_actions, **kwargs)
        module = self.module
        saved = self._env_to_module, self._module_to_env
        was_training = module.training
        # TorchRLModule.forward_exploration/inference = switch to eval mode + _forward_...(); in eval mode for the
        # whole rollout, the switch is a no-op that still walks every submodule: call the inner method directly.
        shortcut = type(module).forward_exploration is TorchRLModule.forward_exploration
        self._env_to_module, self._module_to_env = lean
        module.eval()
        if shortcut:
            module.__dict__["forward_exploration"] = module._forward_exploration
        try:
            return super()._sample(random_actions=random_actions, **kwargs)
        finally:
            self._env_to_module, self._module_to_env = saved
            module.__dict__.pop("forward_exploration", None)
            if was_training:
                module.train()


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
        fwd_out = self.module.forward_train(batch)
        loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=batch)
        gradients = self.compute_gradients(loss_per_module)
        if not self._lean_apply_gradients(gradients):
            self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, loss_per_module, {}

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
