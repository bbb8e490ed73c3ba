"""Guided decoding (GenARM P065, VAS P208): the math on hand-computed numbers, the losses, the run directory,
and both rules through Ray and a real Redis preference queue; (slow) their learning checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from algorithms.common.guided_decoding import GuidedLM, genarm_scores, td_lambda_targets, token_values, vas_scores
from algorithms.common.sequence import build_causal_lm, sample_responses
from algorithms.preference import genarm, vas
from algorithms.preference.base import TINY_LM
from algorithms.preference.guided_loop import (
    GuidedRun, load_guided_run, reward_verdict, run_guided_check, save_guided_run, train_guided,
)
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.text_tasks import EOS_ID, PAD_ID, VOCAB, ReverseDigits
from services.preferences import Pair, PreferenceQueue

LOG = math.log


# ---- the decoding rules --------------------------------------------------------------------------------


def test_genarm_scores_multiply_base_and_arm_probabilities() -> None:
    base = torch.tensor([[LOG(1.0), LOG(3.0)]])  # pi_base = [0.25, 0.75]
    arm = torch.tensor([[LOG(3.0), LOG(1.0)]])  # pi_r = [0.75, 0.25]
    # strength 1: pi_base * pi_r = [0.1875, 0.1875] -> [0.5, 0.5]
    assert torch.softmax(genarm_scores(base, arm, 1.0), -1) == pytest.approx(torch.tensor([[0.5, 0.5]]))
    # strength 2: [0.25 * 0.75^2, 0.75 * 0.25^2] = [0.140625, 0.046875] -> [0.75, 0.25]
    assert torch.softmax(genarm_scores(base, arm, 2.0), -1) == pytest.approx(torch.tensor([[0.75, 0.25]]))
    # strength 0: the base itself
    assert torch.softmax(genarm_scores(base, arm, 0.0), -1) == pytest.approx(torch.tensor([[0.25, 0.75]]))


def test_vas_scores_reweight_the_top_k_only() -> None:
    base = torch.tensor([[LOG(0.5), LOG(0.3), LOG(0.2)]])
    q = torch.tensor([[1.0, 0.0, 5.0]])  # the best value is outside the top 2: it must stay out
    p = torch.softmax(vas_scores(base, q, 1.0, top_k=2), -1)
    # [0.5 e^1, 0.3 e^0, 0] / (0.5 e + 0.3) = [0.81919, 0.18081, 0]
    expected = torch.tensor([[0.5 * math.e, 0.3, 0.0]]) / (0.5 * math.e + 0.3)
    assert p == pytest.approx(expected, abs=1e-6)
    # top_k = 3 lets the third in: [0.5e, 0.3, 0.2 e^5] / sum
    p3 = torch.softmax(vas_scores(base, q, 1.0, top_k=3), -1)
    weights = torch.tensor([0.5 * math.e, 0.3, 0.2 * math.exp(5)])
    assert p3 == pytest.approx((weights / weights.sum()).unsqueeze(0), abs=1e-6)


def test_td_lambda_targets_by_hand() -> None:
    # row 0: a 2-token response at positions 1, 2 (position 3 padding), Q = [1, 2], r = 3
    # row 1: a 3-token response at positions 1..3, Q = [0, 1, 1], r = 0
    q = torch.tensor([[9.0, 1.0, 2.0, 7.0], [9.0, 0.0, 1.0, 1.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, True]])
    r = torch.tensor([3.0, 0.0])
    # lambda 0.5: row 0: G_2 = 3, G_1 = 0.5 * 2 + 0.5 * 3 = 2.5
    #             row 1: G_3 = 0, G_2 = 0.5 * 1 + 0.5 * 0 = 0.5, G_1 = 0.5 * 1 + 0.5 * 0.5 = 0.75
    assert td_lambda_targets(q, mask, r, 0.5) == pytest.approx(
        torch.tensor([[0.0, 2.5, 3.0, 0.0], [0.0, 0.75, 0.5, 0.0]]))
    # lambda 1: Monte-Carlo, every response target is r; lambda 0: one-step TD, the next token's Q
    assert td_lambda_targets(q, mask, r, 1.0) == pytest.approx(torch.tensor([[0, 3, 3, 0], [0, 0, 0, 0.0]]))
    assert td_lambda_targets(q, mask, r, 0.0) == pytest.approx(torch.tensor([[0, 2, 3, 0], [0, 1, 1, 0.0]]))
    with pytest.raises(ValueError, match="lambda"):
        td_lambda_targets(q, mask, r, 1.5)


def test_arm_loss_by_hand() -> None:
    # sum log pi_r: chosen -1, rejected -3, beta_r 0.5: margin 1, loss -log sigmoid(1) = log(1 + e^-1) = 0.313262
    terms = genarm.arm_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]), 0.5)
    assert terms["reward_margin"] == pytest.approx(torch.tensor([1.0, -1.0]))
    assert terms["loss"] == pytest.approx(torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.e)]))


class _UniformLM(torch.nn.Module):
    """Logits all equal: every next token has probability 1 / 14 (the task's vocabulary)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(VOCAB)))


def test_arm_rewards_and_accuracy_by_hand() -> None:
    task, uniform = ReverseDigits(), _UniformLM()
    # 14 tokens in VOCAB (_ ^ $ > 0-9). "70" + eos = 3 response tokens, each log(1/14) = -2.639057:
    # r = beta_r * 3 * -log 14 = 0.5 * -7.917172 = -3.958586;
    # "70312" is cut at max_new_tokens = 5 (no eos): 5 tokens, r = 0.5 * 5 * -log 14 = -6.597643
    r = genarm.arm_rewards(uniform, task, ["307>", "307>"], ["70", "70312"], 0.5)
    assert r == pytest.approx([-3.958586, -6.597643], rel=1e-5)
    # The uniform ARM's reward is -beta_r * (tokens) * log 14: it prefers the shorter response. Hidden scores (answer
    # "703"): "703" 3 vs "7" 1 (4 vs 2 tokens: prefers "7", wrong); "1" 0 vs "713" 2 (prefers "1", wrong);
    # "70" 2 vs "7" 1 (prefers "7", wrong): accuracy 0 / 3.
    prompts, first, second = ["307>"] * 3, ["703", "1", "70"], ["7", "713", "7"]
    assert genarm.arm_accuracy(uniform, task, prompts, first, second)["accuracy"] == 0.0
    # minus itself: every reward difference is 0, a model tie counts half
    assert genarm.arm_accuracy(uniform, task, prompts, first, second, minus=uniform)["accuracy"] == 0.5
    # a pair of equal hidden scores carries no order and is left out
    assert genarm.arm_accuracy(uniform, task, ["307>"], ["7"], ["100"])["scored_pairs"] == 0


def test_vas_value_loss_by_hand() -> None:
    q = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    terms = vas.vas_value_loss(q, mask, torch.tensor([3.0]), 0.5)
    # targets [2.5, 3]: ((1 - 2.5)^2 + (2 - 3)^2) / 2 = (2.25 + 1) / 2 = 1.625
    assert float(terms["loss"].detach()) == pytest.approx(1.625)
    terms["loss"].backward()  # the targets are not differentiated: dL/dQ = (Q - G) over 2 tokens
    assert q.grad == pytest.approx(torch.tensor([[0.0, -1.5, -1.0]]))


def test_value_model_reads_q_per_token_and_starts_at_zero() -> None:
    torch.manual_seed(0)
    base = build_causal_lm(TINY_LM)
    value = vas.build_value_model(TINY_LM, base)
    ids = torch.tensor([[1, 5, 6, 3, 7]])
    assert torch.equal(token_values(value, ids, torch.ones_like(ids)), torch.zeros(1, 5))
    with torch.no_grad():
        value.get_output_embeddings().weight[7, 0] = 1.0  # Q(., token 7) = first hidden feature: moves row 0, col 4
    q = token_values(value, ids, torch.ones_like(ids))
    assert q[0, 4] != 0 and torch.equal(q[0, :4], torch.zeros(4))  # only the position whose token is 7
    # the body is the base's, the head is untied from the embeddings
    assert torch.equal(value.transformer.wte.weight, base.transformer.wte.weight)
    assert value.get_output_embeddings().weight.data_ptr() != value.transformer.wte.weight.data_ptr()


def test_guided_lm_samples_with_any_sampler() -> None:
    torch.manual_seed(0)
    base, guide = build_causal_lm(TINY_LM), build_causal_lm(TINY_LM)
    ids = torch.tensor([[1, 5, 6, 3]])
    mask = torch.ones_like(ids)
    plain = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits, -1)
    assert torch.allclose(GuidedLM(base, guide, "genarm", 0.0)(ids, mask).logits, plain, atol=1e-6)
    # VAS with top_k = 1 is greedy decoding of the base whatever the value says
    greedy = sample_responses(base, [[1, 5, 6, 3]], max_new_tokens=4, eos_id=EOS_ID, pad_id=PAD_ID, temperature=0)
    vas_lm = GuidedLM(base, guide, "vas", 5.0, top_k=1)
    sampled = sample_responses(vas_lm, [[1, 5, 6, 3]], max_new_tokens=4, eos_id=EOS_ID, pad_id=PAD_ID,
                               generator=torch.Generator().manual_seed(0))
    assert sampled == greedy
    with pytest.raises(ValueError, match="guide must be one of"):
        GuidedLM(base, guide, "beam", 1.0)
    with pytest.raises(ValueError, match="top_k"):
        GuidedLM(base, guide, "vas", 1.0)
    with pytest.raises(ValueError, match="strength"):
        GuidedLM(base, guide, "genarm", -1.0)


