"""Pairwise preference rules that are a new per-pair loss on the shared loop: f-DPO (P073), RPO (P043), WPO (P227),
EXO (P187), SSPO (P129), SPAC (P249). Each loss on a hand-computed batch, edge cases, one real RLlib Learner update
per rule, a smoke run through Ray and the Redis queue, the papers of these families without a rule, and (slow)
the learning checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.common.f_divergences import f_prime
from algorithms.common.pair_rows import removal_degrees, score_responses, split_rows
from algorithms.common.sequence import build_causal_lm, pad_pairs, sequence_logprobs
from algorithms.preference import dpo, exo, f_dpo, rpo, spac, sspo, wpo
from algorithms.preference.base import TINY_LM, learner_batch
from algorithms.preference.checks import WIN_RATE_THRESHOLD
from algorithms.preference.loop import run_learning_check, train_preference
from algorithms.preference.papers_without_rule import PAPERS_WITHOUT_RULE
from algorithms.registry import PAPERS_WITHOUT_RULE as REGISTERED
from algorithms.registry import RULES
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
import test_preference_loop as preference_loop_tests  # its smoke checks, reused for these rules
from envs.text_tasks import EOS_ID, PAD_ID, TOKEN_ID, ReverseDigits
from rlfleet.papers import load_papers, paper_statuses
from services.preferences import Label, LabelledPair, Pair

NEW_RULES = [f_dpo.RULE, rpo.RULE, wpo.RULE, exo.RULE, sspo.RULE, spac.RULE]
sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# The batch of tests/test_dpo_ipo.py: (policy chosen, policy rejected, reference chosen, reference rejected).
#   pair 0: chosen log-ratio l_w = -1 - -2 = 1, rejected l_l = -3 - -2 = -1, h = 2
#   pair 1: l_w = -2 - -1 = -1, l_l = -1 - -2 = 1, h = -2
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


# ---------------------------------------------------------------- f-DPO (P073)

def test_f_prime_by_hand() -> None:
    l = torch.tensor([0.0, 1.0, -1.0])
    # reverse KL: log u + 1
    assert torch.allclose(f_prime(l, "reverse_kl"), torch.tensor([1.0, 2.0, 0.0]))
    # forward KL: -1/u = -exp(-l): -1, -e^-1, -e
    assert torch.allclose(f_prime(l, "forward_kl"), torch.tensor([-1.0, -math.exp(-1), -math.e]))
    # JS: log(2u / (1 + u)): u = 1 -> log 1 = 0; u = e -> log(2e / (1 + e)) = 0.380044
    assert torch.allclose(f_prime(l, "js"), torch.tensor([0.0, math.log(2 * math.e / (1 + math.e)),
                                                          math.log(2 / (math.e + 1))]))
    # alpha = 0.5: (1 - u^-0.5) / 0.5: u = 1 -> 0; u = e -> 2 (1 - e^-0.5) = 0.786939
    assert torch.allclose(f_prime(l, "alpha", 0.5), torch.tensor([0.0, 2 * (1 - math.exp(-0.5)),
                                                                  2 * (1 - math.exp(0.5))]))
    # alpha -> 0 approaches reverse KL's log u (up to the constant); alpha -> 1 forward KL's -1/u (up to 1)
    assert torch.allclose(f_prime(l, "alpha", 1e-4), l, atol=1e-3)
    assert torch.allclose(f_prime(l, "alpha", 1 - 1e-6), 1 + f_prime(l, "forward_kl"), atol=1e-4)
    # a policy far below its reference: the capped exponent keeps values and gradients finite
    far = torch.tensor([-1000.0], requires_grad=True)
    f_prime(far, "forward_kl").sum().backward()
    assert torch.isfinite(far.grad).all()
    with pytest.raises(ValueError, match="unknown f-divergence"):
        f_prime(l, "hellinger")
    with pytest.raises(ValueError, match="alpha in"):
        f_prime(l, "alpha", 1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f_dpo_with_reverse_kl_is_exactly_dpo(seed: int) -> None:
    """f'(u) = log u + 1: the +1 cancels in the margin, which is DPO's h, so loss and gradients are DPO's."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    a = [t.clone().requires_grad_() for t in (pc, pr)]
    b = [t.clone().requires_grad_() for t in (pc, pr)]
    la = f_dpo.f_dpo_loss(a[0], a[1], rc, rr, 0.3, "reverse_kl")["loss"]
    lb = dpo.dpo_loss(b[0], b[1], rc, rr, 0.3)["loss"]
    assert torch.allclose(la, lb, atol=1e-6)
    la.sum().backward()
    lb.sum().backward()
    assert torch.allclose(a[0].grad, b[0].grad, atol=1e-6) and torch.allclose(a[1].grad, b[1].grad, atol=1e-6)


