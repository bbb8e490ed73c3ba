"""SPAC (P249): the loss on a hand-computed batch, and real RLlib Learner updates through a local LearnerGroup
(the critic's base is the last iterate pi_t, the anchor, which moves at iteration ends)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.preference import spac
from algorithms.preference.base import learner_batch
from algorithms.preference.dpo import dpo_loss
from envs.text_tasks import ReverseDigits
from test_dpo_ipo import labelled  # labelled text pairs for a learner batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two pairs of sequence log-probs under the policy and under pi_t (the base), plus the self-play response y'.
PC, PR, PS = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
BC, BR, BS = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -3.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_spac_loss_by_hand() -> None:
    # beta = 0.5, lambda = 2. Critic values f = beta (log pi - log pi_t):
    #   pair 0: f_w = 0.5 (-1 + 2) = 0.5, f_l = 0.5 (-3 + 2) = -0.5, f' = 0.5 (-2 + 2) = 0
    #   pair 1: f_w = 0.5 (-2 + 1) = -0.5, f_l = 0.5 (-1 + 2) = 0.5,  f' = 0.5 (-4 + 3) = -0.5
    # BT fit: -log sigmoid(f_w - f_l) = softplus(f_l - f_w):
    #   pair 0 softplus(-1) = 0.313262, pair 1 softplus(1) = 1.313262
    # pessimism = 1/2 [softplus(f' - f_w) + softplus(f' - f_l)]:
    #   pair 0: 1/2 [softplus(-0.5) + softplus(0.5)] = 1/2 (0.474077 + 0.974077) = 0.724077
    #   pair 1: 1/2 [softplus(0) + softplus(-1)]     = 1/2 (0.693147 + 0.313262) = 0.503204
    # loss = BT + 2 pessimism: 0.313262 + 1.448154 = 1.761416 and 1.313262 + 1.006409 = 2.319671
    out = spac.spac_loss(PC, PR, BC, BR, 0.5, 2.0, PS, BS)
    assert torch.allclose(out["bradley_terry"], torch.tensor([softplus(-1), softplus(1)]))
    assert torch.allclose(out["pessimism"], torch.tensor([(softplus(-0.5) + softplus(0.5)) / 2,
                                                          (softplus(0.0) + softplus(-1.0)) / 2]))
    assert torch.allclose(out["loss"], torch.tensor([1.761416, 2.319671]), atol=1e-5)
    assert torch.allclose(out["critic_gap"], torch.tensor([0.0, -0.5]))  # f' - (f_w + f_l) / 2


def test_spac_gradients_point_the_pessimistic_way() -> None:
    # d loss / d log pi(y') = lambda * 1/2 * beta [sigmoid(f' - f_w) + sigmoid(f' - f_l)] > 0: the policy's own
    # samples are pushed down. pair 0: 2 * 0.5 * 0.5 (sigmoid(-0.5) + sigmoid(0.5)) = 0.5 (the sigmoids sum to 1);
    # pair 1: 0.5 (sigmoid(0) + sigmoid(-1)) = 0.5 (0.5 + 0.268941) = 0.384471
    ps = PS.clone().requires_grad_()
    spac.spac_loss(PC, PR, BC, BR, 0.5, 2.0, ps, BS)["loss"].sum().backward()
    assert torch.allclose(ps.grad, torch.tensor([0.5, 0.384471]), atol=1e-6)
    # the data's responses are pulled up by the pessimism term: both chosen and rejected get a negative gradient
    # from it (lambda = 2, no BT term: compare with lambda = 0)
    pr = PR.clone().requires_grad_()
    pessimism = spac.spac_loss(PC, pr, BC, BR, 0.5, 2.0, PS, BS)["pessimism"].sum()
    pessimism.backward()
    assert bool((pr.grad < 0).all())


def test_lambda_zero_is_dpo_against_the_last_iterate() -> None:
    out = spac.spac_loss(PC, PR, BC, BR, 0.5, 0.0, PS, BS)
    assert torch.allclose(out["loss"], dpo_loss(PC, PR, BC, BR, 0.5)["loss"])
    # policy = pi_t everywhere: every critic value is 0, so the loss is log 2 + lambda log 2
    same = spac.spac_loss(BC, BR, BC, BR, 0.1, 1.0, BS, BS)
    assert torch.allclose(same["loss"], torch.full((2,), 2 * math.log(2)))


def lm_weights(state: dict) -> dict[str, np.ndarray]:
    return {k[len("model."):]: np.asarray(v) for k, v in state.items() if k.startswith("model.")}


def test_learner_group_updates_and_the_last_iterate_moves_at_iteration_ends() -> None:
    torch.manual_seed(0)
    config = spac.SPACConfig().learners(num_learners=0).debugging(seed=0)
    config.lr = 3e-3
    config.iteration_steps = 2
    config.validate()
    group = config.build_learner_group(rl_module_spec=config.get_default_rl_module_spec())
    try:
        group.foreach_learner(lambda learner: learner.reset_reference())
        group.foreach_learner(lambda learner: learner.start_training(config))
        pairs = [labelled(f"{i}{i}7>", f"7{i}{i}", f"{(i + 1) % 10}{i}{i}", 0, i) for i in range(6)]
        pairs.append(labelled("555>", "555", "5", "tie", 9))
        batch = learner_batch(ReverseDigits(), pairs)
        first = group.update(batch=batch)
        stats = (first[0] if isinstance(first, list) else first)["default_policy"]
        peek = lambda v: float(v.peek() if hasattr(v, "peek") else v)  # noqa: E731
        # policy = pi_t at first: every critic value is 0 -> log 2 (BT) + 1.0 * log 2 (pessimism); the tie is out
        assert peek(stats["preference_loss"]) == pytest.approx(2 * math.log(2), rel=1e-5)
        assert peek(stats["pairs"]) == 6.0
        group.foreach_learner(lambda learner: learner.after_update(config, 1))  # mid-iteration: pi_t stays
        policy = lm_weights(group.get_weights()["default_policy"])
        anchor = next(iter(group.foreach_learner(lambda learner: learner.anchor_weights()))).get()
        assert any(not np.allclose(policy[k], anchor[k]) for k in policy), "pi_t moved before the iteration ended"
        group.update(batch=batch)
        group.foreach_learner(lambda learner: learner.after_update(config, 2))  # iteration end: pi_t <- policy
        policy = lm_weights(group.get_weights()["default_policy"])
        anchor = next(iter(group.foreach_learner(lambda learner: learner.anchor_weights()))).get()
        assert all(np.allclose(policy[k], anchor[k]) for k in policy)
        # a fresh iteration starts from critic values 0 again: the first loss of the next iteration is 2 log 2
        again = group.update(batch=batch)
        stats = (again[0] if isinstance(again, list) else again)["default_policy"]
        assert peek(stats["preference_loss"]) == pytest.approx(2 * math.log(2), rel=1e-4)
    finally:
        group.shutdown()


def test_rule_declaration_and_bad_options() -> None:
    rule = spac.RULE
    assert rule.family == "preference" and rule.paper_ids == ("P249",)
    assert {"pessimism", "iteration_steps", "beta"} <= set(rule.option_names())
    config = spac.SPACConfig()
    assert config.pair_source == "reference"  # offline: the paper's setting
    config.pessimism = -0.1
    with pytest.raises(ValueError, match="pessimism must be >= 0"):
        config.validate()
    config = spac.SPACConfig()
    config.iteration_steps = 0
    with pytest.raises(ValueError, match="iteration_steps"):
        config.validate()