def test_reward_verdict_prefers_the_higher_score() -> None:
    verdict = reward_verdict(ReverseDigits())
    assert verdict(Pair(prompt="307>", responses=["703", "7"], policy_version=0)) == 0
    assert verdict(Pair(prompt="307>", responses=["1", "713"], policy_version=0)) == 1
    assert verdict(Pair(prompt="307>", responses=["7", "100"], policy_version=0)) == "tie"  # 1 vs 1


def test_bad_options_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="unknown option 'topk' for rule vas"):
        train_guided(vas.RULE, steps=1, overrides={"topk": 3})
    with pytest.raises(ValueError, match="pair_source must be 'reference'"):
        train_guided(vas.RULE, steps=1, overrides={"pair_source": "policy"})
    with pytest.raises(ValueError, match="td_lambda must be in"):
        train_guided(vas.RULE, steps=1, overrides={"td_lambda": 2.0})
    with pytest.raises(ValueError, match="guide_strength must be >= 0"):
        train_guided(genarm.RULE, steps=1, overrides={"guide_strength": -1.0})
    with pytest.raises(ValueError, match="pair_source must be 'reference'"):
        train_guided(genarm.RULE, steps=1, overrides={"pair_source": "policy"})
    with pytest.raises(ValueError, match="arm_epochs must be an integer >= 1"):
        train_guided(genarm.RULE, steps=1, overrides={"arm_epochs": 0})
    for grid in ((), (0.5, -1.0), (True,)):
        with pytest.raises(ValueError, match="strength_grid must be a non-empty list"):
            train_guided(genarm.RULE, steps=1, overrides={"strength_grid": grid})


