"""Reward-model runs: SFT, then pairs of SFT samples -> Redis queue -> judge(s) -> RM LearnerGroup(s) -> ack.

    producer (Ray actor, SFT weights) --add--> preference queue (Redis) --lease/label--> judge(s)
        --labelled--> driver consumer: next_batch -> claim -> every RM LearnerGroup.update -> ack

Unlike the pairwise loop (`loop.py`) the policy never changes (the RM scores the SFT policy's samples), several
reward models can learn from the very same batches (a rule and its ablation in one run: `goal_rm` vs the plain
RM), the labels may come from a population of judges (one queue judge id per user: `maxmin_rlhf`), and the
driver keeps the acked pairs for further passes (`rm_epochs`) and for EM. The evaluation is held-out pairwise
accuracy against the judge's hidden score (`evaluate_reward_models`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from algorithms.common.bradley_terry import bayes_label_accuracy, pairwise_accuracy
from algorithms.common.sequence import build_causal_lm, pad_pairs
from algorithms.preference.base import learner_batch, make_config
from algorithms.preference.checks import verify_row
from algorithms.preference.generation import RemotePairProducer, judge_verdict, sample_texts
from algorithms.preference.loop import EVAL_SEED_OFFSET, SFT_DEMONSTRATIONS, redis_url
from algorithms.preference.reward_head import RewardModel, reward_scores
from algorithms.preference.reward_model import RM_EVAL_PROMPTS, RewardModelConfig
from algorithms.preference.sft import sft_train
from algorithms.rule import Rule
from envs.text_tasks import PAD_ID, BradleyTerryJudge, ReverseDigits, make_task
from services.preferences import LabelledPair, PreferenceQueue

# labeller(queue, n, step): label exactly n of the queue's unlabelled pairs (raise if it cannot).
Labeller = Callable[[PreferenceQueue, int, int], None]


def train_sft(config: RewardModelConfig, task: ReverseDigits, seed: int) -> torch.nn.Module:
    """The same SFT start as the pairwise loop (same demonstrations and steps for a seed)."""
    torch.manual_seed(seed)
    model = build_causal_lm(config.lm)
    demos = task.demonstrations(SFT_DEMONSTRATIONS, config.sft_noise, np.random.default_rng(seed))
    sft_train(model, task, demos, steps=config.sft_steps, seed=seed)
    return model


def rm_from_state(lm_config: Mapping[str, Any], module_state: Mapping[str, Any]) -> RewardModel:
    """A RewardModel from a RewardModule's state (its parameters live under "model.")."""
    model = RewardModel(lm_config)
    # np.array copies: Ray hands out read-only arrays, which torch will not wrap safely.
    model.load_state_dict({k[len("model."):]: torch.as_tensor(np.array(v)) for k, v in module_state.items()
                           if k.startswith("model.")})
    model.eval()
    return model


class RewardModelGroups:
    """One RLlib LearnerGroup per named reward model, every backbone starting from the SFT policy."""

    def __init__(self, configs: Mapping[str, RewardModelConfig], sft_model: torch.nn.Module) -> None:
        self.configs = dict(configs)
        self.groups: dict[str, Any] = {}
        sft_state = {f"model.lm.{k}": v.detach().numpy() for k, v in sft_model.state_dict().items()}
        try:
            for name, config in self.configs.items():
                group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
                self.groups[name] = group
                state = dict(group.get_weights()[DEFAULT_MODULE_ID])
                state.update(sft_state)
                group.set_weights({DEFAULT_MODULE_ID: state})
        except BaseException:
            self.shutdown()
            raise

    def update(self, name: str, task: ReverseDigits, pairs: Sequence[LabelledPair]) -> dict[str, float]:
        return step_metrics(self.groups[name].update(batch=learner_batch(task, pairs)))

    def copy(self, source: str, target: str) -> None:
        """target's weights <- source's (its optimizer state stays its own)."""
        self.groups[target].set_weights(self.groups[source].get_weights())

    def model(self, name: str) -> RewardModel:
        return rm_from_state(self.configs[name].lm, self.groups[name].get_weights()[DEFAULT_MODULE_ID])

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups.clear()