def test_f_dpo_losses_by_hand() -> None:
    beta = 0.5
    # forward KL, pair 0: f'(u_w) = -e^-1 = -0.367879, f'(u_l) = -e^1 = -2.718282, margin 2.350402,
    #   beta margin = 1.175201, loss = log(1 + e^-1.175201) = 0.269087
    # pair 1: margin = -e^1 - -e^-1 = -2.350402, loss = log(1 + e^1.175201) = 1.444288
    out = f_dpo.f_dpo_loss(PC, PR, RC, RR, beta, "forward_kl")
    m = math.e - math.exp(-1)
    assert torch.allclose(out["reward_margin"], torch.tensor([m, -m]))
    assert torch.allclose(out["loss"], torch.tensor([math.log(1 + math.exp(-beta * m)),
                                                     math.log(1 + math.exp(beta * m))]))
    assert abs(out["loss"][0].item() - 0.269087) < 1e-5
    # JS, pair 0: f'(e) = log(2e/(1+e)) = 0.380044, f'(1/e) = log(2/(1+e)) = -0.619956, margin 1.0 exactly
    #   (log(2e/(1+e)) - log(2/(1+e)) = log e); loss = -log sigmoid(0.5) = 0.474077
    out = f_dpo.f_dpo_loss(PC, PR, RC, RR, beta, "js")
    assert torch.allclose(out["reward_margin"], torch.tensor([1.0, -1.0]))
    assert abs(out["loss"][0].item() - 0.474077) < 1e-5
    # alpha = 0.5, pair 0: f'(e) = 2(1 - e^-0.5) = 0.786939, f'(1/e) = 2(1 - e^0.5) = -1.297443,
    #   margin 2.084382, loss = log(1 + e^-1.042191) = log(1.352681) = 0.302089
    out = f_dpo.f_dpo_loss(PC, PR, RC, RR, beta, "alpha", 0.5)
    m = 2 * (1 - math.exp(-0.5)) - 2 * (1 - math.exp(0.5))
    assert abs(out["loss"][0].item() - math.log(1 + math.exp(-beta * m))) < 1e-6
    assert abs(out["loss"][0].item() - 0.302089) < 1e-5
    # policy = reference: u = 1 for both responses, margin 0, loss log 2 for every divergence
    for d in ("reverse_kl", "forward_kl", "js", "alpha"):
        assert torch.allclose(f_dpo.f_dpo_loss(RC, RR, RC, RR, 2.0, d)["loss"], torch.full((2,), math.log(2)))


# ---------------------------------------------------------------- RPO (P043)

def test_rpo_loss_by_hand() -> None:
    # beta 0.5, eta 2: SFT weight eta * beta = 1 on -log pi(y_w)
    #   pair 0: DPO 0.313262 + 1 * 1 = 1.313262;  pair 1: DPO 1.313262 + 1 * 2 = 3.313262
    pc = PC.clone().requires_grad_()
    out = rpo.rpo_loss(pc, PR, RC, RR, beta=0.5, eta=2.0)
    assert torch.allclose(out["loss"], torch.tensor([math.log(1 + math.exp(-1)) + 1.0, math.log(1 + math.e) + 2.0]))
    assert torch.allclose(out["sft_nll"], torch.tensor([1.0, 2.0]))
    # d/d log pi(y_w) = -beta sigmoid(-beta h) - eta beta: the SFT term always raises the chosen response
    out["loss"].sum().backward()
    assert torch.allclose(pc.grad, torch.tensor([-0.5 * sig(-1) - 1.0, -0.5 * sig(1) - 1.0]))
    # the rejected response gets no SFT gradient, and eta = 0 is exactly DPO
    assert torch.allclose(rpo.rpo_loss(PC, PR, RC, RR, 0.5, 0.0)["loss"], dpo.dpo_loss(PC, PR, RC, RR, 0.5)["loss"])


# ---------------------------------------------------------------- WPO (P227)

