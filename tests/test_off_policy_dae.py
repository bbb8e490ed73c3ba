"""Off-policy DAE (P191, algorithms/offpolicy/off_policy_dae.py): the loss, the constraints and the luck model on
batches computed by hand, and the paper's claim in miniature: on stochastic transitions with off-policy data,
dropping the luck term biases the advantage, keeping it does not."""

import math

import pytest
import torch

from algorithms.offpolicy.off_policy_dae import (
    centred_luck,
    cvae_loss,
    greedy_centred_advantage,
    off_policy_dae_loss,
)
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError


def test_dae_loss_by_hand():
    # gamma 0.5; r = [1, 2], A = [-0.5, 0], B = [0.2, -0.4], V(s_0) = 1, V^-(s_2) = 4
    advantages = torch.tensor([[-0.5, 0.0]], requires_grad=True)
    value = torch.tensor([1.0], requires_grad=True)
    out = off_policy_dae_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[False, False]]),
                              torch.tensor([[True, True]]), advantages, torch.tensor([[0.2, -0.4]]), value,
                              torch.tensor([4.0]), gamma=0.5)
    # corrected rewards: 1 + 0.5 - 0.5 * 0.2 = 1.4; 2 - 0 + 0.5 * 0.4 = 2.2; sum 1.4 + 0.5 * 2.2 = 2.5
    # residual = 2.5 + 0.25 * 4 - 1 = 2.5; loss 6.25
    torch.testing.assert_close(out["residual"], torch.tensor([2.5]))
    torch.testing.assert_close(out["loss"], torch.tensor(6.25))
    out["loss"].backward()
    # d/dA_t = 2 * 2.5 * (-gamma^t) = [-5, -2.5]; d/dV(s_0) = -5
    torch.testing.assert_close(advantages.grad, torch.tensor([[-5.0, -2.5]]))
    torch.testing.assert_close(value.grad, torch.tensor([-5.0]))


def test_dae_loss_stops_at_termination_and_ignores_padding():
    out = off_policy_dae_loss(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[False, True, False]]),
                              torch.tensor([[True, True, False]]), torch.tensor([[-0.5, 0.0, 5.0]]),
                              torch.tensor([[0.2, -0.4, 5.0]]), torch.tensor([1.0]), torch.tensor([4.0]), gamma=0.5)
    # 2.5 from above, no bootstrap (terminated), padding ignored: residual 2.5 - 1 = 1.5
    torch.testing.assert_close(out["loss"], torch.tensor(2.25))


def test_constraints():
    a = greedy_centred_advantage(torch.tensor([[1.0, 3.0, 2.0]]))
    torch.testing.assert_close(a, torch.tensor([[-2.0, 0.0, -1.0]]))  # sum_a pi(a|s) A = A(greedy) = 0
    g = torch.tensor([2.0, -2.0])
    # B = (0.9 - 0.5) * 2 + (0.1 - 0.5) * (-2) = 1.6
    torch.testing.assert_close(centred_luck(torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5]), g), torch.tensor(1.6))
    # Two equally likely outcomes encoded as z = 0 and z = 1, prior = their average: E_{s'} B = (2 + (-2)) / 2 = 0.
    outcomes = centred_luck(torch.eye(2), torch.tensor([[0.5, 0.5]] * 2), g.expand(2, 2))
    torch.testing.assert_close(outcomes, torch.tensor([2.0, -2.0]))


def test_cvae_loss_by_hand():
    # q = softmax([0, 0]) = [0.5, 0.5]; p = softmax([0, ln 3]) = [0.25, 0.75]; reconstructions 1 and 3 of outcome 2
    loss = cvae_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]),
                     torch.tensor([[[1.0], [3.0]]]), torch.tensor([[2.0]]))
    # sum_z q 1/2 (x_z - 2)^2 = 0.5; KL = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.5 ln(4/3)
    torch.testing.assert_close(loss, torch.tensor([0.5 + 0.5 * math.log(4.0 / 3.0)]))


