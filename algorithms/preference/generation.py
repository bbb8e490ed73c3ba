"""The generation side: a Ray actor that samples response pairs with the learner's current weights and adds
them to the preference queue, and the evaluation of a policy against its reference under the scripted judge."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from algorithms.common.geometric_mixture import GeometricMixtureLM
from algorithms.common.sequence import build_causal_lm, sample_responses
from envs.text_tasks import EOS_ID, PAD_ID, BradleyTerryJudge, ReverseDigits, make_task
from services.preferences import PreferenceQueue


def lm_state(module_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The LM's state dict from a CausalLMModule state (its parameters live under "model.")."""
    # np.array copies: Ray hands out read-only arrays, which torch will not wrap safely.
    return {k[len("model."):]: torch.as_tensor(np.array(v)) for k, v in module_state.items() if k.startswith("model.")}


def sample_texts(model: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str], temperature: float,
                 generator: torch.Generator) -> list[str]:
    ids = sample_responses(model, [task.prompt_ids(p) for p in prompts], max_new_tokens=task.max_new_tokens,
                           eos_id=EOS_ID, pad_id=PAD_ID, temperature=temperature, generator=generator)
    return [task.response_text(r) for r in ids]


class PairProducer:
    """Samples two responses per prompt from the current policy and adds them as one pair to the queue.
    Runs as a Ray actor (`ray.remote(PairProducer)`); it reaches Redis through `redis_url`. After `set_mixture`
    it samples from the per-token geometric mixture pi^(1-beta) pi_ref^beta instead (IPO-MD, P021)."""

    def __init__(self, lm_config: Mapping[str, Any], task: str, namespace: str, redis_url: str | None,
                 temperature: float = 1.0, seed: int = 0) -> None:
        if redis_url:
            os.environ["REDIS_URL"] = redis_url  # the driver's (embedded) server, never a new one
        torch.set_num_threads(1)  # the machine is shared: one core per actor
        self.model = build_causal_lm(lm_config)
        self.model.eval()
        self.task = make_task(task)
        self.queue = PreferenceQueue(namespace=namespace)
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.version = 0
        self.produced = 0
        self.lm_config = dict(lm_config)
        self.sampler: torch.nn.Module = self.model  # what `produce` samples from

    def set_weights(self, module_state: Mapping[str, Any], version: int) -> int:
        self.model.load_state_dict(lm_state(module_state))
        self.version = version
        return version

    def set_mixture(self, reference_state: Mapping[str, Any], beta: float) -> float:
        """Sample from pi_theta^(1-beta) pi_ref^beta per token from now on; `reference_state` is a CausalLMModule
        state (the reference stays fixed; the policy part follows `set_weights`). beta = 0: the policy again."""
        if beta == 0.0:
            self.sampler = self.model
            return beta
        reference = build_causal_lm(self.lm_config)
        reference.load_state_dict(lm_state(reference_state))
        reference.eval()
        self.sampler = GeometricMixtureLM(self.model, reference, beta)
        return beta

    def produce(self, n: int, timeout: float = 300.0) -> list[str]:
        """Add `n` fresh pairs (waits while the queue is full, then QueueFull); returns their ids."""
        prompts = self.task.prompts(n, self.rng)
        first = sample_texts(self.sampler, self.task, prompts, self.temperature, self.generator)
        second = sample_texts(self.sampler, self.task, prompts, self.temperature, self.generator)
        pairs = []
        for prompt, a, b in zip(prompts, first, second):
            pairs.append({"id": f"v{self.version}-{self.produced}", "prompt": prompt, "responses": [a, b],
                          "policy_version": self.version})
            self.produced += 1
        return self.queue.add(pairs, timeout=timeout)


RemotePairProducer = ray.remote(num_cpus=1)(PairProducer)


def judge_verdict(judge: BradleyTerryJudge):
    """The scripted judge as a queue verdict function (Pair -> 0 or 1)."""
    return lambda pair: judge(pair.prompt, pair.responses[0], pair.responses[1])


def win_rate(policy: torch.nn.Module, reference: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str],
             judge_beta: float, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """One sampled response each from policy and reference per prompt. `win_rate` is the judge's expected
    preference for the policy's, mean sigmoid(judge_beta * (score_policy - score_reference)) (a tie is 0.5);
    `win_rate_se` its standard error over the prompts; accuracies are exact-match rates of the samples."""
    gen = torch.Generator().manual_seed(seed)
    ours = sample_texts(policy, task, prompts, temperature, gen)
    theirs = sample_texts(reference, task, prompts, temperature, gen)
    judge = BradleyTerryJudge(task, beta=judge_beta)
    p = np.array([judge.prob_first(q, a, b) for q, a, b in zip(prompts, ours, theirs)])
    return {
        "win_rate": float(p.mean()),
        "win_rate_se": float(p.std(ddof=1) / np.sqrt(len(p))) if len(p) > 1 else float("nan"),
        "policy_accuracy": float(np.mean([task.correct(q, a) for q, a in zip(prompts, ours)])),
        "reference_accuracy": float(np.mean([task.correct(q, b) for q, b in zip(prompts, theirs)])),
    }
