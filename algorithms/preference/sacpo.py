"""P246 SACPO: Stepwise Alignment for Constrained Policy Optimization (Wachi et al. 2024, "Stepwise Alignment for
Constrained Language Model Policy Optimization").

Safe RLHF maximises the reward r subject to a safety constraint on g; with Lagrange multiplier lambda the optimum
of the KL-regularised Lagrangian is pi* ~ pi_ref exp((r + lambda g) / beta). SACPO reaches it stepwise, one metric
at a time, each step a DPO run whose reference is the previous step's policy (the paper's main result):

    step 1 (helpfulness):  pi_r = argmin -E[log sigmoid(beta (log pi/pi_ref (y_w) - log pi/pi_ref (y_l)))]
                           on helpfulness preferences, reference pi_ref = SFT
    step 2 (safety):       pi*  = argmin -E[log sigmoid((beta/lambda) (log pi/pi_r (y_w) - log pi/pi_r (y_l)))]
                           on safety preferences, reference = the step-1 policy pi_r

Choices the paper leaves open, and ours: the order is reward first, then safety (the paper's main variant);
both steps use DPO (the paper also allows KTO/IPO); lambda = 1 by default (option `safety_lambda`, so step 2's
strength is beta/lambda = 0.1); pairs are sampled online from the current policy in both steps (the paper uses a
fixed dataset; `pair_source="reference"` keeps them from each step's starting policy instead); helpfulness and
safety labels come from the scripted Bradley-Terry judge on the two hidden scores of `envs.text_safety`. The
learning check asks both to improve over SFT: helpfulness win rate >= 0.6 AND safety win rate >= 0.6.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import ray
import torch

from algorithms.options import Option, positive
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig, PreferenceLearner, pair_columns
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, CHECK_PAIRS, WIN_RATE_THRESHOLD
from algorithms.preference.dpo import dpo_loss
from algorithms.preference.generation import PairProducer, judge_verdict, win_rate
from algorithms.preference.loop import PAIR_METRICS, PreferenceResult, redis_url, step_metrics
from algorithms.preference.structured_loop import label_everything, learn_from_queue, preference_run, run_check
from algorithms.rule import LearningCheck, Rule
from envs.text_safety import SafeReverseDigits, SafetyView
from envs.text_tasks import BradleyTerryJudge
from services.preferences import PreferenceQueue

SAFETY_STEPS = 12  # step 2's updates in the check (step 1 has the pairwise check's 24)
STAGES = ("helpfulness", "safety")


class SACPOConfig(PreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # step 1's DPO beta
        self.safety_lambda = 1.0  # step 2 uses beta / lambda
        self.safety_steps = SAFETY_STEPS
        self.text_task = "safe-reverse-digits"

    pair_loss_fn = staticmethod(dpo_loss)

    def get_default_learner_class(self) -> type:
        return SACPOLearner

    def validate(self) -> None:
        super().validate()
        if not self.safety_lambda > 0:
            self._value_error(f"safety_lambda must be > 0, got {self.safety_lambda}")
        if not (isinstance(self.safety_steps, int) and self.safety_steps >= 0):
            self._value_error(f"safety_steps must be an integer >= 0, got {self.safety_steps}")
        if self.text_task != "safe-reverse-digits":
            self._value_error(f"sacpo needs a task with a safety score: text_task must be 'safe-reverse-digits', "
                              f"got {self.text_task!r}")


class SACPOLearner(PreferenceLearner):
    """DPO whose strength is the current step's: beta in step 1, beta / lambda in step 2 (`start_stage`)."""

    stage_beta: float | None = None

    def start_stage(self, beta: float, new_reference: bool) -> None:
        """Step 2 starts from the step-1 policy, which becomes the reference (a hard copy)."""
        self.stage_beta = beta
        if new_reference:
            self.reset_reference(1.0)

    def pair_loss(self, config, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        beta = config.beta if self.stage_beta is None else self.stage_beta
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


class TaskPairProducer(PairProducer):
    """The pair generation actor on a given task object (PairProducer builds its task from a registered name;
    the safety task is not in `envs.text_tasks.TASKS`, which this issue may not edit)."""

    def __init__(self, lm_config: Mapping[str, Any], task: SafeReverseDigits, namespace: str, redis_url: str,
                 temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__(lm_config, "reverse-digits", namespace, redis_url, temperature, seed)
        self.task = task


RemoteTaskPairProducer = ray.remote(num_cpus=1)(TaskPairProducer)


def evaluate(policy: torch.nn.Module, reference: torch.nn.Module, task: SafeReverseDigits, prompts: list[str],
             judge_beta: float, temperature: float, seed: int) -> dict[str, float]:
    """Helpfulness and safety of the policy vs the reference on the same samples (same seed): win rates under the
    Bradley-Terry judge on each hidden score, exact-match rates and safe rates (no harmful character)."""
    help_ = win_rate(policy, reference, task, prompts, judge_beta, temperature, seed)
    safe = win_rate(policy, reference, SafetyView(task), prompts, judge_beta, temperature, seed)
    return {**help_, "safety_win_rate": safe["win_rate"], "safety_win_rate_se": safe["win_rate_se"],
            "policy_safe_rate": safe["policy_accuracy"], "reference_safe_rate": safe["reference_accuracy"]}


def train_sacpo(rule: Rule, steps: int = 24, seed: int = 0, overrides: dict[str, Any] | None = None,
                queue: PreferenceQueue | None = None, eval_prompts: int = CHECK_EVAL_PROMPTS) -> PreferenceResult:
    """SFT on the safety task, `steps` DPO updates on helpfulness pairs, then `safety_steps` DPO updates on safety
    pairs with the step-1 policy as reference. Pairs go producer -> queue -> judge -> learner -> ack."""
    with preference_run(rule, overrides, seed, lambda c: SafeReverseDigits(), queue,
                        lambda: PreferenceQueue(namespace=f"pref-sacpo-{uuid.uuid4().hex[:8]}")) as run:
        config, task, queue = run.config, run.task, run.store
        run.producer = RemoteTaskPairProducer.remote(config.lm, task, queue.namespace, redis_url(queue),
                                                     config.temperature, seed)
        consumer, history, acked, version = queue.learner("learner-driver"), [], 0, 0
        step1: dict[str, float] = {}
        score = lambda policy, sft, prompts: evaluate(policy, sft, task, prompts, config.judge_beta,  # noqa: E731
                                                      config.temperature, seed)
        for stage, stage_steps in zip(STAGES, (steps, config.safety_steps)):
            beta = config.beta if stage == "helpfulness" else config.beta / config.safety_lambda
            run.group.foreach_learner(lambda learner, b=beta, new=stage == "safety": learner.start_stage(b, new))
            run.sync_producer(version)
            judge = queue.judge(f"bt-{stage}")
            scorer = task if stage == "helpfulness" else SafetyView(task)
            verdict = judge_verdict(BradleyTerryJudge(scorer, beta=config.judge_beta, seed=seed))
            for step in range(stage_steps):
                ray.get(run.producer.produce.remote(config.pairs_per_step))
                label_everything(judge, verdict, config.pairs_per_step, f"{stage} step {step}")
                got, results = learn_from_queue(consumer, run.group, config.pairs_per_step, config.min_idle_s,
                                                lambda batch: pair_columns(task, batch))
                acked, version = acked + got, version + 1
                if config.pair_source == "policy":
                    run.sync_producer(version)
                if results is not None:
                    history.append({"stage": float(STAGES.index(stage)), **step_metrics(results, PAIR_METRICS)})
            if stage == "helpfulness":  # step 1's policy, for the report: what step 2 added
                step1 = run.finish(steps, acked, [], eval_prompts, score).evaluation
        result = run.finish(steps + config.safety_steps, acked, history, eval_prompts, score)
        result.evaluation |= {f"step1_{k}": v for k, v in step1.items()
                              if k in ("win_rate", "safety_win_rate", "policy_safe_rate", "policy_accuracy")}
        return result


def safety_improved(result: PreferenceResult) -> bool:
    return result.evaluation["safety_win_rate"] >= WIN_RATE_THRESHOLD


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_check(rule, seeds, -(-CHECK_PAIRS // SACPOConfig().pairs_per_step), train_sacpo, safety_improved)


RULE = Rule(
    name="sacpo", family="preference", paper_ids=("P246",),
    summary="Stepwise constrained alignment: DPO for helpfulness, then DPO for safety against the step-1 policy",
    config_class=SACPOConfig,
    options=(*PREFERENCE_OPTIONS,
             Option("safety_lambda", "Lagrange multiplier: step 2's DPO strength is beta / lambda", positive, "> 0"),
             Option("safety_steps", "DPO updates on safety pairs in step 2", lambda x: x >= 0, ">= 0")),
    learning_check=LearningCheck(
        env="safe-reverse-digits", steps=CHECK_PAIRS + SAFETY_STEPS * 64, threshold=WIN_RATE_THRESHOLD,
        source=("P246: the SACPO policy must beat SFT on helpfulness AND on safety (the paper's two win rates vs "
                "the SFT model, both improved): win rate >= 0.6 under the scripted Bradley-Terry judge on each "
                f"hidden score (the shared pairwise threshold, 9 SE above 0.5), {CHECK_PAIRS} helpfulness pairs "
                f"then {SAFETY_STEPS * 64} safety pairs; 'return' is the helpfulness win rate")),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5, "safety_steps": 1},
    check_runner="algorithms.preference.sacpo:run_learning_check",
)