def step_metrics(results: Any) -> dict[str, float]:
    learner = results[0] if isinstance(results, list) else results
    out = {}
    for key, value in learner.get(DEFAULT_MODULE_ID, {}).items():
        value = value.peek() if hasattr(value, "peek") else value
        if isinstance(value, (int, float, np.floating, np.integer)) or (torch.is_tensor(value) and value.numel() == 1):
            out[key] = float(value)
    return out


def judge_labeller(task: ReverseDigits, judge_beta: float, seed: int) -> Labeller:
    """The scripted Bradley-Terry judge over the task's hidden score, as one queue judge."""
    verdict = judge_verdict(BradleyTerryJudge(task, beta=judge_beta, seed=seed))

    def label(queue: PreferenceQueue, n: int, step: int) -> None:
        judge, labelled = queue.judge("bt-judge"), 0
        while labelled < n:
            got = judge.label_with(verdict, count=n - labelled, block_s=5.0)
            if got == 0:
                raise RuntimeError(f"step {step}: the judge found only {labelled} of {n} pairs to label")
            labelled += got

    return label


def stream_pairs(config: RewardModelConfig, task: ReverseDigits, sft_model: torch.nn.Module,
                 queue: PreferenceQueue, labeller: Labeller, steps: int, seed: int,
                 on_batch: Callable[[list[LabelledPair]], None]) -> list[LabelledPair]:
    """`steps` rounds of: the producer adds pairs_per_step pairs of SFT samples, the labeller labels them, the
    driver reads, claims, hands the batch to `on_batch` (the updates) and acks after it. Returns the acked pairs."""
    producer = RemotePairProducer.remote(config.lm, config.text_task, queue.namespace, redis_url(queue),
                                         config.temperature, seed)
    try:
        weights = {f"model.{k}": v.detach().numpy() for k, v in sft_model.state_dict().items()}
        ray.get(producer.set_weights.remote(weights, 0))
        consumer = queue.learner("rm-learner")
        used: list[LabelledPair] = []
        for step in range(steps):
            ray.get(producer.produce.remote(config.pairs_per_step))
            labeller(queue, config.pairs_per_step, step)
            batch = consumer.claim(consumer.next_batch(config.pairs_per_step, min_idle_s=config.min_idle_s,
                                                       block_s=5.0))
            if not batch:
                continue
            on_batch(batch)
            acked = set(consumer.ack(batch).acked)
            used += [p for p in batch if p.pair_id in acked]
        return used
    finally:
        ray.kill(producer)


def replay_epochs(pairs: Sequence[LabelledPair], epochs: int, batch_size: int, seed: int,
                  on_batch: Callable[[list[LabelledPair]], None]) -> None:
    """`epochs` further shuffled passes over pairs already read from the queue (driver memory, no re-queueing)."""
    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), batch_size):
            on_batch([pairs[i] for i in order[start:start + batch_size]])


@dataclass
class HeldOutPairs:
    prompts: list[str]
    first: list[str]
    second: list[str]


def held_out_pairs(task: ReverseDigits, sft_model: torch.nn.Module, n: int, temperature: float,
                   seed: int) -> HeldOutPairs:
    """Two SFT samples for each of n prompts from the evaluation stream (never trained on)."""
    prompts = task.prompts(n, np.random.default_rng(seed + EVAL_SEED_OFFSET))
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    return HeldOutPairs(prompts, sample_texts(sft_model, task, prompts, temperature, gen),
                        sample_texts(sft_model, task, prompts, temperature, gen))