def test_wpo_weight_by_hand() -> None:
    # one row, vocabulary of 2, tokens [0, 1, 0], the last two are the response.
    #   step predicting token 1: p = (0.5, 0.5): log p(1) - log(0.25 + 0.25) = log 0.5 - log 0.5 = 0
    #   step predicting token 0: p = (0.8, 0.2): log 0.8 - log(0.64 + 0.04) = log(0.8 / 0.68) = 0.162519
    #   mean over the 2 response tokens: 0.081260
    logits = torch.tensor([[[0.0, 0.0], [math.log(0.8), math.log(0.2)], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    log_w = wpo.wpo_log_weight(logits, ids, mask)
    assert abs(log_w.item() - math.log(0.8 / 0.68) / 2) < 1e-6 and abs(log_w.item() - 0.081260) < 1e-5
    # a token the policy samples less often than its usual match rate weighs less: picking 1 at p = (0.8, 0.2)
    #   log 0.2 - log 0.68 = -1.223775 over one response token
    low = wpo.wpo_log_weight(logits[:, 1:], torch.tensor([[0, 1]]), torch.tensor([[False, True]]))
    assert abs(low.item() - math.log(0.2 / 0.68)) < 1e-6
    # pair weight min(1, w_w w_l): exp(-0.5 - 0.3) = 0.449329; exp(0.08 + 0.05) is capped at 1
    w = wpo.pair_weight(torch.tensor([-0.5, 0.08]), torch.tensor([-0.3, 0.05]))
    assert torch.allclose(w, torch.tensor([math.exp(-0.8), 1.0]))


def test_wpo_loss_weights_dpo_and_the_weight_gets_no_gradient() -> None:
    weight = torch.tensor([0.5, 0.25], requires_grad=True)
    out = wpo.wpo_loss(PC, PR, RC, RR, 0.5, weight)
    # 0.5 * 0.313262 = 0.156631;  0.25 * 1.313262 = 0.328316
    assert torch.allclose(out["loss"], torch.tensor([0.5 * math.log(1 + math.exp(-1)),
                                                     0.25 * math.log(1 + math.e)]))
    assert not out["loss"].requires_grad  # nothing else asks for a gradient, the weight is detached


# ---------------------------------------------------------------- EXO (P187)

def test_exo_loss_by_hand() -> None:
    eps = 1e-3
    # h = 0: p_f = (0.5, 0.5); KL = 0.5 (log 0.5 - log 0.999) + 0.5 (log 0.5 - log 0.001)
    #   = -0.693147 + 0.5 * (0.001001 + 6.907755) = 2.761231
    at_zero = exo.exo_loss(RC, RR, RC, RR, 0.1, eps)["loss"]
    assert torch.allclose(at_zero, torch.full((2,), 2.761231), atol=1e-5)
    # beta 0.5, pair 0: z = 1, p_f = (0.731059, 0.268941)
    #   KL = 0.731059 (-0.313262 + 0.001001) + 0.268941 (-1.313262 + 6.907755) = -0.228283 + 1.504589 = 1.276306
    out = exo.exo_loss(PC, PR, RC, RR, 0.5, eps)
    expected = sig(1) * (math.log(sig(1)) - math.log(1 - eps)) + sig(-1) * (math.log(sig(-1)) - math.log(eps))
    assert abs(out["loss"][0].item() - expected) < 1e-6 and abs(expected - 1.276306) < 1e-5
    # the minimum is 0 at sigmoid(z) = 1 - eps (z* = log(999) = 6.906755) and the gradient changes sign there:
    # unlike DPO, EXO pushes a margin back once it overshoots.
    z_star = math.log((1 - eps) / eps)
    for z, sign in ((z_star, 0.0), (z_star - 1, -1.0), (z_star + 1, 1.0)):
        pc = torch.tensor([z], requires_grad=True)  # beta 1, h = pc - 0 - (0 - 0) = z
        loss = exo.exo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0, eps)["loss"]
        loss.backward()
        if sign == 0.0:
            assert abs(loss.item()) < 1e-9 and abs(pc.grad.item()) < 1e-6
        else:
            assert math.copysign(1.0, pc.grad.item()) == sign
    with pytest.raises(ValueError, match="label smoothing"):
        exo.exo_loss(PC, PR, RC, RR, 0.5, 0.0)


# ---------------------------------------------------------------- SSPO (P129)

def test_sspo_loss_adds_the_weighted_degree_loss() -> None:
    # DPO (beta 0.5) + 0.5 * 0.6 = 0.313262 + 0.3
    out = sspo.sspo_loss(PC, PR, RC, RR, 0.5, 0.5, torch.tensor([0.6, 0.0]))
    assert torch.allclose(out["loss"], torch.tensor([math.log(1 + math.exp(-1)) + 0.3, math.log(1 + math.e)]))


def test_removal_degrees_drop_one_more_key_token_each_time() -> None:
    d = [TOKEN_ID[c] for c in "703"]
    g = torch.Generator().manual_seed(0)
    variants = removal_degrees([*d, EOS_ID], sspo.KEY_TOKENS, 2, g)
    assert len(variants) == 3 and [len(v) for v in variants] == [4, 3, 2]
    assert all(v[-1] == EOS_ID for v in variants)  # eos is never key content
    for longer, shorter in zip(variants, variants[1:]):  # nested: each copy is the previous minus one token
        assert any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer)))
    # fewer key tokens than degrees: stop when none is left
    assert removal_degrees([TOKEN_ID["7"], EOS_ID], sspo.KEY_TOKENS, 3, g) == [[TOKEN_ID["7"], EOS_ID], [EOS_ID]]


