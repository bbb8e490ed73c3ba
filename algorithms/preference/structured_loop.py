"""Pieces shared by the preference loops whose data is not one plain (prompt, two responses) pair per step:
single responses with scalar feedback (dro), two DPO stages (sacpo), multi-turn trajectories (dmpo), step-level
pairs from a tree search (mcts_dpo). Each of those rules has its own loop in its own module; this one holds what
they all do the same way as `loop.train_preference` (options checked before any work, SFT in the driver, an RLlib
LearnerGroup holding policy and frozen reference, the queue's learner protocol, the verify row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from algorithms.common.sequence import build_causal_lm, one_torch_thread
from algorithms.preference.base import PreferenceConfig, make_config
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, check_row
from algorithms.preference.generation import lm_state
from algorithms.preference.loop import EVAL_SEED_OFFSET, SFT_DEMONSTRATIONS, PreferenceResult
from algorithms.preference.sft import sft_train
from algorithms.rule import Rule
from services.preferences import Judge, LabelledPair, Learner

def sft_model(config: PreferenceConfig, task: Any, rng: np.random.Generator, seed: int) -> torch.nn.Module:
    """SFT on the task's noisy demonstrations: the reference policy and the starting point."""
    model = build_causal_lm(config.lm)
    demos = task.demonstrations(SFT_DEMONSTRATIONS, config.sft_noise, rng)
    sft_train(model, task, demos, steps=config.sft_steps, seed=seed)
    return model


def module_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A CausalLM's weights as a CausalLMModule state (parameters under "model.")."""
    return {f"model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}


def start_learners(config: PreferenceConfig, model: torch.nn.Module) -> Any:
    """A LearnerGroup whose policy and frozen reference both start from `model`."""
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    state = group.get_weights()[DEFAULT_MODULE_ID]
    state.update(module_state(model))  # keeps any extra module parameters (e.g. a value head) as built
    group.set_weights({DEFAULT_MODULE_ID: state})
    group.foreach_learner(lambda learner: learner.reset_reference())
    return group


def current_policy(group: Any, lm: dict[str, Any]) -> torch.nn.Module:
    policy = build_causal_lm(lm)
    policy.load_state_dict(lm_state(group.get_weights()[DEFAULT_MODULE_ID]))
    policy.eval()
    return policy


def as_batch(columns: dict[str, np.ndarray], count: int) -> MultiAgentBatch:
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=count)


def label_everything(judge: Judge, verdict: Callable[[Any], Any], count: int, what: str) -> None:
    """Label `count` pairs now waiting in the queue (the producer added them before); fail loudly if fewer."""
    labelled = 0
    while labelled < count:
        got = judge.label_with(verdict, count=count - labelled, block_s=5.0)
        if got == 0:
            raise RuntimeError(f"{what}: the judge found only {labelled} of {count} pairs to label")
        labelled += got


def learn_from_queue(consumer: Learner, group: Any, count: int, min_idle_s: float,
                     columns: Callable[[Sequence[LabelledPair]], dict[str, np.ndarray]]) -> tuple[int, Any]:
    """The queue's learner protocol: next_batch -> claim -> LearnerGroup.update -> ack (only after the update).
    Returns (pairs acked, the update's results; None when nothing was left to claim)."""
    batch = consumer.claim(consumer.next_batch(count, min_idle_s=min_idle_s, block_s=5.0))
    if not batch:
        return 0, None
    results = group.update(batch=as_batch(columns(batch), len(batch)))
    return len(consumer.ack(batch).acked), results


@dataclass
class Run:
    """One preference run's parts: its config and task, the SFT model (the reference), the LearnerGroup, the Redis
    store its data passes through (a PreferenceQueue or a FeedbackStore) and the generation actor."""

    config: PreferenceConfig
    task: Any
    seed: int
    sft: torch.nn.Module
    store: Any
    started: float
    group: Any = None
    producer: Any = None

    def sync_producer(self, version: int) -> None:
        """The learners' current weights to the generation actor (it stamps `version` on what it adds)."""
        ray.get(self.producer.set_weights.remote(self.group.get_weights()[DEFAULT_MODULE_ID], version))

    def finish(self, steps: int, units: int, history: list[dict[str, float]], eval_prompts: int,
               evaluate: Callable[[torch.nn.Module, torch.nn.Module, list[str]], dict[str, float]]) -> PreferenceResult:
        """The result with the trained policy; `evaluate(policy, sft, held-out prompts)` when eval_prompts > 0.
        `pairs_acked` counts what was learned from and acked (pairs, step pairs, or rated single responses)."""
        policy = current_policy(self.group, self.config.lm)
        result = PreferenceResult(steps, units, time.monotonic() - self.started, history, policy=policy,
                                  reference=self.sft)
        if eval_prompts:
            prompts = self.task.prompts(eval_prompts, np.random.default_rng(self.seed + EVAL_SEED_OFFSET))
            result.evaluation = evaluate(policy, self.sft, prompts)
        return result


@contextmanager
def preference_run(rule: Rule, overrides: dict[str, Any] | None, seed: int, task_of: Callable[[Any], Any],
                   store: Any, new_store: Callable[[], Any]) -> Iterator[Run]:
    """Options checked, one torch thread, SFT, a LearnerGroup from the SFT weights; afterwards the actor is killed,
    the learners shut down and the store dropped if this run made it (`new_store`), whatever happened."""
    config = make_config(rule, overrides, seed)
    task = task_of(config)
    with one_torch_thread():
        started = time.monotonic()  # wall time includes SFT
        torch.manual_seed(seed)
        sft = sft_model(config, task, np.random.default_rng(seed), seed)
        own = store is None
        run = Run(config, task, seed, sft, store if store is not None else new_store(), started)
        try:
            run.group = start_learners(config, sft)
            yield run
        finally:
            kill_quietly(run.producer)
            if run.group is not None:
                run.group.shutdown()
            if own:
                run.store.drop()


def run_check(rule: Rule, seeds: int, steps: int, train: Callable[..., PreferenceResult],
              extra: Callable[[PreferenceResult], bool] | None = None) -> dict[str, Any]:
    """`rule.learning_check` once per seed, as a row of `rlfleet verify` ("return" = the win rate vs SFT).
    `train(rule, steps=steps, seed=..., eval_prompts=...)` runs the rule; `extra(result)` is a further condition a
    seed must meet (e.g. SACPO's safety), else only win rate >= threshold counts."""
    from cluster.local import ensure_ray

    ensure_ray(num_cpus=2)
    check = rule.learning_check
    per_seed = []
    for seed in range(seeds):
        started = time.monotonic()
        result = train(rule, steps=steps, seed=seed, eval_prompts=CHECK_EVAL_PROMPTS)
        reached = result.evaluation["win_rate"] >= check.threshold and (extra is None or extra(result))
        per_seed.append({"seed": seed, "reached": bool(reached), "return": result.evaluation["win_rate"],
                         "env_steps": result.pairs_acked, "wall_s": time.monotonic() - started, **result.evaluation})
    return check_row(rule, per_seed)


def kill_quietly(actor: Any) -> None:
    if actor is not None:
        ray.kill(actor)