@torch.no_grad()
def score_texts(model: RewardModel, task: ReverseDigits, prompts: Sequence[str], responses: Sequence[str],
                chunk: int = 256) -> np.ndarray:
    """r(x, y) for text prompts and responses (one row each)."""
    out = []
    for s in range(0, len(prompts), chunk):
        batch = pad_pairs([task.prompt_ids(p) for p in prompts[s:s + chunk]],
                          [task.response_ids(r) for r in responses[s:s + chunk]], PAD_ID, side="right")
        out.append(reward_scores(model, batch).float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_reward_model(model: RewardModel, task: ReverseDigits, pairs: HeldOutPairs, judge_beta: float,
                          score: Callable[[str, str], float] | None = None) -> dict[str, float]:
    """Accuracy of the RM's order against the hidden score on the pairs whose scores differ, and against
    one draw of the noisy judge's labels on all pairs, next to the Bayes bound for the latter."""
    score = score or task.score
    r1, r2 = score_texts(model, task, pairs.prompts, pairs.first), score_texts(model, task, pairs.prompts, pairs.second)
    s1 = np.array([score(q, a) for q, a in zip(pairs.prompts, pairs.first)], dtype=float)
    s2 = np.array([score(q, b) for q, b in zip(pairs.prompts, pairs.second)], dtype=float)
    acc, se, n = pairwise_accuracy(r1, r2, s1, s2)
    p_first = 1.0 / (1.0 + np.exp(-judge_beta * (s1 - s2)))
    labels_first = np.random.default_rng(0).random(len(p_first)) < p_first
    label_acc = float(np.mean(np.where(r1 == r2, 0.5, (r1 > r2) == labels_first)))
    return {"accuracy": acc, "accuracy_se": se, "scored_pairs": n, "label_accuracy": label_acc,
            "bayes_label_accuracy": bayes_label_accuracy(p_first)}


@dataclass
class RewardModelRun:
    seconds: float
    pairs_acked: int
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    models: dict[str, RewardModel] = field(default_factory=dict)


def train_reward_models(rule: Rule, variants: Mapping[str, Mapping[str, Any]] | None = None, steps: int = 24,
                        seed: int = 0, overrides: Mapping[str, Any] | None = None,
                        queue: PreferenceQueue | None = None, eval_prompts: int = RM_EVAL_PROMPTS) -> RewardModelRun:
    """Train `rule`'s reward model (and `variants`: name -> extra overrides, e.g. an ablation) on the same
    queue batches. Ray must be initialised. The first model is named after the rule."""
    configs = {rule.name: make_config(rule, overrides, seed)}
    for name, extra in (variants or {}).items():
        configs[name] = make_config(rule, {**(overrides or {}), **extra}, seed)
    config = configs[rule.name]
    task = make_task(config.text_task)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores (see loop.py)
    started = time.monotonic()
    own_queue = queue is None
    queue = queue or PreferenceQueue(namespace=f"rm-{rule.name}-{uuid.uuid4().hex[:8]}")
    groups = None
    try:
        sft_model = train_sft(config, task, seed)
        groups = RewardModelGroups(configs, sft_model)
        history: dict[str, list[dict[str, float]]] = {name: [] for name in configs}

        def update_all(batch: list[LabelledPair]) -> None:
            for name in configs:
                history[name].append(groups.update(name, task, batch))

        pairs = stream_pairs(config, task, sft_model, queue, judge_labeller(task, config.judge_beta, seed),
                             steps, seed, update_all)
        replay_epochs(pairs, config.rm_epochs - 1, config.pairs_per_step, seed, update_all)
        run = RewardModelRun(seconds=0.0, pairs_acked=len(pairs), history=history)
        run.models = {name: groups.model(name) for name in configs}
        if eval_prompts:
            held_out = held_out_pairs(task, sft_model, eval_prompts, config.temperature, seed)
            run.evaluation = {name: evaluate_reward_model(m, task, held_out, config.judge_beta)
                              for name, m in run.models.items()}
        run.seconds = time.monotonic() - started
        return run
    finally:
        torch.set_num_threads(threads)
        if groups is not None:
            groups.shutdown()
        if own_queue:
            queue.drop()


def run_reward_model_check(rule: Rule, seeds: int = 1, variants: Mapping[str, Mapping[str, Any]] | None = None
                           ) -> dict[str, Any]:
    """`rule.learning_check`: train on its number of labelled pairs, score = held-out accuracy vs the hidden
    score. `variants` are trained on the same batches and reported next to it (not part of pass/fail)."""
    from cluster.local import ensure_ray

    ensure_ray(num_cpus=2)
    check = rule.learning_check
    steps = -(-check.steps // rule.config_class().pairs_per_step)
    per_seed = []
    for seed in range(seeds):
        run = train_reward_models(rule, variants, steps=steps, seed=seed, overrides=check.overrides)
        ours = run.evaluation[rule.name]
        per_seed.append({"seed": seed, "reached": ours["accuracy"] >= check.threshold, "return": ours["accuracy"],
                         "env_steps": run.pairs_acked, "wall_s": run.seconds, **ours,
                         **{f"{name}_{k}": v for name, ev in run.evaluation.items() if name != rule.name
                            for k, v in ev.items()}})
    return verify_row(rule, per_seed, eval_prompts=RM_EVAL_PROMPTS)
