"""P251 DMPO: Direct Multi-Turn Preference Optimization (Shi et al. 2024, "Direct Multi-Turn Preference
Optimization for Language Agents").

For a task instruction with a preferred trajectory tau_w (T_w agent turns) and a dis-preferred one tau_l (T_l
turns), states s_t (instruction + all earlier turns and environment replies) and the agent's actions a_t:

    phi(t, T) = gamma^t (1 - gamma^(T - t)) / (1 - gamma^T)          ((T - t) / T when gamma = 1)
    L_DMPO = -E log sigmoid( sum_{t<T_w} beta phi(t, T_w) log pi(a_t^w|s_t^w)/pi_ref(a_t^w|s_t^w)
                            - sum_{t<T_l} beta phi(t, T_l) log pi(a_t^l|s_t^l)/pi_ref(a_t^l|s_t^l) )

The state-action occupancy constraint (instead of DPO's policy constraint) makes the partition function independent
of the state, and the length normalisation of the Bradley-Terry model over the discounted sums gives the weights
phi: early turns count most, and trajectories of different lengths are comparable. Only the agent's tokens carry
weight; the environment's replies are context.

Choices the paper leaves open, and ours: an agent turn is one token here (`envs.multiturn_text`), so log pi(a_t|s_t)
is that token's log-prob (a multi-token turn would sum its tokens under one phi, as the official code does); gamma
= 0.9 (the official code defaults to 0.7; our score counts every position alike, so late turns keep more weight);
beta = 0.1 as DPO; trajectory pairs are sampled online from the current policy (the paper builds them offline from
expert and SFT trajectories) and labelled by the scripted Bradley-Terry judge on the task's hidden score; SFT
runs 1000 steps on noisy expert episodes (300, the single-turn default, leaves a policy with no perfect episode).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from algorithms.common.losses import masked_mean
from algorithms.common.sequence import pad_pairs, sample_responses, token_logprobs
from algorithms.options import Option, unit_interval
from algorithms.preference.base import (PREFERENCE_OPTIONS, TINY_LM, VALID, PreferenceConfig, PreferenceLearner,
                                        logratio_margin)
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, CHECK_PAIRS, WIN_RATE_THRESHOLD
from algorithms.preference.dpo import dpo_loss
from algorithms.preference.generation import PairProducer, judge_verdict
from algorithms.preference.loop import PAIR_METRICS, PreferenceResult, redis_url, step_metrics
from algorithms.preference.module import LOGP, PAIR_COLUMNS, CausalLMModule
from algorithms.preference.structured_loop import label_everything, learn_from_queue, preference_run, run_check
from algorithms.rule import LearningCheck, Rule
from envs.multiturn_text import MT_VOCAB, MultiTurnDigits
from envs.text_tasks import PAD_ID, BradleyTerryJudge
from services.preferences import LabelledPair, PreferenceQueue

TURN_WEIGHT = "turn_weight"  # (B, 2, T): phi(t, T) on the agent's token of turn t, 0 elsewhere


def turn_weights(num_turns: int, gamma: float) -> list[float]:
    """phi(t, T) for t = 0 .. T-1 (P251; the official code's per-turn coefficient); they sum to sum_t gamma^t (1-gamma^(T-t)) / (1-gamma^T)."""
    if gamma == 1.0:
        return [(num_turns - t) / num_turns for t in range(num_turns)]
    return [gamma ** t * (1 - gamma ** (num_turns - t)) / (1 - gamma ** num_turns) for t in range(num_turns)]


def weighted_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2): sum_t phi(t, T) log pi(a_t | s_t) of each trajectory of a (B, 2, T) batch."""
    b, k, t = batch["input_ids"].shape
    weight = batch[TURN_WEIGHT].reshape(b * k, t).float()
    per_token = token_logprobs(model, batch["input_ids"].reshape(b * k, t), batch["attention_mask"].reshape(b * k, t),
                               batch["position_ids"].reshape(b * k, t))
    # where, not multiply: a padded position's log-prob may be NaN and NaN * 0 is NaN
    return torch.where(weight != 0, per_token * weight, torch.zeros_like(per_token)).sum(-1).reshape(b, k)


def dmpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DMPO terms from the phi-weighted trajectory log-probs: DPO's logistic loss on their margin."""
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


class DMPOModule(CausalLMModule):
    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {LOGP: weighted_logprobs(self.model, batch)}


class DMPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(dmpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.gamma = 0.9
        self.text_task = "multiturn-digits"
        # Measured: 300 SFT steps (the single-turn default) leave the multi-turn SFT policy at loss 1.36 and 0 % perfect
        # episodes (it must count the "+" so far to know which digit is next); 1000 steps reach loss 0.70 and 38 %.
        self.sft_steps = 1000
        self.lm = {**TINY_LM, "vocab_size": len(MT_VOCAB)}

    def get_default_learner_class(self) -> type:
        return DMPOLearner

    def get_default_rl_module_spec(self):
        spec = super().get_default_rl_module_spec()
        spec.module_class = DMPOModule
        return spec

    def validate(self) -> None:
        super().validate()
        if not 0 < self.gamma <= 1:
            self._value_error(f"gamma must be in (0, 1], got {self.gamma}")
        if self.text_task != "multiturn-digits":
            self._value_error(f"dmpo runs on the multi-turn task: text_task must be 'multiturn-digits', "
                              f"got {self.text_task!r}")


class DMPOLearner(PreferenceLearner):
    """PreferenceLearner with the reference scored the same way as the policy (phi-weighted agent tokens)."""

    def compute_loss_for_module(self, *, module_id: str, config: DMPOConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        logp = fwd_out[LOGP]
        with torch.no_grad():
            ref = weighted_logprobs(self._references[module_id], batch)
        terms = self.pair_loss(config, logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1])
        valid = batch[VALID].bool()
        loss = masked_mean(terms["loss"], valid)
        margin = logratio_margin(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1]).detach()
        self.metrics.log_dict(
            {"preference_loss": loss.detach(), "logratio_margin": masked_mean(margin, valid),
             "margin_accuracy": masked_mean((margin > 0).float(), valid), "pairs": valid.sum().float()},
            key=module_id, window=1,
        )
        return loss


def play(model: torch.nn.Module, task: MultiTurnDigits, prompts: Sequence[str], temperature: float,
         generator: torch.Generator) -> list[str]:
    """One episode per prompt: the policy samples one token per turn, the environment answers, until done."""
    transcripts = [""] * len(prompts)
    while True:
        active = [i for i, t in enumerate(transcripts) if not task.finished(t)]
        if not active:
            return transcripts
        contexts = [task.prompt_ids(prompts[i]) + task.response_ids(transcripts[i]) for i in active]
        actions = sample_responses(model, contexts, max_new_tokens=1, eos_id=-1, pad_id=PAD_ID,
                                   temperature=temperature, generator=generator)
        for i, ids in zip(active, actions):
            action = MT_VOCAB[ids[0]]
            transcripts[i] += action + task.feedback(prompts[i], transcripts[i], action)


def trajectory_columns(task: MultiTurnDigits, pairs: Sequence[LabelledPair], gamma: float) -> dict[str, np.ndarray]:
    """(B, 2, T) columns of labelled trajectory pairs, preferred first, with phi on the agent tokens."""
    width = len(task.prompt_ids(task.prompt("0" * task.length))) + task.max_new_tokens
    prompts, responses, weights, valid = [], [], [], []
    for p in pairs:
        tie = p.label.preferred == "tie"
        for transcript in (p.pair.responses if tie else (p.chosen, p.rejected)):
            prompt = task.prompt_ids(p.pair.prompt)
            prompts.append(prompt)
            responses.append(task.response_ids(transcript))
            row = np.zeros(width, dtype=np.float32)
            phi = turn_weights(task.turns(transcript), gamma)
            for t, offset in enumerate(task.agent_offsets(transcript)):
                row[len(prompt) + offset] = phi[t]
            weights.append(row)
        valid.append(not tie)
    padded = pad_pairs(prompts, responses, PAD_ID, side="right", length=width)
    cols = {c: padded[c].numpy().reshape(len(pairs), 2, width) for c in PAIR_COLUMNS}
    cols[TURN_WEIGHT] = np.stack(weights).reshape(len(pairs), 2, width)
    cols[VALID] = np.asarray(valid, dtype=bool)
    return cols