# ---- run directories -------------------------------------------------------------------------------------


def _tiny_run(kind: str) -> GuidedRun:
    torch.manual_seed(0)
    base = build_causal_lm(TINY_LM)
    if kind == "vas":
        guide = vas.build_value_model(TINY_LM, base)
        return GuidedRun("vas", dict(TINY_LM), {**TINY_LM, "tie_word_embeddings": False}, "reverse-digits", base,
                         guide, 3.0, 10)
    return GuidedRun("genarm", dict(TINY_LM), dict(TINY_LM), "reverse-digits", base, build_causal_lm(TINY_LM), 1.0)


@pytest.mark.parametrize("kind", ["genarm", "vas"])
def test_run_directory_round_trip(kind: str, tmp_path) -> None:
    run = _tiny_run(kind)
    loaded = load_guided_run(save_guided_run(run, tmp_path / kind))
    assert (loaded.kind, loaded.strength, loaded.top_k) == (run.kind, run.strength, run.top_k)
    for a, b in ((run.base, loaded.base), (run.guide, loaded.guide)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_run_directories_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="guided.json is missing"):
        load_guided_run(tmp_path)
    directory = save_guided_run(_tiny_run("genarm"), tmp_path / "run")
    meta = json.loads((directory / "guided.json").read_text())
    for bad, message in (({"kind": "beam"}, "kind must be one of"), ({"strength": -1}, "strength"),
                         ({"lm": {"path": "/elsewhere", "model_type": "gpt2"}}, "no 'path'"),
                         ({"task": "nope"}, "unknown text task")):
        (directory / "guided.json").write_text(json.dumps(meta | bad))
        with pytest.raises(ValueError, match=message):
            load_guided_run(directory)
    (directory / "guided.json").write_text(json.dumps(meta))
    (directory / "guide.safetensors").write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle: never unpickled
    with pytest.raises(ValueError, match="guide.safetensors: cannot load weights"):
        load_guided_run(directory)


# ---- through Ray and the Redis queue ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", [genarm.RULE, vas.RULE], ids=lambda r: r.name)
def test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    run = train_guided(rule, steps=2, seed=0, overrides=dict(rule.smoke_overrides), queue=queue)
    # every pair the generation actor added was labelled, consumed by the learner and acked exactly once
    assert run.pairs_acked == 16
    assert len(queue.used(queue.epoch)) == 16
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    assert all(math.isfinite(x) for x in run.history) and run.history
    if rule is genarm.RULE:  # one update per batch and pass (2 batches, arm_epochs 2); strength from the grid
        assert len(run.history) == 4
        assert set(run.validation) == {"0.5", "1"} and run.strength in (0.5, 1.0)
        assert run.strength == max((0.5, 1.0), key=lambda s: run.validation[f"{s:g}"])
    untrained = run.untrained_guide()
    changed = any(not torch.equal(a, b) for a, b in zip(run.guide.state_dict().values(),
                                                        untrained.state_dict().values()))
    assert changed, "training did not reach the guide"
    decoder = run.decoder()
    prompts = [ReverseDigits().prompt_ids("307>")] * 4
    out = sample_responses(decoder, prompts, max_new_tokens=5, eos_id=EOS_ID, pad_id=PAD_ID,
                           generator=torch.Generator().manual_seed(0))
    assert len(out) == 4 and all(1 <= len(r) <= 5 for r in out)


@pytest.mark.slow
@pytest.mark.parametrize("rule", [genarm.RULE, vas.RULE], ids=lambda r: r.name)
def test_learning_check_the_trained_guide_beats_the_untrained_one_and_sft(rule, ray_session) -> None:
    report = run_guided_check(rule)
    print(report)
    assert report["passed"], report
    for seed in report["per_seed"]:
        assert seed["win_rate_vs_control"] >= report["threshold"] and seed["win_rate"] >= report["threshold"], seed
