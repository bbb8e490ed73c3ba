"""The preference path through Ray and a real Redis queue: SFT, a generation actor adding pairs to the queue,
the scripted Bradley-Terry judge labelling them, the RLlib LearnerGroup learning from them, acks after the
update. Plus the task and judge, and (slow) the learning check: win rate against the SFT reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.preference import dpo, ipo
from algorithms.preference.checks import CHECK_EVAL_PROMPTS, WIN_RATE_THRESHOLD
from algorithms.preference.loop import run_learning_check, train_preference
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.text_tasks import BradleyTerryJudge, ReverseDigits, decode, encode, make_task
from services.preferences import PreferenceQueue

SMOKE = {"pairs_per_step": 8, "sft_steps": 5}


def test_reverse_digits_scores_and_noisy_demonstrations() -> None:
    task = ReverseDigits()
    assert task.answer("307>") == "703" and task.correct("307>", "703")
    # score = matching positions - extra characters
    assert [task.score("307>", r) for r in ("703", "713", "7", "", "7030", "70399")] == [3, 2, 1, 0, 2, 1]
    assert decode(encode("12>$")) == "12>$"
    with pytest.raises(ValueError, match="not in the task vocabulary"):
        encode("1a")
    rng = np.random.default_rng(0)
    clean = task.demonstrations(200, 0.0, rng)
    assert all(task.correct(p, r) for p, r in clean)
    noisy = task.demonstrations(2000, 0.3, rng)
    wrong_chars = np.mean([sum(a != b for a, b in zip(r, task.answer(p))) / 3 for p, r in noisy])
    assert 0.24 < wrong_chars < 0.30  # 0.3 * 9/10: a random replacement is right 1 time in 10
    with pytest.raises(ValueError, match="unknown text task"):
        make_task("nope")


def test_bradley_terry_judge_prefers_by_the_hidden_score() -> None:
    task = ReverseDigits()
    judge = BradleyTerryJudge(task, beta=2.0, seed=1)
    # scores 3 vs 1: P(first) = sigmoid(2 * 2) = 0.98201
    assert judge.prob_first("307>", "703", "7") == pytest.approx(1 / (1 + math.exp(-4)))
    assert judge.prob_first("307>", "713", "703") == pytest.approx(1 / (1 + math.exp(2)))
    votes = [judge("307>", "703", "7") for _ in range(2000)]
    assert 0.97 < votes.count(0) / 2000 < 0.995
    ties = [judge("307>", "111", "222") for _ in range(2000)]
    assert 0.45 < ties.count(0) / 2000 < 0.55


@pytest.mark.parametrize("rule", [dpo.RULE, ipo.RULE])
def test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    result = train_preference(rule, steps=2, seed=0, overrides=SMOKE, queue=queue, eval_prompts=32)
    # every generated pair was labelled by the judge, learned from and acked exactly once
    assert result.pairs_acked == 16
    assert len(queue.used(queue.epoch)) == 16
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    info = queue.info()
    assert info["added"] == 16 and info["labelled"] == 16 and info["acked"] == 16
    assert len(result.history) == 2 and all(math.isfinite(h["preference_loss"]) for h in result.history)
    assert result.history[0]["logratio_margin"] == pytest.approx(0.0, abs=1e-5)  # policy = reference at first
    changed = any(not torch.equal(a, b) for a, b in zip(result.policy.state_dict().values(),
                                                          result.reference.state_dict().values()))
    assert changed, "the learner update did not reach the policy"
    assert 0.0 <= result.evaluation["win_rate"] <= 1.0


def test_unknown_options_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown option 'betta' for rule dpo"):
        train_preference(dpo.RULE, steps=1, overrides={"betta": 0.2})
    with pytest.raises(ValueError, match="beta must be > 0"):
        train_preference(ipo.RULE, steps=1, overrides={"beta": -1.0})


@pytest.mark.slow
def test_two_learners_split_each_batch(ray_session) -> None:
    """num_learners=2: two Learner actors (half a CPU each here, a GPU each on a cluster) share each batch."""
    overrides = SMOKE | {"num_learners": 2, "num_cpus_per_learner": 0.5}
    result = train_preference(dpo.RULE, steps=2, seed=0, overrides=overrides, eval_prompts=16)
    assert result.pairs_acked == 16
    assert [h["pairs"] for h in result.history] == [4.0, 4.0]  # per learner (RLlib averages over learners)
    assert result.history[0]["preference_loss"] == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", [dpo.RULE, ipo.RULE])
def test_learning_check_beats_the_sft_reference(rule, ray_session) -> None:
    report = run_learning_check(rule)
    print(report)
    assert report["eval_prompts"] == CHECK_EVAL_PROMPTS
    assert report["win_rate"] >= WIN_RATE_THRESHOLD, report