class TrajectoryPairProducer(PairProducer):
    """Ray actor: plays two episodes per prompt with the current policy and adds them as one pair to the queue."""

    def __init__(self, lm_config: Mapping[str, Any], namespace: str, redis_url: str, temperature: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__(lm_config, "reverse-digits", namespace, redis_url, temperature, seed)
        self.task = MultiTurnDigits()

    def produce(self, n: int, timeout: float = 300.0) -> list[str]:
        prompts = self.task.prompts(n, self.rng)
        first = play(self.model, self.task, prompts, self.temperature, self.generator)
        second = play(self.model, self.task, prompts, self.temperature, self.generator)
        pairs = [{"id": f"v{self.version}-{self.produced + i}", "prompt": p, "responses": [a, b],
                  "policy_version": self.version} for i, (p, a, b) in enumerate(zip(prompts, first, second))]
        self.produced += n
        return self.queue.add(pairs, timeout=timeout)


RemoteTrajectoryPairProducer = ray.remote(num_cpus=1)(TrajectoryPairProducer)


def trajectory_win_rate(policy: torch.nn.Module, reference: torch.nn.Module, task: MultiTurnDigits,
                        prompts: Sequence[str], judge_beta: float, temperature: float = 1.0,
                        seed: int = 0) -> dict[str, float]:
    """One episode each from policy and reference per prompt; the judge's expected preference for the policy's
    (mean sigmoid(judge_beta (score_policy - score_reference))), its SE, perfect-episode rates and mean scores."""
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = play(policy, task, prompts, temperature, gen), play(reference, task, prompts, temperature, gen)
    judge = BradleyTerryJudge(task, beta=judge_beta)
    p = np.array([judge.prob_first(q, a, b) for q, a, b in zip(prompts, ours, theirs)])
    return {
        "win_rate": float(p.mean()), "win_rate_se": float(p.std(ddof=1) / np.sqrt(len(p))),
        "policy_accuracy": float(np.mean([task.correct(q, a) for q, a in zip(prompts, ours)])),
        "reference_accuracy": float(np.mean([task.correct(q, b) for q, b in zip(prompts, theirs)])),
        "policy_score": float(np.mean([task.score(q, a) for q, a in zip(prompts, ours)])),
        "reference_score": float(np.mean([task.score(q, b) for q, b in zip(prompts, theirs)])),
    }


def train_dmpo(rule: Rule, steps: int = 24, seed: int = 0, overrides: dict[str, Any] | None = None,
               queue: PreferenceQueue | None = None, eval_prompts: int = CHECK_EVAL_PROMPTS) -> PreferenceResult:
    """SFT on noisy expert episodes, then `steps` x (two episodes per prompt from the current policy -> queue ->
    judge -> DMPO update -> ack -> weights back to the producer)."""
    with preference_run(rule, overrides, seed, lambda c: MultiTurnDigits(), queue,
                        lambda: PreferenceQueue(namespace=f"pref-dmpo-{uuid.uuid4().hex[:8]}")) as run:
        config, task, queue = run.config, run.task, run.store
        run.producer = RemoteTrajectoryPairProducer.remote(config.lm, queue.namespace, redis_url(queue),
                                                           config.temperature, seed)
        run.sync_producer(0)
        judge, consumer = queue.judge("bt-judge"), queue.learner("learner-driver")
        verdict = judge_verdict(BradleyTerryJudge(task, beta=config.judge_beta, seed=seed))
        history, acked = [], 0
        for step in range(steps):
            ray.get(run.producer.produce.remote(config.pairs_per_step))
            label_everything(judge, verdict, config.pairs_per_step, f"step {step}")
            got, results = learn_from_queue(consumer, run.group, config.pairs_per_step, config.min_idle_s,
                                            lambda batch: trajectory_columns(task, batch, config.gamma))
            acked += got
            if config.pair_source == "policy":
                run.sync_producer(step + 1)
            if results is not None:
                history.append(step_metrics(results, PAIR_METRICS))
        return run.finish(steps, acked, history, eval_prompts, lambda policy, sft, prompts: trajectory_win_rate(
            policy, sft, task, prompts, config.judge_beta, config.temperature, seed))


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_check(rule, seeds, -(-CHECK_PAIRS // DMPOConfig().pairs_per_step), train_dmpo)


RULE = Rule(
    name="dmpo", family="preference", paper_ids=("P251",),
    summary="Direct Multi-turn Preference Optimisation: DPO over trajectories with discounted, length-normalised turns",
    config_class=DMPOConfig,
    options=(*PREFERENCE_OPTIONS,
             Option("gamma", "discount of the occupancy measure: turn weights phi(t, T)",
                    lambda x: unit_interval(x) and x > 0, "in (0, 1]")),
    learning_check=LearningCheck(
        env="multiturn-digits", steps=CHECK_PAIRS, threshold=WIN_RATE_THRESHOLD,
        source=("P251: the DMPO agent must beat its SFT reference on the multi-turn task under the scripted "
                "Bradley-Terry judge on the trajectory score (the paper compares with SFT and DPO agents by task "
                f"reward); {CHECK_PAIRS} trajectory pairs, 0.6 = the shared pairwise threshold (9 SE above 0.5)")),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5},
    check_runner="algorithms.preference.dmpo:run_learning_check",
)
