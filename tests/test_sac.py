"""SAC's losses (algorithms/offpolicy/sac.py) on a hand-computed batch: the soft target with its entropy term."""

import math

import torch

from algorithms.common.td_targets import soft_q_target
from algorithms.offpolicy.sac import sac_losses

LOG_ALPHA = torch.tensor([math.log(0.5)])  # alpha = 0.5
REWARDS = torch.tensor([0.5, 1.0])
TERMINATEDS = torch.tensor([False, True])
NEXT_Q1, NEXT_Q2 = torch.tensor([2.0, 7.0]), torch.tensor([3.0, 8.0])  # min = [2, 7]
NEXT_LOGP = torch.tensor([-1.0, 0.3])


def losses(log_alpha=LOG_ALPHA, logp_new=torch.tensor([-0.4, 0.2]), q_new=torch.tensor([1.0, 3.0])):
    return sac_losses(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.0]), REWARDS, TERMINATEDS, 0.9,
                      [NEXT_Q1, NEXT_Q2], NEXT_LOGP, logp_new, q_new, log_alpha, target_entropy=-1.0)


def test_soft_target_subtracts_alpha_log_pi_of_the_next_action():
    # y_0 = 0.5 + 0.9 * (min(2, 3) - 0.5 * (-1.0)) = 0.5 + 0.9 * 2.5 = 2.75;  y_1 = 1.0 (terminated)
    target = soft_q_target(REWARDS, TERMINATEDS, 0.9, [NEXT_Q1, NEXT_Q2], NEXT_LOGP, 0.5)
    torch.testing.assert_close(target, torch.tensor([2.75, 1.0]))
    torch.testing.assert_close(losses()["target"], torch.tensor([2.75, 1.0]))


def test_critic_actor_and_temperature_losses():
    out = losses()
    # critic: 1/2 mean((1 - 2.75)^2, (2 - 1)^2) = 1/2 mean(3.0625, 1) = 1.015625
    torch.testing.assert_close(out["critic"], torch.tensor(1.015625))
    # twin: 1/2 mean((1.5 - 2.75)^2, (0 - 1)^2) = 1/2 mean(1.5625, 1) = 0.640625
    torch.testing.assert_close(out["critic_twin"], torch.tensor(0.640625))
    # actor: mean(0.5 * -0.4 - 1, 0.5 * 0.2 - 3) = mean(-1.2, -2.9) = -2.05
    torch.testing.assert_close(out["actor"], torch.tensor(-2.05))
    # temperature: -log(0.5) * mean(-0.4 - 1, 0.2 - 1) = 0.693147 * -1.1 = -0.762462
    torch.testing.assert_close(out["alpha"], torch.tensor(math.log(0.5) * 1.1), atol=1e-6, rtol=1e-6)


def test_temperature_falls_when_entropy_is_above_target():
    log_alpha = LOG_ALPHA.clone().requires_grad_(True)
    losses(log_alpha=log_alpha)["alpha"].backward()
    # d/dlog_alpha = -mean(log pi + H_target) = -(-0.1 - 1) = 1.1 > 0: gradient descent lowers alpha.
    torch.testing.assert_close(log_alpha.grad, torch.tensor([1.1]))


def test_actor_gradient_reaches_log_pi_but_not_the_target():
    logp_new = torch.tensor([-0.4, 0.2], requires_grad=True)
    q_new = torch.tensor([1.0, 3.0], requires_grad=True)
    out = losses(logp_new=logp_new, q_new=q_new)
    assert not out["target"].requires_grad
    out["actor"].backward()
    torch.testing.assert_close(logp_new.grad, torch.tensor([0.25, 0.25]))  # alpha / B
    torch.testing.assert_close(q_new.grad, torch.tensor([-0.5, -0.5]))     # -1 / B