# ---------------------------------------------------------------- SPAC (P249)

# ---------------------------------------------------------------- shared row helpers

def test_split_rows_and_score_responses_round_trip() -> None:
    torch.manual_seed(0)
    model = build_causal_lm(TINY_LM)
    prompts, responses = [[1, 5, 6, 3], [1, 7, 3]], [[9, 2], [4, 4, 4, 2]]
    for side in ("right", "left"):
        batch = pad_pairs(prompts, responses, PAD_ID, side=side)
        assert split_rows(batch["input_ids"], batch["attention_mask"], batch["response_mask"]) == (prompts, responses)
    with torch.no_grad():
        direct = sequence_logprobs(model, pad_pairs(prompts, responses, PAD_ID))
        assert torch.allclose(score_responses(model, prompts, responses, PAD_ID), direct)


# ---------------------------------------------------------------- declarations and bad options

@pytest.mark.parametrize("rule", NEW_RULES, ids=lambda r: r.name)
def test_rules_are_registered_with_their_paper(rule) -> None:
    assert RULES[rule.name] is rule and rule.family == "preference"
    assert rule.paper_ids in (("P073",), ("P043",), ("P227",), ("P187",), ("P129",), ("P249",))
    if rule is f_dpo.RULE:  # its own check of P073's reward/diversity trade-off (tests/test_f_dpo_check.py)
        assert rule.check_runner == "algorithms.preference.f_dpo_check:run_f_dpo_check"
    else:
        assert rule.learning_check.threshold == WIN_RATE_THRESHOLD
    assert rule.config_class().pair_source == "reference"  # every one of these papers learns offline
    assert {"beta", "lr", "pair_source"} <= set(rule.option_names())


