"""What the control-task preference rules share: config, scripted teacher, the pair channel through the Redis
preference queue, the run session (Ray collector + Redis segment table + queue) and the verify row.

    SegmentCollector (Ray actor) --insert--> SegmentTable (Redis replay table, numpy records)
    learner: picks segment ids --add--> PreferenceQueue (Redis Streams; a pair's responses = "seg-<key>" ids)
        --lease--> SegmentTeacher (scripted: reads the HIDDEN fields by id) --label--> learner: read, claim,
        update, ack

The teacher (P135's two models of a labeller): P(responses[0] preferred) = sigmoid(beta (score_0 - score_1)),
score = the segment's true (partial) return ("return", Bradley-Terry on partial return) or its summed optimal
advantage sum_t A*(s_t, a_t) = -regret ("regret", Knox et al. 2022). Learners see only obs/actions/user.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

from algorithms.common.config_fields import check_positive_ints
from algorithms.options import Option, positive, unit_interval
from algorithms.preference.checks import verify_row
from algorithms.preference.control_collect import CategoricalPolicy, RemoteSegmentCollector, make_env
from algorithms.preference.segments import SegmentTable, parse_segment_id
from algorithms.rule import Rule
from envs.pref_reach import ENV_ID
from services.preferences import LabelledPair, PreferenceQueue
from services.replay.connection import client_url

TEACHERS = ("return", "regret")
EVAL_EPISODES = 200
EVAL_SEED_OFFSET = 10_000


class ControlPreferenceConfig(AlgorithmConfig):
    """Options shared by the control-task preference rules (a rule adds its own in its subclass)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self._is_online = False  # no RLlib EnvRunners: a collector actor writes segments to Redis
        self.env_id = ENV_ID
        self.users: list[dict[str, Any]] = [{}]  # env kwargs per user (VPL: one goal each)
        self.segment_length = 8
        self.teacher = "regret"
        self.teacher_beta = 10.0  # sharpness of the scripted teacher per unit of score
        self.teacher_gamma = 0.99  # discount of the regret teacher's optimal values
        self.lr = 3e-3
        self.hidden = [64, 64]
        self.eval_episodes = EVAL_EPISODES

    def validate(self) -> None:
        # Not AlgorithmConfig.validate: no Algorithm and no EnvRunners here (the rule's own loop drives it).
        if self.teacher not in TEACHERS:
            self._value_error(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        check_positive_ints(self, "segment_length", "eval_episodes")
        for name in ("lr", "teacher_beta"):
            if not getattr(self, name) > 0:
                self._value_error(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.teacher_gamma <= 1:
            self._value_error(f"teacher_gamma must be in [0, 1], got {self.teacher_gamma}")
        if not self.users:
            self._value_error("users must list at least one user's env kwargs")


CONTROL_OPTIONS: tuple[Option, ...] = (
    Option("lr", "Adam step size", positive, "> 0"),
    Option("segment_length", "steps per segment", positive, ">= 1"),
    Option("teacher", "scripted teacher: return (Bradley-Terry on true partial return) or regret (P135)",
           lambda x: x in TEACHERS, " or ".join(TEACHERS)),
    Option("teacher_beta", "sharpness of the scripted teacher", positive, "> 0"),
    Option("teacher_gamma", "discount of the regret teacher's optimal values", unit_interval, "in [0, 1]"),
)
# The offline rules (a fixed dataset of uniform-random segments, labelled once): CPL, regret_pref, VPL.
OFFLINE_OPTIONS: tuple[Option, ...] = (
    Option("dataset_episodes", "uniform-random episodes collected (per user)", positive, ">= 1"),
    Option("pairs", "labelled segment pairs (per user)", positive, ">= 1"),
    Option("updates", "Adam steps on the labelled pairs", positive, ">= 1"),
)


def apply_overrides(rule: Rule, overrides: dict[str, Any] | None) -> Any:
    config = rule.config_class()
    for name, value in (overrides or {}).items():
        if not hasattr(config, name):  # a typo must not become a silently ignored new attribute
            raise ValueError(f"unknown option {name!r} for rule {rule.name}; valid: {', '.join(rule.option_names())}")
        setattr(config, name, value)
    config.validate()
    return config


def bradley_terry_choices(score0: np.ndarray, score1: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """0 where responses[0] is preferred, drawn with P = sigmoid(beta (score0 - score1)); else 1."""
    p0 = 1.0 / (1.0 + np.exp(-beta * (np.asarray(score0, np.float64) - np.asarray(score1, np.float64))))
    return np.where(rng.random(p0.shape) < p0, 0, 1)


class SegmentTeacher:
    """The scripted labeller: reads both segments' hidden fields by id and samples a Bradley-Terry label."""

    def __init__(self, segments: SegmentTable, kind: str, beta: float, seed: int) -> None:
        if kind not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {kind!r}")
        self.segments, self.kind, self.beta = segments, kind, beta
        self.rng = np.random.default_rng(seed)

    def scores(self, ids: Sequence[str]) -> np.ndarray:
        field = "true_return" if self.kind == "return" else "optimal_advantage"
        return self.segments.read(ids, (field,), teacher=True)[field].astype(np.float64)

    def label(self, pairs: Sequence[Any]) -> list[tuple[str, int]]:
        ids = [i for p in pairs for i in p.responses]
        for i in ids:
            parse_segment_id(i)  # a response that is not a segment id is refused before any read
        s = self.scores(ids).reshape(len(pairs), 2)
        choices = bradley_terry_choices(s[:, 0], s[:, 1], self.beta, self.rng)
        return [(p.pair_id, int(c)) for p, c in zip(pairs, choices)]


class PreferenceChannel:
    """Segment-id pairs -> the Redis preference queue -> the teacher -> labelled pairs for the learner."""

    def __init__(self, queue: PreferenceQueue, teacher: SegmentTeacher, prompt: str) -> None:
        self.queue, self.teacher, self.prompt = queue, teacher, prompt
        self.judge = queue.judge("scripted-teacher")
        self.consumer = queue.learner("learner-driver")
        self.asked = 0

    def ask(self, id_pairs: Sequence[tuple[str, str]], version: int, user: int = 0) -> list[LabelledPair]:
        """Add the pairs, have them labelled, and return them claimed by the learner (ack after the update)."""
        pairs = []
        for a, b in id_pairs:
            pairs.append({"id": f"p{self.asked}", "prompt": self.prompt, "responses": [a, b],
                          "policy_version": version, "meta": {"user": int(user)}})
            self.asked += 1
        self.queue.add(pairs, timeout=60)
        labelled = 0
        while labelled < len(pairs):
            leased = self.judge.next(len(pairs) - labelled, block_s=5.0)
            if not leased:
                raise RuntimeError(f"the teacher found only {labelled} of {len(pairs)} pairs to label")
            self.judge.label_many(self.teacher.label(leased))
            labelled += len(leased)
        batch: list[LabelledPair] = []
        while len(batch) < len(pairs):
            got = self.consumer.next_batch(len(pairs) - len(batch), min_idle_s=600.0, block_s=5.0)
            if not got:
                raise RuntimeError(f"the learner read only {len(batch)} of {len(pairs)} labelled pairs")
            batch += got
        return self.consumer.claim(batch)

    def ack(self, batch: Sequence[LabelledPair]) -> int:
        return len(self.consumer.ack(batch).acked)


def random_pairs(ids: list[str], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n pairs of two distinct segment ids drawn uniformly."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 segments to compare, have {len(ids)}")
    first = rng.integers(len(ids), size=n)
    second = (first + rng.integers(1, len(ids), size=n)) % len(ids)
    return [(ids[a], ids[b]) for a, b in zip(first, second)]


def chosen_rejected(batch: Sequence[LabelledPair]) -> tuple[list[str], list[str], list[int]]:
    """Ids of the preferred and the rejected segment of every non-tied pair, and its user."""
    chosen, rejected, users = [], [], []
    for p in batch:
        if p.label.preferred == "tie":
            continue
        chosen.append(p.chosen)
        rejected.append(p.rejected)
        users.append(int(p.pair.meta.get("user", 0)))
    return chosen, rejected, users


def control_policy(config: Any, context_dim: int = 0) -> CategoricalPolicy:
    """A fresh policy for the config's env (spaces from the first user's env)."""
    env = make_env(config.env_id, config.users[0])
    return CategoricalPolicy(int(env.observation_space.shape[0]), int(env.action_space.n), config.hidden,
                             context_dim)


@dataclass
class OfflinePairs:
    """Labelled pairs (to ack after learning), their preferred and rejected segments, the env steps collected."""

    batch: list[LabelledPair]
    chosen: dict[str, torch.Tensor]
    rejected: dict[str, torch.Tensor]
    env_steps: int


@dataclass
class ControlSession:
    """One run's Redis table + queue + collector actor + channel, all dropped/killed at the end."""

    config: Any
    segments: SegmentTable
    queue: PreferenceQueue
    collector: Any
    channel: PreferenceChannel
    obs_dim: int
    num_actions: int

    def collect(self, episodes: int, user: int = 0, behaviour: str = "policy", group_size: int = 1,
                context: Sequence[float] | None = None) -> dict[str, Any]:
        return ray.get(self.collector.collect.remote(episodes, user, behaviour, group_size, context))

    def set_weights(self, state: dict[str, np.ndarray]) -> None:
        ray.get(self.collector.set_weights.remote(state))

    def read(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Learner view of segments (obs, action, user): torch tensors."""
        data = self.segments.read(ids)
        return {k: torch.as_tensor(v) for k, v in data.items()}

    def offline_dataset(self, episodes: int, pairs: int, rng: np.random.Generator, user: int = 0) -> OfflinePairs:
        """The offline setting: `episodes` uniform-random episodes of `user` into the table, `pairs` random pairs
        of their segments labelled through the queue (claimed, not yet acked), read back as the learner sees them."""
        collected = self.collect(episodes, user=user, behaviour="uniform")
        ids = [i for episode in collected["ids"] for i in episode]
        batch: list[LabelledPair] = []
        for start in range(0, pairs, 500):
            batch += self.channel.ask(random_pairs(ids, min(500, pairs - start), rng), version=0, user=user)
        chosen, rejected, users = chosen_rejected(batch)
        if set(users) - {user}:
            raise RuntimeError(f"pairs of user {user} came back labelled for users {sorted(set(users))}")
        return OfflinePairs(batch, self.read(chosen), self.read(rejected), collected["env_steps"])


@contextlib.contextmanager
def control_session(config: Any, rule_name: str, seed: int, max_segments: int, policy_spec: dict[str, Any],
                    queue: PreferenceQueue | None = None) -> Iterator[ControlSession]:
    """Ray must be initialised. The segment table and the queue share the queue's Redis (a fresh namespace on
    REDIS_URL / the embedded server by default); both are dropped and the collector killed at the end."""
    own_queue = queue is None
    queue = queue or PreferenceQueue(namespace=f"ctl-{rule_name}-{uuid.uuid4().hex[:8]}", max_len=100_000)
    env = make_env(config.env_id, config.users[0])
    obs_dim, num_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    segments = SegmentTable.create(queue.redis, queue.namespace, "segments", obs_dim, config.segment_length,
                                   max_segments)
    collector = None
    try:
        collector = RemoteSegmentCollector.remote(config.env_id, config.users, queue.namespace, "segments",
                                                  client_url(queue.redis), policy_spec, config.teacher_gamma, seed)
        teacher = SegmentTeacher(segments, config.teacher, config.teacher_beta, seed + 1)
        channel = PreferenceChannel(queue, teacher, prompt=f"segments:{config.env_id}")
        yield ControlSession(config, segments, queue, collector, channel, obs_dim, num_actions)
    finally:
        if collector is not None:
            ray.kill(collector)
        segments.drop()
        if own_queue:
            queue.drop()


def single_threaded(fn):
    """Run `fn` with one torch thread (tiny models: more threads only fight over the shared cores)."""
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def run_seeds(rule: Rule, seeds: int, one_seed: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """A rule's learning check: `one_seed(seed)` (a per-seed row with "return" = the TRUE mean return and
    "wall_s") for every seed, on the local Ray (2 CPUs) unless RAY_ADDRESS names a cluster."""
    from cluster.local import ensure_ray

    ensure_ray(num_cpus=2)
    return control_check_row(rule, [one_seed(seed) for seed in range(seeds)])


def control_check_row(rule: Rule, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """A verify row: "return" is the env's TRUE mean return, reached when it is at the threshold."""
    threshold = rule.learning_check.threshold
    return verify_row(rule, [s | {"reached": s["return"] >= threshold} for s in per_seed])
