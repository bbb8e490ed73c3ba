"""The preference rules whose reference moves or whose data is generated online in a special way (issue 6):
TR-DPO (P236), online IPO / IPO-MD (P021), DNO (P293), INPO (P278), HyPO (P268), Nash-MP (P080), APO (P255).

Hand-computed losses (arithmetic in comments), the geometric-mixture sampler, the reference / anchor schedules on
a real local LearnerGroup, and a smoke run of every rule through Ray and the Redis preference queue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.common.geometric_mixture import GeometricMixtureLM, mixture_logits
from algorithms.common.proximal_preference import proximal_regression_loss
from algorithms.common.sequence import build_causal_lm, copy_weights
from algorithms.preference import apo, dno, hypo, inpo, ipo_md, nash_mp, online_ipo, tr_dpo
from algorithms.preference.base import TINY_LM, learner_batch
from algorithms.preference.generation import PairProducer
from algorithms.preference.loop import train_preference
from conftest_replay import namespace, rclient, replay_server  # noqa: F401
from envs.text_tasks import ReverseDigits
from services.preferences import Label, LabelledPair, Pair, PreferenceQueue

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


RULES = [tr_dpo.RULE, online_ipo.RULE, ipo_md.RULE, dno.RULE, inpo.RULE, hypo.RULE, nash_mp.RULE, apo.RULE]

# One pair: policy / reference / anchor (last iterate) sequence log-probs of the chosen and rejected responses.
#   policy margin  = -1 - -3 = 2;  reference margin = -2 - -2 = 0;  anchor margin = -1 - -2 = 1
PC, PR = torch.tensor([-1.0]), torch.tensor([-3.0])
RC, RR = torch.tensor([-2.0]), torch.tensor([-2.0])
AC, AR = torch.tensor([-1.0]), torch.tensor([-2.0])


def test_proximal_regression_by_hand() -> None:
    # a = 0.25, c = 2: h = 2 - 0.25 * 0 - 0.75 * 1 = 1.25; loss = (1.25 - 1)^2 = 0.0625
    out = proximal_regression_loss(PC, PR, RC, RR, AC, AR, ref_weight=0.25, step=2.0)
    assert out["h"].item() == pytest.approx(1.25) and out["loss"].item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="ref_weight"):
        proximal_regression_loss(PC, PR, RC, RR, AC, AR, ref_weight=1.5, step=2.0)


def test_inpo_loss_by_hand() -> None:
    # tau = 0.1, eta = 5: tau eta = 0.5; h = 2 - 0.5 * 0 - 0.5 * 1 = 1.5; target eta/2 = 2.5; (1.5 - 2.5)^2 = 1
    out = inpo.inpo_loss(PC, PR, RC, RR, AC, AR, tau=0.1, eta=5.0)
    assert out["h"].item() == pytest.approx(1.5) and out["loss"].item() == pytest.approx(1.0)
    # gradient in the policy's chosen log-prob: 2 (h - 2.5) = -2 (push the chosen response up)
    pc = PC.clone().requires_grad_()
    inpo.inpo_loss(pc, PR, RC, RR, AC, AR, tau=0.1, eta=5.0)["loss"].sum().backward()
    assert pc.grad.item() == pytest.approx(-2.0)
    # tau eta = 1 and no anchor weight: IPO with 1/(2 tau') = eta/2 (IPO's value (2 - 2.5)^2 = 0.25)
    assert inpo.inpo_loss(PC, PR, RC, RR, AC, AR, tau=0.2, eta=5.0)["loss"].item() == pytest.approx(0.25)


def test_nash_mp_loss_by_hand() -> None:
    # beta = 0.1, eta = 1: a = 1/2, c = 1 / (0.1 * 2) = 5; h = 2 - 0 - 0.5 = 1.5; (1.5 - 2.5)^2 = 1
    assert nash_mp.prox_coefficients(0.1, 1.0) == pytest.approx((0.5, 5.0))
    out = nash_mp.nash_mp_loss(PC, PR, RC, RR, AC, AR, beta=0.1, eta=1.0)
    assert out["loss"].item() == pytest.approx(1.0)
    # eta = 3: a = 0.75, c = 3 / (0.1 * 4) = 7.5; h = 2 - 0.25 * 1 = 1.75; (1.75 - 3.75)^2 = 4
    assert nash_mp.nash_mp_loss(PC, PR, RC, RR, AC, AR, beta=0.1, eta=3.0)["loss"].item() == pytest.approx(4.0)


def test_apo_loss_by_hand() -> None:
    # reference pi_t = (RC, RR) margin 0, pi_{t-1} = (AC, AR) margin 1, alpha = 0.5:
    #   extrapolated reference margin = 1.5 * 0 - 0.5 * 1 = -0.5; h = 2 - (-0.5) = 2.5
    #   beta = 0.4: -log sigmoid(1.0) = log(1 + e^-1) = 0.313262
    out = apo.apo_loss(PC, PR, RC, RR, AC, AR, beta=0.4, alpha=0.5)
    assert out["h"].item() == pytest.approx(2.5)
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    # alpha = 0 is DPO against pi_t: h = 2, -log sigmoid(0.8) = log(1 + e^-0.8) = 0.371101
    assert apo.apo_loss(PC, PR, RC, RR, AC, AR, beta=0.4, alpha=0.0)["loss"].item() == pytest.approx(0.371101, abs=1e-6)


def test_hypo_reverse_kl_surrogate_by_hand() -> None:
    # two samples: log pi = [-1, -2], log pi_ref = [-1.5, -1] -> r = [0.5, -1], KL estimate -0.25
    # leave-one-out advantages [1.5, -1.5]; surrogate 0.5 (1.5 * -1 + -1.5 * -2) = 0.75; gradient [0.75, -0.75]
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = hypo.reverse_kl_surrogate(logp, torch.tensor([[-1.5, -1.0]]))
    assert out["kl"].item() == pytest.approx(-0.25) and out["loss"].item() == pytest.approx(0.75)
    out["loss"].sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.75, -0.75]]))
    # policy = reference: r = 0, no gradient at all
    zero = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    hypo.reverse_kl_surrogate(zero, zero.detach())["loss"].sum().backward()
    assert torch.equal(zero.grad, torch.zeros(1, 2))


def test_copy_weights_mixes_tied_weights_once() -> None:
    # GPT-2 ties lm_head to the token embedding: mix 0.6 must leave 0.4 of the old value everywhere (0.16 if the
    # tied tensor were visited twice)
    torch.manual_seed(0)
    target, source = build_causal_lm(TINY_LM), build_causal_lm(TINY_LM)
    old = {k: v.clone() for k, v in target.state_dict().items()}
    copy_weights(target, source, 0.6)
    for name, value in target.state_dict().items():
        assert torch.allclose(value, 0.4 * old[name] + 0.6 * source.state_dict()[name], atol=1e-6), name


def test_tr_dpo_reference_schedule() -> None:
    # soft: alpha every tau updates; hard: a full copy every tau updates; nothing in between
    assert [tr_dpo.reference_mix(s, "soft", 0.6, 4) for s in (1, 3, 4, 8)] == [None, None, 0.6, 0.6]
    assert [tr_dpo.reference_mix(s, "hard", 0.6, 2) for s in (1, 2)] == [None, 1.0]


def test_geometric_mixture_by_hand() -> None:
    # policy probs (1/2, 1/2), reference (1/5, 4/5), beta = 1/2: mixture ∝ sqrt(1/2 * 1/5), sqrt(1/2 * 4/5)
    #   = sqrt(0.1), sqrt(0.4) -> normalised (1/3, 2/3) (sqrt(0.4) = 2 sqrt(0.1))
    policy, reference = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.2, 0.8]))
    probs = torch.softmax(mixture_logits(policy, reference, 0.5), -1)
    assert torch.allclose(probs, torch.tensor([1 / 3, 2 / 3]))
    assert torch.allclose(torch.softmax(mixture_logits(policy, reference, 0.0), -1), torch.tensor([0.5, 0.5]))
    assert torch.allclose(torch.softmax(mixture_logits(policy, reference, 1.0), -1), torch.tensor([0.2, 0.8]))
    with pytest.raises(ValueError, match="mixture beta"):
        mixture_logits(policy, reference, 1.5)


def test_mixture_lm_samples_from_the_mixture() -> None:
    """beta = 1 samples exactly as the reference; the mixture model's logits mix the two models' per token."""
    torch.manual_seed(0)
    policy, reference = build_causal_lm(TINY_LM), build_causal_lm(TINY_LM)
    ids = torch.tensor([[1, 5, 6, 7, 3]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mix = GeometricMixtureLM(policy, reference, 0.3)
    with torch.no_grad():
        expected = 0.7 * torch.log_softmax(policy(**inputs).logits, -1) + 0.3 * torch.log_softmax(
            reference(**inputs).logits, -1)
        assert torch.allclose(mix(**inputs).logits, expected, atol=1e-6)
    from algorithms.preference.generation import sample_texts

    task = ReverseDigits()
    prompts = ["123>"] * 8
    ref_texts = sample_texts(reference, task, prompts, 1.0, torch.Generator().manual_seed(3))
    mix_texts = sample_texts(GeometricMixtureLM(policy, reference, 1.0), task, prompts, 1.0,
                             torch.Generator().manual_seed(3))
    assert mix_texts == ref_texts


def labelled(prompt: str, first: str, second: str, preferred, i: int) -> LabelledPair:
    pair = Pair(prompt=prompt, responses=(first, second), policy_version=0, pair_id=f"t-{i}")
    return LabelledPair(entry_id=f"0-{i}", pair=pair, label=Label(preferred, "test", 0.0), epoch=0)


def _group(rule, **overrides):
    torch.manual_seed(0)
    config = rule.config_class().learners(num_learners=0).debugging(seed=0)
    for k, v in overrides.items():
        setattr(config, k, v)
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    group.foreach_learner(lambda learner: learner.reset_reference())
    group.foreach_learner(lambda learner: learner.start_training(config))
    return config, group


def _pairs() -> list[LabelledPair]:
    return [labelled(f"{i}{i}7>", f"7{i}{i}", f"{(i + 1) % 10}{i}{i}", 0, i) for i in range(4)]


def _flat(state: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for k, v in sorted(state.items())
                           if np.asarray(v).dtype.kind == "f"])


def _policy(group) -> dict:
    return {k[len("model."):]: v for k, v in group.get_weights()["default_policy"].items()}


def test_tr_dpo_soft_update_moves_the_reference_in_the_learner() -> None:
    """After update tau the reference is alpha * policy + (1 - alpha) * old reference, parameter by parameter."""
    config, group = _group(tr_dpo.RULE, reference_period=2, reference_alpha=0.6, lr=3e-3)
    try:
        learner = group._learner
        batch = learner_batch(ReverseDigits(), _pairs())
        old_ref = _flat(learner.reference_weights())
        group.update(batch=batch)
        learner.after_update(config, 1)  # not a multiple of tau = 2: the reference stays
        assert np.array_equal(_flat(learner.reference_weights()), old_ref)
        group.update(batch=batch)
        policy = _flat(_policy(group))
        learner.after_update(config, 2)
        assert np.allclose(_flat(learner.reference_weights()), 0.6 * policy + 0.4 * old_ref, atol=1e-6)
        config.reference_update = "hard"
        learner.after_update(config, 4)
        assert np.allclose(_flat(learner.reference_weights()), policy, atol=1e-6)
    finally:
        group.shutdown()


def test_apo_iteration_end_shifts_the_iterates() -> None:
    """At an iteration end pi_{t-1} <- pi_t (anchor <- reference) and pi_t <- pi_{t+1} (reference <- policy); the
    first update's loss is DPO's log 2 (pi = pi_t = pi_{t-1} = SFT, so h = 0)."""
    config, group = _group(apo.RULE, iteration_steps=1, lr=3e-3)
    try:
        learner = group._learner
        batch = learner_batch(ReverseDigits(), _pairs())
        first = group.update(batch=batch)
        stats = (first[0] if isinstance(first, list) else first)["default_policy"]
        loss = stats["preference_loss"]
        assert float(loss.peek() if hasattr(loss, "peek") else loss) == pytest.approx(math.log(2), rel=1e-5)
        sft = _flat(learner.reference_weights())
        learner.after_update(config, 1)
        assert np.allclose(_flat(learner.anchor_weights()), sft)
        assert np.allclose(_flat(learner.reference_weights()), _flat(_policy(group)))
        assert not np.allclose(sft, _flat(_policy(group)))
    finally:
        group.shutdown()


def test_inpo_anchor_follows_the_iterates() -> None:
    config, group = _group(inpo.RULE, iteration_steps=2, lr=3e-3)
    try:
        learner = group._learner
        batch = learner_batch(ReverseDigits(), _pairs())
        sft = _flat(learner.anchor_weights())
        assert np.allclose(sft, _flat(learner.reference_weights()))  # start_training: anchor = SFT
        group.update(batch=batch)
        learner.after_update(config, 1)
        assert np.allclose(_flat(learner.anchor_weights()), sft)  # mid-iteration: pi_t stays
        group.update(batch=batch)
        learner.after_update(config, 2)
        assert np.allclose(_flat(learner.anchor_weights()), _flat(_policy(group)))
        assert np.allclose(_flat(learner.reference_weights()), sft)  # pi_ref never moves
    finally:
        group.shutdown()


def test_producer_schedules() -> None:
    """Who gets fresh weights when: online rules every update, iterative ones at iteration ends, Nash-MP after each
    half step (its anchor after both), HyPO never (fixed SFT dataset)."""
    assert [tr_dpo.TRDPOConfig().producer_weights_due(s) for s in (1, 2)] == [True, True]
    assert [dno.DNOConfig().producer_weights_due(s) for s in (1, 5, 6, 12)] == [False, False, True, True]
    nmp = nash_mp.NashMPConfig()
    assert [nmp.producer_weights_due(s) for s in (1, 3, 6)] == [False, True, True]
    assert [nmp.iteration_completes(s) for s in (3, 6)] == [False, True]
    assert not hypo.HyPOConfig().producer_weights_due(1)
    assert online_ipo.OnlineIPOConfig().producer_mixture() == 0.0 and ipo_md.IPOMDConfig().producer_mixture() == 0.25


def test_producer_mixture_switch() -> None:
    producer = PairProducer.__new__(PairProducer)  # no queue needed to check the sampler switch
    producer.model, producer.lm_config = build_causal_lm(TINY_LM), dict(TINY_LM)
    state = {f"model.{k}": v.numpy() for k, v in producer.model.state_dict().items()}
    producer.set_mixture(state, 0.5)
    assert isinstance(producer.sampler, GeometricMixtureLM) and producer.sampler.beta == 0.5
    producer.set_mixture(state, 0.0)
    assert producer.sampler is producer.model


def test_hypo_samples_online_inside_the_learner() -> None:
    config, group = _group(hypo.RULE, kl_coef=1.0)
    try:
        learner = group._learner
        cols = {k: torch.as_tensor(v) for k, v in learner_batch(ReverseDigits(), _pairs()).policy_batches[
            "default_policy"].items()}
        samples = learner.online_samples(config, "default_policy", cols)
        assert samples["input_ids"].shape == cols["input_ids"].shape
        # the prompts are the batch's, the responses fresh
        prompt_len = 5  # bos + 3 digits + ">"
        assert torch.equal(samples["input_ids"][:, :, :prompt_len], cols["input_ids"][:, :, :prompt_len])
        assert hypo.prompt_rows(cols)[0] == [1, 4, 4, 11, 3]  # "^007>": bos=1, "0"=4, "7"=11, ">"=3
        result = group.update(batch=learner_batch(ReverseDigits(), _pairs()))
        stats = (result[0] if isinstance(result, list) else result)["default_policy"]
        kl = stats["online_kl"]
        assert float(kl.peek() if hasattr(kl, "peek") else kl) == pytest.approx(0.0, abs=1e-5)  # policy = ref
    finally:
        group.shutdown()


@pytest.mark.parametrize("rule, bad, match", [
    (tr_dpo.RULE, {"reference_update": "medium"}, "reference_update"),
    (tr_dpo.RULE, {"reference_alpha": 0.0}, "reference_alpha"),
    (online_ipo.RULE, {"mixture_beta": 2.0}, "mixture_beta"),
    (online_ipo.RULE, {"pair_source": "reference"}, "pair_source"),
    (dno.RULE, {"iteration_steps": 0}, "iteration_steps"),
    (inpo.RULE, {"eta": 20.0}, "beta \\* eta"),
    (nash_mp.RULE, {"eta": -1.0}, "eta must be > 0"),
    (apo.RULE, {"extrapolation": -0.1}, "extrapolation"),
    (hypo.RULE, {"kl_coef": -1.0}, "kl_coef"),
])
def test_bad_options_are_refused(rule, bad, match) -> None:
    config = rule.config_class()
    for k, v in bad.items():
        setattr(config, k, v)
    with pytest.raises(ValueError, match=match):
        config.validate()


# Each smoke run starts a generation actor (a fresh Ray worker importing torch + transformers: ~15 s on the shared
# 2 cores), so by default we run the five that cover distinct paths (soft reference moves, the mixture sampler,
# iteration-end syncs with a reference reset, the extragradient anchor, learner-side sampling); online IPO, INPO
# and APO take the same paths as ipo_md / nash_mp and run under -m slow.
_SAME_PATH = {"online_ipo", "inpo", "apo"}
SMOKE_RULES = [pytest.param(r, id=r.name, marks=[pytest.mark.slow] if r.name in _SAME_PATH else []) for r in RULES]


@pytest.mark.parametrize("rule", SMOKE_RULES)
def test_smoke_through_ray_and_the_redis_queue(rule, ray_session, rclient, namespace) -> None:  # noqa: F811
    queue = PreferenceQueue(rclient, namespace=namespace, max_len=64)
    overrides = dict(rule.smoke_overrides)
    if hasattr(rule.config_class(), "iteration_steps"):
        overrides["iteration_steps"] = 1  # two iterations in the two smoke steps
    if rule is tr_dpo.RULE:
        overrides["reference_period"] = 1
    result = train_preference(rule, steps=2, seed=0, overrides=overrides, queue=queue, eval_prompts=16)
    assert result.pairs_acked == 16 and len(queue.used(queue.epoch)) == 16
    assert queue.pending() == {"unlabelled": 0, "labelled": 0}
    assert len(result.history) == 2 and all(math.isfinite(h["preference_loss"]) for h in result.history)
    changed = any(not torch.equal(a, b) for a, b in zip(result.policy.state_dict().values(),
                                                          result.reference.state_dict().values()))
    assert changed, "the learner update did not reach the policy"
    assert 0.0 <= result.evaluation["win_rate"] <= 1.0
