"""DPO (DPO-2023) and IPO (IPO-2023): the losses on a hand-computed batch, and one real RLlib Learner update
on labelled pairs through a (local) LearnerGroup on a tiny GPT-2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.common.sequence import build_causal_lm
from algorithms.preference import dpo, ipo
from algorithms.preference.base import VALID, pair_columns
from algorithms.preference.module import pair_logprobs
from envs.text_tasks import ReverseDigits
from services.preferences import Label, LabelledPair, Pair

# Two pairs: (policy chosen, policy rejected, reference chosen, reference rejected) sequence log-probs.
#   pair 0: h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
#   pair 1: h = (-2 - -1) - (-1 - -2) = -1 - 1 = -2
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


def test_dpo_loss_by_hand() -> None:
    # beta = 0.5: beta h = 1 and -1
    #   -log sigmoid(1) = log(1 + e^-1) = 0.313262;  -log sigmoid(-1) = log(1 + e) = 1.313262
    out = dpo.dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert torch.allclose(out["h"], torch.tensor([2.0, -2.0]))
    assert torch.allclose(out["loss"], torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.e)]))
    assert abs(out["loss"][0].item() - 0.313262) < 1e-6 and abs(out["loss"][1].item() - 1.313262) < 1e-6
    # Gradient: d loss / d policy_chosen = -beta sigmoid(-beta h) < 0 (raise the chosen one), opposite for rejected.
    pc = PC.clone().requires_grad_()
    dpo.dpo_loss(pc, PR, RC, RR, beta=0.5)["loss"].sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert torch.allclose(pc.grad, torch.tensor([-0.5 * sig(-1), -0.5 * sig(1)]))
    # Equal margins (policy = reference) give log 2 whatever beta.
    assert torch.allclose(dpo.dpo_loss(RC, RR, RC, RR, beta=3.0)["loss"], torch.full((2,), math.log(2)))


def test_ipo_loss_by_hand() -> None:
    # tau = 0.25: target 1 / (2 tau) = 2; pair 0: (2 - 2)^2 = 0; pair 1: (-2 - 2)^2 = 16
    out = ipo.ipo_loss(PC, PR, RC, RR, tau=0.25)
    assert torch.allclose(out["loss"], torch.tensor([0.0, 16.0]))
    # Unlike DPO it pushes back once the margin overshoots the target: h = 3 > 2 gives a positive gradient in h.
    pc = torch.tensor([0.0], requires_grad=True)  # h = (0 - -2) - (-3 - -2) = 3
    ipo.ipo_loss(pc, PR[:1], RC[:1], RR[:1], tau=0.25)["loss"].sum().backward()
    assert torch.allclose(pc.grad, torch.tensor([2.0]))  # 2 (h - target) = 2
    # tau = 0.1: target 5; at h = 0 the loss is 25.
    assert torch.allclose(ipo.ipo_loss(RC, RR, RC, RR, tau=0.1)["loss"], torch.full((2,), 25.0))


def labelled(prompt: str, first: str, second: str, preferred, i: int) -> LabelledPair:
    pair = Pair(prompt=prompt, responses=(first, second), policy_version=0, pair_id=f"t-{i}")
    return LabelledPair(entry_id=f"0-{i}", pair=pair, label=Label(preferred, "test", 0.0), epoch=0)


def test_pair_columns_put_the_chosen_response_first_and_mark_ties() -> None:
    task = ReverseDigits()
    cols = pair_columns(task, [labelled("123>", "321", "999", 1, 0), labelled("123>", "3", "32111", "tie", 1)])
    assert cols["input_ids"].shape == (2, 2, 1 + 4 + 5)
    assert cols[VALID].tolist() == [True, False]
    # pair 0 preferred response 1 ("999"): it comes first. bos=1, "1"=5, ">"=3, "9"=13, eos=2.
    assert cols["input_ids"][0, 0].tolist() == [1, 5, 6, 7, 3, 13, 13, 13, 2, 0]
    assert cols["response_mask"][0, 0].tolist() == [False] * 5 + [True] * 4 + [False]
    # a response of max_new_tokens characters was cut: no eos appended.
    assert cols["input_ids"][1, 1].tolist()[5:] == [7, 6, 5, 5, 5]


@pytest.mark.parametrize("rule, expected_first_loss", [(dpo.RULE, math.log(2)), (ipo.RULE, 25.0)])
def test_one_learner_update_through_a_learner_group(rule, expected_first_loss: float) -> None:
    """A real RLlib TorchLearner in a local LearnerGroup: the first loss is the hand value (policy =
    reference, so h = 0), ties are left out, and repeated updates widen the chosen-vs-rejected margin."""
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
        from algorithms.preference.base import learner_batch

        batch = learner_batch(task, pairs)
        first = group.update(batch=batch)
        stats = (first[0] if isinstance(first, list) else first)["default_policy"]
        peek = lambda v: float(v.peek() if hasattr(v, "peek") else v)  # noqa: E731
        assert peek(stats["preference_loss"]) == pytest.approx(expected_first_loss, rel=1e-5)
        assert peek(stats["pairs"]) == 6.0  # the tie is not in the loss
        for _ in range(5):
            group.update(batch=batch)
        model = build_causal_lm(config.lm)
        state = group.get_weights()["default_policy"]
        model.load_state_dict({k[len("model."):]: torch.as_tensor(np.array(v)) for k, v in state.items()})
        results = group.foreach_learner(lambda learner: learner.reference_weights())
        ref_model = build_causal_lm(config.lm)
        ref_model.load_state_dict({k: torch.as_tensor(v) for k, v in next(iter(results)).get().items()})
        cols = {k: torch.as_tensor(v) for k, v in pair_columns(task, pairs[:6]).items()}
        with torch.no_grad():
            logp, ref = pair_logprobs(model, cols), pair_logprobs(ref_model, cols)
        margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
        assert bool((margin > 0).all()), margin
    finally:
        group.shutdown()


@pytest.mark.parametrize("rule", [dpo.RULE, ipo.RULE])
def test_rule_declarations_and_bad_options(rule) -> None:
    assert rule.family == "preference" and rule.paper_ids in (("DPO-2023",), ("IPO-2023",))
    assert {"beta", "lr", "pairs_per_step"} <= set(rule.option_names())
    config = rule.config_class()
    config.beta = 0.0
    with pytest.raises(ValueError, match="beta must be > 0"):
        config.validate()
    config = rule.config_class()
    config.sft_noise = 1.5
    with pytest.raises(ValueError, match="sft_noise"):
        config.validate()
