"""On-policy MDPO (P010): the loss and step-size schedule by hand, the mirror-descent fixed point, the Ray path."""

import math

import pytest
import torch

from algorithms.common.divergences import kl_categorical
from algorithms.onpolicy.mdpo import mdpo_loss, mdpo_step_size
from algorithms.registry import build_config, get_rule


def test_step_size_is_annealed_linearly_with_a_floor():
    # t_k = max(t_min, 1 - k/K): K = 100k steps
    assert mdpo_step_size(0, 100_000, 0.01) == 1.0
    assert mdpo_step_size(25_000, 100_000, 0.01) == pytest.approx(0.75)  # 1 - 0.25
    assert mdpo_step_size(99_500, 100_000, 0.01) == pytest.approx(0.01)  # 1 - 0.995 = 0.005 -> floor 0.01
    assert mdpo_step_size(300_000, 100_000, 0.05) == 0.05  # past K: the floor


def test_mdpo_loss_by_hand():
    logp = torch.log(torch.tensor([0.6, 0.3]))
    old_logp = torch.log(torch.tensor([0.5, 0.5]))  # ratios 1.2 and 0.6
    adv = torch.tensor([2.0, -1.0])
    kl = torch.tensor([0.1, 0.3])  # KL(pi_theta || pi_k) per state
    entropy = torch.tensor([0.5, 0.7])
    terms = mdpo_loss(logp, old_logp, adv, kl, entropy, step_size=0.5, entropy_coeff=0.1)
    # surrogate = mean(1.2*2, 0.6*-1) = (2.4 - 0.6)/2 = 0.9 ; mean KL = 0.2 ; mean entropy = 0.6
    # -Psi = -0.9 + 0.2 / 0.5 - 0.1 * 0.6 = -0.9 + 0.4 - 0.06 = -0.56
    assert terms["surrogate"].item() == pytest.approx(0.9)
    assert terms["kl"].item() == pytest.approx(0.2)
    assert terms["total_loss"].item() == pytest.approx(-0.56)


def test_mdpo_loss_ignores_masked_rows():
    zeros = torch.zeros(3)
    adv = torch.tensor([1.0, 3.0, 100.0])
    kl = torch.tensor([0.2, 0.4, 50.0])
    mask = torch.tensor([True, True, False])  # the phantom bootstrap row
    terms = mdpo_loss(zeros, zeros, adv, kl, zeros, step_size=1.0, mask=mask)
    # ratios 1: surrogate = (1 + 3)/2 = 2 ; KL = 0.3 ; -Psi = -2 + 0.3
    assert terms["total_loss"].item() == pytest.approx(-1.7)


def test_many_steps_reach_the_mirror_descent_solution():
    """One state, 3 actions, pi_k uniform, each action sampled once (so the sample average of r*A is exact).

    argmax_pi sum_a pi(a) A(a) - (1/t) KL(pi || pi_k) is pi*(a) ∝ pi_k(a) exp(t A(a)) (the KL(new || old) mirror
    step). With A = [1, 0, -1] and t = 0.5: pi* ∝ [e^0.5, 1, e^-0.5] = [1.6487, 1, 0.6065] / 3.2552
    = [0.5065, 0.3072, 0.1863]. The other KL direction would give a different fixed point.
    """
    theta = torch.zeros(3, requires_grad=True)
    actions = torch.tensor([0, 1, 2])
    adv = torch.tensor([1.0, 0.0, -1.0])
    old_logits = torch.zeros(3)
    old_logp = torch.log_softmax(old_logits, -1)[actions]
    optimizer = torch.optim.Adam([theta], lr=0.05)
    for _ in range(3000):
        logp = torch.log_softmax(theta, -1)[actions]
        kl = kl_categorical(theta, old_logits).expand(3)  # KL(pi_theta || pi_k), the same state 3 times
        loss = mdpo_loss(logp, old_logp, adv, kl, torch.zeros(3), step_size=0.5)["total_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    z = math.exp(0.5) + 1 + math.exp(-0.5)
    expected = torch.tensor([math.exp(0.5) / z, 1 / z, math.exp(-0.5) / z])
    torch.testing.assert_close(torch.softmax(theta.detach(), -1), expected, atol=1e-4, rtol=0)


def test_first_gradient_is_the_policy_gradient():
    # At theta = theta_k the KL term has zero gradient: the first step is the plain surrogate's gradient.
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    actions = torch.tensor([0, 1, 1])
    adv = torch.tensor([1.0, -0.5, 2.0])
    old = theta.detach().clone()
    logp = torch.log_softmax(theta, -1)[actions]
    old_logp = torch.log_softmax(old, -1)[actions]
    with_kl = mdpo_loss(logp, old_logp, adv, kl_categorical(theta, old).expand(3), torch.zeros(3), step_size=0.1)
    (g_kl,) = torch.autograd.grad(with_kl["total_loss"], theta, retain_graph=True)
    (g_pg,) = torch.autograd.grad(-with_kl["surrogate"], theta)
    torch.testing.assert_close(g_kl, g_pg)


def test_bad_options_are_rejected():
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="min_step_size"):
        build_config(get_rule("mdpo"), "CartPole-v1", 0, {"min_step_size": "0"})
    with pytest.raises(UserError, match="sgd_steps"):
        build_config(get_rule("mdpo"), "CartPole-v1", 0, {"sgd_steps": "0"})


def test_step_size_follows_sampled_steps_through_ray(ray_session):
    config, _ = build_config(get_rule("mdpo"), "CartPole-v1", 0,
                             {"train_batch_size": "256", "anneal_timesteps": "1000", "sgd_steps": "2", "vf_epochs": "1"})
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
            steps = result["env_runners"]["num_env_steps_sampled_lifetime"]
            learner = result["learners"]["default_policy"]
            # t_k = max(0.01, 1 - steps / 1000): about 0.744 after 256 steps, 0.488 after 512
            assert learner["step_size"] == pytest.approx(max(0.01, 1 - steps / 1000))
            assert learner["kl_new_old"] >= 0.0
    finally:
        algo.stop()
