"""SPO / "sspo" (P129): the degree classifier and the loss on hand-computed batches, and real RLlib Learner updates
through a local LearnerGroup (degree copies built from the batch's responses, classified by a head on the LM)."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.preference import sspo
from algorithms.preference.base import learner_batch
from envs.text_tasks import ReverseDigits, encode
from test_dpo_ipo import labelled  # labelled text pairs for a learner batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# DPO inputs (policy chosen, policy rejected, reference chosen, reference rejected): h = 2 and -2
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


def test_degree_loss_by_hand() -> None:
    # K = 2 (3 classes). Row 0 has three copies (degrees 0, 1, 2), row 1 only two (its response had one key token).
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0],   # row 0
                           [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])                    # row 1
    labels = torch.tensor([0, 1, 2, 0, 1])
    rows = torch.tensor([0, 0, 0, 1, 1])
    # CE([2,0,0], 0) = log(1 + 2 e^-2) = 0.239530;  CE([0,0,0], .) = log 3 = 1.098612;
    # CE([0,0,1], 2) = CE([0,1,0], 1) = log(1 + 2/e) = 0.551445
    # row 0: (0.239530 + 1.098612 + 0.551445) / 3 = 0.629862;  row 1: (1.098612 + 0.551445) / 2 = 0.825029
    out = sspo.degree_loss(logits, labels, rows, 2)
    assert torch.allclose(out, torch.tensor([0.629862, 0.825029]), atol=1e-6)
    assert out[0].item() == pytest.approx((math.log(1 + 2 * math.exp(-2)) + math.log(3) + math.log(1 + 2 / math.e)) / 3)


def test_sspo_loss_by_hand() -> None:
    # beta = 0.5: DPO = -log sigmoid(beta h) = log(1 + e^-1) = 0.313262 and log(1 + e) = 1.313262
    # lambda = 0.5, degree losses 0.629862 / 0.825029:
    #   loss = 0.313262 + 0.314931 = 0.628193 and 1.313262 + 0.412515 = 1.725777
    degree = torch.tensor([0.629862, 0.825029])
    out = sspo.sspo_loss(PC, PR, RC, RR, beta=0.5, lam=0.5, degree=degree)
    assert torch.allclose(out["dpo"], torch.tensor([0.313262, 1.313262]), atol=1e-6)
    assert torch.allclose(out["loss"], torch.tensor([0.628193, 1.725777]), atol=1e-6)
    assert torch.allclose(sspo.sspo_loss(PC, PR, RC, RR, 0.5, 0.0, degree)["loss"], out["dpo"])


class PositionLM(torch.nn.Module):
    """A fake LM whose final hidden state at position t is (t, 1): shows which position the classifier reads."""

    def base_model(self, input_ids, attention_mask, position_ids):
        b, t = input_ids.shape
        hidden = torch.stack([torch.arange(t, dtype=torch.float32), torch.ones(t)], dim=-1).expand(b, t, 2)
        return type("Out", (), {"last_hidden_state": hidden})()


def test_degree_logits_read_the_state_after_the_response() -> None:
    prompts = [encode("^12>"), encode("^12>")]
    responses = [encode("21$"), encode("2$")]  # rows of 7 and 6 real tokens (right padding for the second)
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.zero_()
    # h = (t_last, 1): logits = (t, 1, t + 1) with t_last = 6 and 5
    logits = sspo.degree_logits(PositionLM(), head, prompts, responses)
    assert logits.tolist() == [[6.0, 1.0, 7.0], [5.0, 1.0, 6.0]]


def test_learner_group_update_learns_the_degrees() -> None:
    torch.manual_seed(0)
    config = sspo.SSPOConfig().learners(num_learners=0).debugging(seed=0)
    config.lr = 3e-3
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    try:
        group.foreach_learner(lambda learner: learner.reset_reference())
        pairs = [labelled(f"{i}{i}7>", f"7{i}{i}", f"{(i + 1) % 10}{i}{i}", 0, i) for i in range(6)]
        pairs.append(labelled("555>", "555", "5", "tie", 9))
        batch = learner_batch(ReverseDigits(), pairs)
        peek = lambda v: float(v.peek() if hasattr(v, "peek") else v)  # noqa: E731
        stats = []
        for _ in range(8):
            out = group.update(batch=batch)
            stats.append((out[0] if isinstance(out, list) else out)["default_policy"])
        first, last = stats[0], stats[-1]
        # policy = reference at first: DPO is log 2; the head starts at zero, so every copy's CE is log 3 (K = 2):
        # loss = log 2 + lambda log 3 = 0.693147 + 0.1 * 1.098612 = 0.803008
        assert peek(first["degree_loss"]) == pytest.approx(math.log(3), rel=1e-5)
        assert peek(first["preference_loss"]) == pytest.approx(math.log(2) + 0.1 * math.log(3), rel=1e-5)
        assert peek(first["pairs"]) == 6.0  # the tie is not in the loss
        # the classifier learns the degrees of these copies (loss down from about log 3, accuracy up)
        assert peek(last["degree_loss"]) < 0.7 * peek(first["degree_loss"])
        assert peek(last["degree_accuracy"]) > peek(first["degree_accuracy"])
    finally:
        group.shutdown()


def test_rule_declaration_and_bad_options() -> None:
    rule = sspo.RULE
    assert rule.family == "preference" and rule.paper_ids == ("P129",)
    assert {"degree_weight", "degrees", "degree_responses"} <= set(rule.option_names())
    for name, value, message in [("degree_weight", -1.0, "degree_weight must be >= 0"),
                                 ("degrees", 0, "degrees must be an integer >= 1"),
                                 ("degree_responses", "rejected", "degree_responses must be one of")]:
        config = sspo.SSPOConfig()
        setattr(config, name, value)
        with pytest.raises(ValueError, match=message):
            config.validate()
