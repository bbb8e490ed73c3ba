"""f-DPO's own learning check (P073, algorithms/preference/f_dpo_check.py): the entropy measure on hand-computed
distributions, the verdict on tiny numbers, the rule's declaration. Slow (each training starts a generation actor:
10-20 s on the shared machine): the check's runner end to end on a tiny budget through Ray and the Redis queue,
JS / forward KL / reverse KL through the queue with its invariants (the default alpha's smoke run is in the default
suite: tests/test_preference_losses.py), and the learning check itself (also `rlfleet verify --algo f_dpo`)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algorithms.preference import f_dpo
from algorithms.preference.f_dpo_check import (BASELINE_DIVERGENCE, CHECK_DIVERGENCES, NO_IMPROVEMENT, SCORE, Z,
                                               diversity, mean_and_se, response_entropies, run_f_dpo_check, verdict)
from algorithms.preference.loop import train_preference
from algorithms.registry import RULES
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.text_tasks import EOS_ID, VOCAB, ReverseDigits
from services.preferences import PreferenceQueue

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SMOKE = {"pairs_per_step": 8, "sft_steps": 5}


class FixedLM(torch.nn.Module):
    """A causal LM stand-in whose next-token logits are the same at every position (like transformers' output)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.row = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, len(self.row)).clone())


def two_token_logits(first: int, second: int, log_odds: float) -> list[float]:
    """Logits with all the mass on two tokens, odds e^log_odds : 1 (-1e9 elsewhere: probability 0, no NaN)."""
    row = [-1e9] * len(VOCAB)
    row[first], row[second] = log_odds, 0.0
    return row


# ---------------------------------------------------------------- the entropy of a response distribution


def test_response_entropies_by_hand() -> None:
    # odds 3 : 1 -> p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335 nats
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert h == pytest.approx(0.562335, abs=1e-6)
    model = FixedLM(two_token_logits(4, EOS_ID, math.log(3)))
    prompts = [[1, 4, 5, 6, 3], [1, 4, 3]]  # different lengths: the rows are padded differently
    responses = [[4, 4, EOS_ID], [EOS_ID]]
    # each response token was drawn from a distribution of entropy h: 3 h for the first row, h for the second
    got = response_entropies(model, prompts, responses)
    assert torch.allclose(got, torch.tensor([3 * h, h]), atol=1e-5)
    # temperature 2 flattens the odds to sqrt(3) : 1 -> p = sqrt3 / (1 + sqrt3) = 0.633975
    p = math.sqrt(3) / (1 + math.sqrt(3))
    h2 = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # 0.656955
    assert torch.allclose(response_entropies(model, prompts, responses, temperature=2.0),
                          torch.tensor([3 * h2, h2]), atol=1e-5)
    # a uniform next token over the whole vocabulary: log |V| per response token
    uniform = FixedLM([0.0] * len(VOCAB))
    assert torch.allclose(response_entropies(uniform, prompts, responses),
                          torch.tensor([3 * math.log(len(VOCAB)), math.log(len(VOCAB))]), atol=1e-5)


def test_diversity_separates_a_deterministic_policy_from_a_spread_one() -> None:
    task = ReverseDigits()
    prompts = ["123>", "456>", "789>"]
    # always "4" then... the same token until max_new_tokens: one response per prompt, entropy 0
    sure = diversity(FixedLM(two_token_logits(4, EOS_ID, 50.0)), task, prompts, samples=8, temperature=1.0, seed=0)
    assert np.allclose(sure["entropy"], 0.0, atol=1e-6) and np.allclose(sure["distinct"], 1 / 8)
    # a fair coin between "4" and eos at every position: responses "", "4", "44", ...: several distinct ones;
    # entropy of a sampled response = (tokens drawn) * ln 2, its mean over 8 samples is near 2 ln 2 (expected
    # tokens drawn for a geometric stop at p = 1/2 capped at 5 = 1.9375)
    coin = diversity(FixedLM(two_token_logits(4, EOS_ID, 0.0)), task, prompts, samples=8, temperature=1.0, seed=0)
    assert np.all(coin["distinct"] > 1 / 8)
    assert np.all(coin["entropy"] > 0.0) and np.all(coin["entropy"] <= 5 * math.log(2) + 1e-6)
    multiples = coin["entropy"] / math.log(2) * 8  # sums of whole token counts over the 8 samples
    assert np.allclose(multiples, np.round(multiples), atol=1e-4)


# ---------------------------------------------------------------- the verdict on tiny numbers


def test_mean_and_se_by_hand() -> None:
    # [0.1, 0.2, 0.3, 0.2]: mean 0.2; sample variance (0.01 + 0 + 0.01 + 0) / 3 = 0.006667, sd 0.081650,
    # SE = 0.081650 / 2 = 0.040825
    mean, se = mean_and_se(np.array([0.1, 0.2, 0.3, 0.2]))
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.0408248, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        mean_and_se(np.array([1.0]))


def test_verdict_passes_only_when_both_halves_of_the_claim_hold() -> None:
    gains = np.array([0.1, 0.2, 0.3, 0.2])  # mean 0.2, SE 0.040825 -> lower bound 0.2 - 1.96 * 0.040825 = 0.119984
    # win rate 0.60 +- 0.011 -> lower bound 0.60 - 1.96 * 0.011 = 0.57844 > 0.5
    out = verdict(0.60, 0.011, gains)
    assert out["win_rate_lower"] == pytest.approx(0.57844)
    assert out["entropy_gain"] == pytest.approx(0.2) and out["entropy_gain_lower"] == pytest.approx(0.119984, abs=1e-6)
    assert out["improves_on_sft"] and out["more_diverse"] and out["reached"]
    # 0.52 +- 0.011: above 0.5 but its lower bound 0.49844 is not: no measurable improvement over SFT
    out = verdict(0.52, 0.011, gains)
    assert out["win_rate_lower"] == pytest.approx(0.49844)
    assert not out["improves_on_sft"] and out["more_diverse"] and not out["reached"]
    # gains [0.1, -0.1, 0.2, -0.15]: mean 0.0125; squared deviations 0.0076563 + 0.0126563 + 0.0351563 + 0.0264063
    #   = 0.081875, / 3 = 0.0272917, sd 0.165202, SE 0.082601 -> lower bound 0.0125 - 0.161898 = -0.149398
    out = verdict(0.70, 0.011, np.array([0.1, -0.1, 0.2, -0.15]))
    assert out["entropy_gain_lower"] == pytest.approx(-0.149398, abs=1e-6)
    assert out["improves_on_sft"] and not out["more_diverse"] and not out["reached"]
    # less diverse than reverse KL (all gains negative) fails however well it aligns
    assert not verdict(0.90, 0.005, -gains)["reached"]
    with pytest.raises(ValueError, match="win rate must be in"):
        verdict(1.2, 0.01, gains)
    with pytest.raises(ValueError, match="win rate must be in"):
        verdict(0.6, -0.01, gains)


# ---------------------------------------------------------------- the rule declares this check


def test_f_dpo_declares_its_own_check() -> None:
    rule = RULES["f_dpo"]
    assert rule is f_dpo.RULE and rule.paper_ids == ("P073",)
    assert rule.check_runner == "algorithms.preference.f_dpo_check:run_f_dpo_check"
    check = rule.learning_check
    assert check.threshold == NO_IMPROVEMENT == 0.5 and check.score == SCORE and check.steps == 1536
    assert "P073" in check.source and "trade-off" in check.source
    config = rule.config_class()
    assert (config.divergence, config.alpha, config.beta) == ("alpha", 0.5, 0.1)
    assert config.divergence != BASELINE_DIVERGENCE and set(CHECK_DIVERGENCES) == {"reverse_kl", "alpha", "js",
                                                                                   "forward_kl"}


# ---------------------------------------------------------------- through Ray and the Redis queue


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "forward_kl"])  # alpha: tests/test_preference_losses.py
def test_every_divergence_through_ray_and_the_redis_queue(divergence, ray_session, rclient,  # noqa: F811
                                                          namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    result = train_preference(f_dpo.RULE, steps=2, seed=0, overrides=SMOKE | {"divergence": divergence},
                              queue=queue, eval_prompts=16)
    assert result.pairs_acked == 16 and len(queue.used(queue.epoch)) == 16
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    # policy = reference at the first update: u = 1, both f'(u) equal, margin 0, loss log 2 for every divergence
    assert result.history[0]["preference_loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert math.isfinite(result.history[1]["preference_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(result.policy.state_dict().values(),
                                                      result.reference.state_dict().values()))


@pytest.mark.slow  # two trainings, each with its own generation actor: about 40 s here, plus Ray's start
def test_the_check_runs_end_to_end_on_a_tiny_budget(ray_session) -> None:
    """The runner's row on 16 pairs (nothing learnt: the verdict is not asserted, only that it is the verdict of
    the row's own numbers, and that reverse KL and the default were trained on the same seed's reference). Each
    run goes through Ray and the Redis queue: its 16 pairs were labelled, learnt from and acked."""
    row = run_f_dpo_check(f_dpo.RULE, seeds=1, overrides=SMOKE, eval_prompts=16, pairs=16, others=False)
    assert row["rule"] == "f_dpo" and row["threshold"] == 0.5 and row["score"] == SCORE
    assert row["divergences"] == ["reverse_kl", "alpha"]
    seed = row["per_seed"][0]
    runs = seed["runs"]
    assert set(runs) == {"reverse_kl", "alpha"} and all(r["pairs"] == 16 for r in runs.values())
    # the same SFT policy under both (its diversity is measured with the same seed: equal only if it is the same)
    assert runs["reverse_kl"]["sft_entropy"] == runs["alpha"]["sft_entropy"] == seed["sft_entropy"]
    assert seed["return"] == pytest.approx(seed["win_rate"] - Z * seed["win_rate_se"])
    assert seed["entropy_gain"] == pytest.approx(runs["alpha"]["entropy_gain_vs_reverse_kl"])
    assert seed["reached"] == (seed["return"] > 0.5 and seed["entropy_gain_lower"] > 0)
    assert row["passed"] == seed["reached"] and row["return_mean"] == seed["return"]


# ---------------------------------------------------------------- the learning check (slow)


@pytest.mark.slow
def test_learning_check_holds_the_papers_trade_off(ray_session) -> None:
    report = run_f_dpo_check(f_dpo.RULE)
    print(report)
    assert report["passed"], report