@pytest.mark.parametrize("rule, overrides, message", [
    (f_dpo.RULE, {"divergence": "tv"}, "divergence must be one of"),
    (f_dpo.RULE, {"divergence": "alpha", "alpha": 1.0}, "alpha must be in"),
    (rpo.RULE, {"eta": -0.1}, "eta must be >= 0"),
    (exo.RULE, {"label_smoothing": 0.0}, "label_smoothing must be in"),
    (sspo.RULE, {"degrees": 0}, "degrees must be an integer"),
    (sspo.RULE, {"degree_responses": "rejected"}, "degree_responses must be one of"),
    (spac.RULE, {"pessimism": -1.0}, "pessimism must be >= 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_options_are_refused_before_any_work(rule, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        train_preference(rule, steps=1, overrides=overrides)


# ---------------------------------------------------------------- one real RLlib Learner update per rule

def labelled(prompt: str, first: str, second: str, preferred, i: int) -> LabelledPair:
    pair = Pair(prompt=prompt, responses=(first, second), policy_version=0, pair_id=f"t-{i}")
    return LabelledPair(entry_id=f"0-{i}", pair=pair, label=Label(preferred, "test", 0.0), epoch=0)


def _expected_first_loss(rule, group, task, pairs) -> float:
    """The first loss with policy = reference (every log-ratio 0), by hand:
    f-DPO (alpha: f'(1) = 0): log 2; SPAC (every reward 0, lambda 1): log 2 + 1 * log 2; EXO: 2.761231 (see
    test_exo_loss_by_hand); SSPO: log 2 + 0.1 * log 3 (its degree classifier starts at zero: each copy's
    cross-entropy over K + 1 = 3 degrees is log 3); RPO: log 2 + eta beta * mean NLL of the chosen responses; WPO:
    mean of w_i log 2, the weights from the initial policy."""
    if rule.name == "f_dpo":
        return math.log(2)
    if rule.name == "spac":
        return 2 * math.log(2)
    if rule.name == "exo":
        return 2.761231
    if rule.name == "sspo":
        return math.log(2) + 0.1 * math.log(3)
    model = build_causal_lm(TINY_LM)
    state = group.get_weights()["default_policy"]
    model.load_state_dict({k[len("model."):]: torch.as_tensor(np.array(v)) for k, v in state.items()})
    cols = {k: torch.as_tensor(v) for k, v in learner_batch(task, pairs)["default_policy"].items()}
    valid = cols["valid"]
    b, k, t = cols["input_ids"].shape
    flat = {c: cols[c].reshape(b * k, t) for c in ("input_ids", "attention_mask", "position_ids", "response_mask")}
    with torch.no_grad():
        logp = sequence_logprobs(model, flat).reshape(b, k)
        if rule.name == "rpo":
            return math.log(2) + 1.0 * 0.1 * float(-logp[valid, 0].mean())
        logits = model(input_ids=flat["input_ids"], attention_mask=flat["attention_mask"],
                       position_ids=flat["position_ids"]).logits
        log_w = wpo.wpo_log_weight(logits, flat["input_ids"], flat["response_mask"]).reshape(b, k)
        return float((wpo.pair_weight(log_w[:, 0], log_w[:, 1])[valid] * math.log(2)).mean())


@pytest.mark.parametrize("rule", NEW_RULES, ids=lambda r: r.name)
def test_one_learner_update_through_a_learner_group(rule) -> None:
    """A real RLlib TorchLearner in a local LearnerGroup: the first loss is the hand value (policy = reference),
    ties are left out, and repeated updates widen the chosen-vs-rejected log-ratio margin."""
    torch.manual_seed(0)
    config = rule.config_class().learners(num_learners=0).debugging(seed=0)
    config.lr = 3e-3
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    try:
        group.foreach_learner(lambda learner: learner.reset_reference())
        task = ReverseDigits()
        pairs = [labelled(f"{i}{i}7>", f"7{i}{i}", f"{(i + 1) % 10}{i}{i}", 0, i) for i in range(6)]
        pairs.append(labelled("555>", "555", "5", "tie", 9))
        batch = learner_batch(task, pairs)
        expected = _expected_first_loss(rule, group, task, pairs)
        peek = lambda v: float(v.peek() if hasattr(v, "peek") else v)  # noqa: E731
        stats = group.update(batch=batch)
        stats = (stats[0] if isinstance(stats, list) else stats)["default_policy"]
        assert peek(stats["preference_loss"]) == pytest.approx(expected, rel=1e-4)
        assert peek(stats["pairs"]) == 6.0  # the tie is not in the loss
        for _ in range(5):
            stats = group.update(batch=batch)
        stats = (stats[0] if isinstance(stats, list) else stats)["default_policy"]
        assert peek(stats["logratio_margin"]) > 0.0 and peek(stats["margin_accuracy"]) > 0.5
    finally:
        group.shutdown()


# ---------------------------------------------------------------- through Ray and the Redis queue

@pytest.mark.parametrize("rule", NEW_RULES, ids=lambda r: r.name)
def test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    """The DPO/IPO smoke run's checks, unchanged, on these rules: SFT, a generation actor adding pairs to the
    queue, the scripted judge labelling them, the LearnerGroup learning from them, every pair acked once."""
    preference_loop_tests.test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace)


# ---------------------------------------------------------------- papers without a rule

FAMILIES = {"preference-LLM", "preference-RL"}


def test_papers_without_rule_are_registered_catalogued_and_explained() -> None:
    catalogue = {paper["id"]: paper for paper in load_papers()}
    implemented = {paper_id for rule in RULES.values() for paper_id in rule.paper_ids}
    rows = {row["id"]: row for row in paper_statuses()}
    ids = [entry.paper_id for entry in PAPERS_WITHOUT_RULE]
    assert sorted(ids) == ["P104", "P120", "P252"] and len(set(ids)) == len(ids)
    for entry in PAPERS_WITHOUT_RULE:
        assert REGISTERED[entry.paper_id] is entry
        assert catalogue[entry.paper_id]["family"].rstrip("?") in FAMILIES
        assert catalogue[entry.paper_id]["rule"] == "no"
        assert entry.paper_id not in implemented
        assert len(entry.reason) > 40 and "\n" not in entry.reason
        assert rows[entry.paper_id]["status"] == "no rule" and rows[entry.paper_id]["detail"] == entry.reason
    # every paper of these families that the catalogue marks "no" has its verdict here
    nos = {p["id"] for p in catalogue.values() if p["family"].rstrip("?") in FAMILIES and p["rule"] == "no"}
    assert nos == set(ids)


# ---------------------------------------------------------------- learning checks (slow)

@pytest.mark.slow
@pytest.mark.parametrize("rule", [r for r in NEW_RULES if r is not f_dpo.RULE], ids=lambda r: r.name)
def test_learning_check_beats_the_sft_reference(rule, ray_session) -> None:
    report = run_learning_check(rule)
    print(report)
    assert report["win_rate"] >= WIN_RATE_THRESHOLD, report