def _fit_two_step_task(luck_correction: bool, seed: int = 0) -> float:
    """A tabular two-step task with off-policy data; returns the learnt A(s0, 0) - A(s0, 1) (truth: 0).

    Step 0 in s0: action 0 pays 0 and leads to s1; action 1 pays +1 and leads to s1 (lucky) or pays -1 and leads
    to s2 (unlucky), each with probability 1/2 (nature's draw z). Step 1 in s1 or s2: action 0 pays 0, action 1
    pays -1, then the episode ends. Target policy: greedy (a = 0 at step 1), so V(s1) = V(s2) = 0 and
    Q(s0, 0) = Q(s0, 1) = 0. Behaviour: uniform at step 0; at step 1 it takes the good action 0 with probability
    0.9 in s1 but only 0.1 in s2 - its mistakes correlate with bad luck. Without the luck term the least-squares
    fit blames part of the unlucky branch's -1 on the bad action in s2 (A(s2, 1) below its true -1) and credits
    action 1 in s0 with the rest (A(s0, 0) - A(s0, 1) comes out near -0.8 with seed 0; with B it is 0)."""
    torch.manual_seed(seed)
    f = torch.zeros(3, 2, requires_grad=True)  # f(s, a) for s0, s1, s2
    v0 = torch.zeros(1, requires_grad=True)
    g = torch.zeros(2, 2, requires_grad=True)  # luck head g(s0, a0, z)
    opt = torch.optim.Adam([f, v0, g], lr=0.02)
    n = 1024
    for _ in range(2000):
        a0 = torch.randint(0, 2, (n,))
        lucky = torch.rand(n) < 0.5
        s1 = torch.where((a0 == 1) & ~lucky, 2, 1)
        z = torch.where(a0 == 1, lucky.long(), 0)
        r0 = torch.where(a0 == 1, torch.where(lucky, 1.0, -1.0), 0.0)
        good = torch.where(s1 == 1, 0.9, 0.1)
        a1 = (torch.rand(n) >= good).long()
        r1 = -a1.float()
        adv = greedy_centred_advantage(f)
        advantages = torch.stack([adv[0, a0], adv[s1, a1]], dim=1)
        # Nature's draw is observed through s'; the model's prior is its true distribution given (s0, a0).
        posterior = torch.nn.functional.one_hot(z, 2).float()
        prior = torch.where((a0 == 1).unsqueeze(-1), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
        luck0 = centred_luck(posterior, prior, g[a0]) if luck_correction else torch.zeros(n)
        luck = torch.stack([luck0, torch.zeros(n)], dim=1)  # step 1 is deterministic
        out = off_policy_dae_loss(torch.stack([r0, r1], 1), torch.tensor([[False, True]]).expand(n, 2),
                                  torch.ones(n, 2, dtype=torch.bool), advantages, luck, v0.expand(n),
                                  torch.zeros(n), gamma=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    adv = greedy_centred_advantage(f.detach())
    return float(adv[0, 0] - adv[0, 1])


def test_luck_term_removes_the_off_policy_bias():
    corrected = _fit_two_step_task(luck_correction=True)
    uncorrected = _fit_two_step_task(luck_correction=False)
    assert abs(corrected) < 0.1, corrected
    assert uncorrected < -0.3, uncorrected  # action 1 looks better than it is


def test_dae_options_are_checked():
    rule = get_rule("off_policy_dae")
    with pytest.raises(UserError, match="window"):
        build_config(rule, "CartPole-v1", 0, {"window": "0"})
    with pytest.raises(UserError, match="model_loss_coeff"):
        build_config(rule, "CartPole-v1", 0, {"model_loss_coeff": "-1"})
    config, _ = build_config(rule, "CartPole-v1", 0, {"luck_correction": "false"})
    assert config.luck_correction is False and config.sequence_length() == 8
