"""One preference run: SFT, then steps of generate -> queue -> judge -> learn -> ack -> sync weights.

    producer (Ray actor, current weights) --add--> preference queue (Redis) --lease/label--> scripted judge
        --labelled--> learner consumer (driver) --claim--> LearnerGroup.update (N RLlib Learners) --ack-->

The driver is the queue's learner consumer: it reads a batch, claims it right before the update, sends it to
the LearnerGroup (split over its Learners) and acks it only after the update returned, so a crash between
read and ack leaves the pairs to the next consumer (`min_idle_s`). After every update each Learner's
`after_update` hook runs (moving references), and, when `config.producer_weights_due(step)` (by default after
every update with `pair_source="policy"`, i.e. online), the weights go back to the producer with the policy
version, which is stamped on every pair it adds; with "reference" the producer keeps the SFT policy (a fixed
offline dataset), and iterative rules sync it only at iteration boundaries (batched on-policy). Each Learner's
`start_training` hook runs once before the first update; `config.producer_mixture() > 0` makes the producer
sample from the geometric mixture of the policy and the SFT reference (IPO-MD).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from algorithms.common.sequence import build_causal_lm, one_torch_thread
from algorithms.preference.base import PreferenceConfig, learner_batch, make_config
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, check_row
from algorithms.preference.generation import RemotePairProducer, judge_verdict, lm_state, win_rate
from algorithms.preference.sft import sft_train
from algorithms.rule import Rule
from envs.text_tasks import BradleyTerryJudge, make_task
from services.preferences import PreferenceQueue
from services.replay.connection import client_url

SFT_DEMONSTRATIONS = 2000
EVAL_SEED_OFFSET = 10_000  # eval prompts come from their own stream, apart from training prompts


@dataclass
class PreferenceResult:
    steps: int
    pairs_acked: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)
    policy: torch.nn.Module | None = None
    reference: torch.nn.Module | None = None


def redis_url(queue: Any) -> str:
    """How other processes (the generation actor) reach the server of `queue` (anything with a `.redis` client)."""
    return client_url(queue.redis)


def train_preference(rule: Rule, task: str | None = None, steps: int = 24, seed: int = 0,
                     overrides: dict[str, Any] | None = None, queue: PreferenceQueue | None = None,
                     evaluate: bool = True, eval_prompts: int = CHECK_EVAL_PROMPTS) -> PreferenceResult:
    """Train `rule` (a preference-family Rule) for `steps` steps of `pairs_per_step` pairs on `task`.

    Ray must be initialised. `overrides` are typed config attributes (e.g. {"beta": 0.2}); `queue` defaults to
    a fresh namespace on REDIS_URL / the embedded server, dropped at the end.
    """
    config = make_config(rule, overrides, seed, text_task=task)
    text_task = make_task(config.text_task)
    with one_torch_thread():
        return _train(rule, config, text_task, steps, seed, queue, evaluate, eval_prompts)


def _train(rule: Rule, config: PreferenceConfig, text_task: Any, steps: int, seed: int,
           queue: PreferenceQueue | None, evaluate: bool, eval_prompts: int) -> PreferenceResult:
    started = time.monotonic()  # wall time includes SFT
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # SFT in the driver on imperfect demonstrations: the reference policy and the starting point.
    sft_model = build_causal_lm(config.lm)
    demos = text_task.demonstrations(SFT_DEMONSTRATIONS, config.sft_noise, rng)
    sft_train(sft_model, text_task, demos, steps=config.sft_steps, seed=seed)

    own_queue = queue is None
    queue = queue or PreferenceQueue(namespace=f"pref-{rule.name}-{uuid.uuid4().hex[:8]}")
    learner_group = producer = None
    try:
        learner_group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
        weights = {k: v.detach().numpy() for k, v in sft_model.state_dict().items()}
        learner_group.set_weights({"default_policy": {f"model.{k}": v for k, v in weights.items()}})
        learner_group.foreach_learner(lambda learner: learner.reset_reference())
        learner_group.foreach_learner(lambda learner: learner.start_training(config))
        producer = RemotePairProducer.remote(config.lm, config.text_task, queue.namespace, redis_url(queue),
                                             config.temperature, seed)
        module_state = learner_group.get_weights()["default_policy"]
        ray.get(producer.set_weights.remote(module_state, 0))
        if config.producer_mixture() > 0:  # the SFT weights are the mixture's fixed reference part
            ray.get(producer.set_mixture.remote(module_state, config.producer_mixture()))
        judge = queue.judge("bt-judge")
        verdict = judge_verdict(BradleyTerryJudge(text_task, beta=config.judge_beta, seed=seed))
        consumer = queue.learner("learner-driver")
        history: list[dict[str, float]] = []
        acked = 0
        for step in range(steps):
            ray.get(producer.produce.remote(config.pairs_per_step))
            labelled = 0
            while labelled < config.pairs_per_step:
                got = judge.label_with(verdict, count=config.pairs_per_step - labelled, block_s=5.0)
                if got == 0:
                    raise RuntimeError(f"step {step}: the judge found only {labelled} of "
                                       f"{config.pairs_per_step} pairs to label")
                labelled += got
            batch = consumer.next_batch(config.pairs_per_step, min_idle_s=config.min_idle_s, block_s=5.0)
            batch = consumer.claim(batch)
            if not batch:
                continue
            results = learner_group.update(batch=learner_batch(text_task, batch))
            acked += len(consumer.ack(batch).acked)
            learner_group.foreach_learner(lambda learner, done=step + 1: learner.after_update(config, done))
            if config.producer_weights_due(step + 1):  # online: the next pairs come from the updated policy
                module_state = learner_group.get_weights()["default_policy"]
                ray.get(producer.set_weights.remote(module_state, step + 1))
            history.append(step_metrics(results))
        result = PreferenceResult(steps=steps, pairs_acked=acked, seconds=time.monotonic() - started,
                                  history=history)
        policy = build_causal_lm(config.lm)
        policy.load_state_dict(lm_state(learner_group.get_weights()["default_policy"]))
        policy.eval()
        result.policy, result.reference = policy, sft_model
        if evaluate:
            prompts = text_task.prompts(eval_prompts, np.random.default_rng(seed + EVAL_SEED_OFFSET))
            result.evaluation = win_rate(policy, sft_model, text_task, prompts, config.judge_beta,
                                         config.temperature, seed)
        return result
    finally:
        if producer is not None:
            ray.kill(producer)
        if learner_group is not None:
            learner_group.shutdown()
        if own_queue:
            queue.drop()


PAIR_METRICS = ("preference_loss", "logratio_margin", "margin_accuracy", "pairs")  # PreferenceLearner's logged values


def step_metrics(results: Any, keys: Sequence[str] = PAIR_METRICS) -> dict[str, float]:
    """The learner's logged values of one update (results of all learners reduced by RLlib)."""
    learner = results[0] if isinstance(results, list) else results
    stats = learner.get(DEFAULT_MODULE_ID, {})
    return {k: float(stats[k].peek() if hasattr(stats[k], "peek") else stats[k]) for k in keys if k in stats}


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    """`rule.learning_check` measured once per seed: train on its task for its number of labelled pairs, then
    the win rate against the SFT reference on CHECK_EVAL_PROMPTS held-out prompts. The row has the shape of
    `rlfleet.verify.run_check`'s ("return" is the win rate, "env_steps" the pairs learned from)."""
    from cluster.local import ensure_ray

    ensure_ray(num_cpus=2)
    check = rule.learning_check
    steps = -(-check.steps // rule.config_class().pairs_per_step)
    per_seed = []
    for seed in range(seeds):
        result = train_preference(rule, task=check.env, steps=steps, seed=seed, eval_prompts=CHECK_EVAL_PROMPTS)
        per_seed.append({"seed": seed, "reached": result.evaluation["win_rate"] >= check.threshold,
                         "return": result.evaluation["win_rate"], "env_steps": result.pairs_acked,
                         "wall_s": result.seconds, **result.evaluation})
    return check_row(rule, per_seed)
