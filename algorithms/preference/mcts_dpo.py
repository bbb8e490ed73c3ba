"""P130 MCTS-DPO: step-level iterative preference learning from tree search (Xie et al. 2024, "Monte Carlo Tree
Search Boosts Reasoning via Iterative Preference Learning").

Iteration i: MCTS with the current policy pi_{i-1} over the steps of each prompt's response (`step_search`: PUCT
selection, expansion by the policy's most likely steps, outcome validation of rollouts, backed-up Q) gives, at every
tree node s_j, the best- and worst-Q children as a step-level pair (s_j, a_w, a_l). The policy is then trained with
the step-level DPO loss, the reference being the previous iteration's policy:

    L_i = -E_{(s_j, a_w, a_l)} log sigmoid( beta [ log pi(a_w|x, s_j)/pi_{i-1}(a_w|x, s_j)
                                                   - log pi(a_l|x, s_j)/pi_{i-1}(a_l|x, s_j) ] )

and pi_i becomes the next iteration's search policy and reference (`reset_reference` after the iteration).

Choices the paper leaves open (or that the tiny task forces), and ours: a step is one character of the response
(`ReverseDigits`, as the brief allows), so log pi(a|x, s_j) is that token's log-prob; the node value is the outcome
check only (the paper adds the policy's self-evaluation of each step, which a 2-layer character model cannot give;
with a verifiable answer the outcome alone is the paper's "outcome validation"); 12 simulations, width 3, c_puct
1.0, pairs kept when their Q differ by >= 1/(2 length); 64 prompts per iteration, their pairs learned in updates of
`pairs_per_step`; iterations run until `steps` updates are done (the check: 24, as the pairwise rules). The pairs
reach the learner through the preference queue; the tree is the judge (the child with the higher Q is preferred).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from algorithms.common.sequence import pad_pairs
from algorithms.options import Option, positive
from algorithms.preference.base import PREFERENCE_OPTIONS, PreferenceConfig, VALID, pair_width
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, CHECK_PAIRS, CHECK_TASK, WIN_RATE_THRESHOLD
from algorithms.preference.dpo import dpo_loss
from algorithms.preference.generation import PairProducer, win_rate
from algorithms.preference.loop import PAIR_METRICS, PreferenceResult, redis_url, step_metrics
from algorithms.preference.module import PAIR_COLUMNS
from algorithms.preference.step_search import search, step_pairs
from algorithms.preference.structured_loop import label_everything, learn_from_queue, preference_run, run_check
from algorithms.rule import LearningCheck, Rule
from envs.text_tasks import PAD_ID, ReverseDigits, encode, make_task
from services.preferences import LabelledPair, Pair, PreferenceQueue


class MCTSDPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(dpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.simulations = 12
        self.search_width = 3
        self.c_puct = 1.0
        self.prompts_per_iteration = 64

    def validate(self) -> None:
        super().validate()
        for name in ("simulations", "search_width", "prompts_per_iteration"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                self._value_error(f"{name} must be an integer >= 1, got {value!r}")
        if self.search_width < 2:
            self._value_error(f"search_width must be >= 2 (a pair needs two children), got {self.search_width}")
        if not self.c_puct > 0:
            self._value_error(f"c_puct must be > 0, got {self.c_puct}")
        if self.pair_source != "policy":
            self._value_error("mcts_dpo searches with the current policy every iteration: pair_source must be "
                              f"'policy', got {self.pair_source!r}")


class TreeSearchProducer(PairProducer):
    """Ray actor: tree search with the current weights, step pairs (with their Q values) into the queue."""

    def search_and_add(self, n: int, simulations: int, width: int, c_puct: float,
                       timeout: float = 300.0) -> list[str]:
        prompts = self.task.prompts(n, self.rng)
        roots = search(self.model, self.task, prompts, simulations=simulations, width=width, c_puct=c_puct,
                       temperature=self.temperature, generator=self.generator)
        margin = 0.5 / self.task.length
        records = []
        for prompt, root in zip(prompts, roots):
            for pair in step_pairs(prompt, root, margin):
                records.append({**pair, "id": f"v{self.version}-{self.produced}", "policy_version": self.version})
                self.produced += 1
        return self.queue.add(records, timeout=timeout) if records else []


RemoteTreeSearchProducer = ray.remote(num_cpus=1)(TreeSearchProducer)


def tree_verdict(pair: Pair) -> int:
    """The tree as the judge: the step whose backed-up Q is higher is preferred."""
    return 0 if pair.meta["q0"] >= pair.meta["q1"] else 1


def step_pair_columns(task: ReverseDigits, pairs: Sequence[LabelledPair]) -> dict[str, np.ndarray]:
    """(B, 2, T) columns of step pairs: the prompt is task prompt + prefix, each response ONE step token (no eos
    appended: "$" is itself the eos step)."""
    width = pair_width(task)
    prompts, responses, valid = [], [], []
    for p in pairs:
        tie = p.label.preferred == "tie"
        prompt = task.prompt_ids(p.pair.prompt)
        for step in (p.pair.responses if tie else (p.chosen, p.rejected)):
            prompts.append(prompt)
            responses.append(encode(step))
        valid.append(not tie)
    padded = pad_pairs(prompts, responses, PAD_ID, side="right", length=width)
    cols = {c: padded[c].numpy().reshape(len(pairs), 2, width) for c in PAIR_COLUMNS}
    cols[VALID] = np.asarray(valid, dtype=bool)
    return cols


def train_mcts_dpo(rule: Rule, steps: int = 24, seed: int = 0, overrides: dict[str, Any] | None = None,
                   queue: PreferenceQueue | None = None, eval_prompts: int = CHECK_EVAL_PROMPTS) -> PreferenceResult:
    """SFT, then iterations of (tree search with the current policy -> step pairs -> queue -> tree judge -> step-level
    DPO updates -> ack -> reference <- policy) until `steps` updates are done."""
    with preference_run(rule, overrides, seed, lambda c: make_task(c.text_task), queue,
                        lambda: PreferenceQueue(namespace=f"pref-mcts-{uuid.uuid4().hex[:8]}")) as run:
        config, task, queue = run.config, run.task, run.store
        run.producer = RemoteTreeSearchProducer.remote(config.lm, config.text_task, queue.namespace,
                                                       redis_url(queue), config.temperature, seed)
        judge, consumer = queue.judge("tree-judge"), queue.learner("learner-driver")
        history, acked, updates, iteration = [], 0, 0, 0
        while updates < steps:
            run.sync_producer(iteration)  # the search policy pi_{i-1}
            added = len(ray.get(run.producer.search_and_add.remote(
                config.prompts_per_iteration, config.simulations, config.search_width, config.c_puct)))
            if added == 0:
                raise RuntimeError(f"iteration {iteration}: the tree search found no step pair whose Q values "
                                   "differ (every rollout scored the same)")
            label_everything(judge, tree_verdict, added, f"iteration {iteration}")
            left = added
            while left > 0 and updates < steps:
                got, results = learn_from_queue(consumer, run.group, min(config.pairs_per_step, left),
                                                config.min_idle_s, lambda b: step_pair_columns(task, b))
                left, acked, updates = left - got, acked + got, updates + 1
                if results is not None:
                    history.append({"iteration": float(iteration), **step_metrics(results, PAIR_METRICS)})
            iteration += 1
            run.group.foreach_learner(lambda learner: learner.reset_reference(1.0))  # pi_i: the next reference
        result = run.finish(updates, acked, history, eval_prompts, lambda policy, sft, prompts: win_rate(
            policy, sft, task, prompts, config.judge_beta, config.temperature, seed))
        result.evaluation["iterations"] = float(iteration)
        return result


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_check(rule, seeds, -(-CHECK_PAIRS // MCTSDPOConfig().pairs_per_step), train_mcts_dpo)


def _int_at_least(low: int):
    return lambda x: isinstance(x, int) and x >= low


RULE = Rule(
    name="mcts_dpo", family="preference", paper_ids=("P130",),
    summary="Iterative step-level DPO on preferences from Monte Carlo tree search with outcome validation",
    config_class=MCTSDPOConfig,
    options=(*[o for o in PREFERENCE_OPTIONS if o.name != "pair_source"],
             Option("simulations", "tree-search simulations per prompt", _int_at_least(1), ">= 1"),
             Option("search_width", "children per expanded node", _int_at_least(2), ">= 2"),
             Option("c_puct", "PUCT exploration constant", positive, "> 0"),
             Option("prompts_per_iteration", "prompts searched per iteration", _int_at_least(1), ">= 1")),
    learning_check=LearningCheck(
        env=CHECK_TASK, steps=CHECK_PAIRS, threshold=WIN_RATE_THRESHOLD,
        source=("P130: the iteratively trained policy must beat its SFT start under the scripted Bradley-Terry judge "
                f"(the paper reports accuracy gains over the SFT model); up to {CHECK_PAIRS} step pairs (24 updates "
                "of 64), 0.6 = the shared pairwise threshold (9 SE above 0.5)")),
    smoke_overrides={"pairs_per_step": 8, "sft_steps": 5, "prompts_per_iteration": 4, "simulations": 4},
    check_runner="algorithms.preference.mcts_dpo:run_learning_check",
)
