"""PMOE's mixture policy and losses (P045, algorithms/offpolicy/sac_pmoe.py) on hand-computed numbers."""

import math

import pytest
import torch

from algorithms.common.mixture_policy import (
    mixture_log_prob,
    routing_frequency_loss,
    sample_mixture,
    split_mixture_inputs,
)
from algorithms.offpolicy.sac_pmoe import pmoe_actor_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

LOG_N01_AT_0 = -0.5 * math.log(2 * math.pi)  # log N(0; 0, 1) = -0.918939


def test_head_output_layout():
    # K = 2, d = 1: [logit_1, logit_2, mean_1, log_std_1, mean_2, log_std_2]; log-stds clamped to [-5, 2]
    logits, mean, log_std = split_mixture_inputs(torch.tensor([[0.1, 0.2, 1.0, -9.0, 2.0, 0.5]]), 2, 1)
    torch.testing.assert_close(logits, torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(mean, torch.tensor([[[1.0], [2.0]]]))
    torch.testing.assert_close(log_std, torch.tensor([[[-5.0], [0.5]]]))


def test_mixture_log_density_by_hand():
    logits = torch.tensor([[0.0, 0.0]])               # w = (0.5, 0.5)
    mean = torch.tensor([[[0.0], [2.0]]])
    log_std = torch.zeros(1, 2, 1)                    # unit variances
    # u = 0: log(0.5 N(0; 0, 1) + 0.5 N(0; 2, 1)) = log(0.5 * 0.398942 + 0.5 * 0.053991) = -1.485158;
    # squash term log(1 - tanh(0)^2) = 0
    torch.testing.assert_close(mixture_log_prob(torch.tensor([[0.0]]), logits, mean, log_std),
                               torch.tensor([-1.485158]), atol=1e-5, rtol=1e-5)
    # One expert with all the weight, u = 0.5: log N(0.5; 0, 1) - log(1 - tanh(0.5)^2)
    #   = (-0.125 - 0.918939) + 0.240229 = -0.803710
    sharp = torch.tensor([[0.0, -1e4]])
    torch.testing.assert_close(mixture_log_prob(torch.tensor([[0.5]]), sharp, mean, log_std),
                               torch.tensor([-0.803710]), atol=1e-5, rtol=1e-5)
    # Several candidate actions per state ([B, M, d]) give the same numbers candidate by candidate.
    both = mixture_log_prob(torch.tensor([[[0.0], [0.5]]]), sharp, mean, log_std)
    torch.testing.assert_close(both, torch.tensor([[LOG_N01_AT_0, -0.803710]]), atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_routing_weights():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, -1e4]]).expand(200, 2)          # always expert 1
    mean = torch.tensor([[[5.0], [-5.0]]]).expand(200, 2, 1)
    u = sample_mixture(logits, mean, torch.full((200, 2, 1), -5.0))  # sigma = e^-5: u stays near 5
    assert torch.all((u - 5.0).abs() < 0.1)


def test_frequency_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # w = (0.25, 0.75)
    loss = routing_frequency_loss(logits, torch.tensor([0]))
    # (0.25 - 1)^2 + (0.75 - 0)^2 = 0.5625 + 0.5625 = 1.125
    torch.testing.assert_close(loss, torch.tensor(1.125))
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises the best expert's weight


def test_actor_loss_backpropagates_through_the_best_expert_only():
    q = torch.tensor([[1.0, 3.0]], requires_grad=True)        # expert 2 has the larger Q: k* = 2
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    logits = torch.tensor([[0.0, math.log(3.0)]])             # w = (0.25, 0.75)
    out = pmoe_actor_loss(q, logp, logits, alpha=0.5, frequency_coeff=1.0)
    assert out["best"].tolist() == [1]
    # J_pi = 0.5 * (-2) - 3 = -4;  J_w = 0.25^2 + (0.75 - 1)^2 = 0.125;  total = -3.875
    torch.testing.assert_close(out["actor"], torch.tensor(-4.0))
    torch.testing.assert_close(out["frequency"], torch.tensor(0.125))
    torch.testing.assert_close(out["total"], torch.tensor(-3.875))
    out["total"].backward()
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.5]]))


def test_bad_options_are_refused():
    rule = get_rule("sac_pmoe")
    with pytest.raises(UserError, match="num_experts"):
        build_config(rule, "Pendulum-v1", 0, {"num_experts": "0"})
    with pytest.raises(UserError, match="frequency_loss_coeff"):
        build_config(rule, "Pendulum-v1", 0, {"frequency_loss_coeff": "-1"})
    config, options = build_config(rule, "Pendulum-v1", 0, {"num_experts": "2"})
    assert options["num_experts"] == 2 and config.model_config["num_experts"] == 2
