"""FixPO (P209): the primary-phase loss and the beta update by hand; the trust-region guarantee through Ray."""

import pytest
import torch

from algorithms.onpolicy.fixpo import BETA_STATE_KEY, fixpo_beta_loss, fixpo_loss, violates_trust_region
from algorithms.registry import build_config, get_rule


def test_primary_loss_by_hand():
    logp = torch.log(torch.tensor([0.6, 0.3]))
    old_logp = torch.log(torch.tensor([0.5, 0.5]))  # ratios 1.2 and 0.6 (no clipping in FixPO)
    adv = torch.tensor([2.0, -1.0])
    kl = torch.tensor([0.02, 0.06])  # KL(pi_old || pi_theta) per state
    values, targets = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0])
    entropy = torch.tensor([0.5, 0.7])
    terms = fixpo_loss(logp, old_logp, adv, kl, values, targets, entropy, beta=3.0, vf_coeff=0.5, entropy_coeff=0.01)
    # surrogate = (1.2*2 + 0.6*-1)/2 = 0.9 ; beta * mean KL = 3 * 0.04 = 0.12 ; vf = (1 + 4)/2 = 2.5 ; H = 0.6
    # total = -0.9 + 0.12 + 0.5*2.5 - 0.01*0.6 = 0.464
    assert terms["policy_loss"].item() == pytest.approx(-0.9)
    assert terms["kl"].item() == pytest.approx(0.04)
    assert terms["total_loss"].item() == pytest.approx(0.464)


def test_beta_rises_when_the_margin_is_exceeded_and_falls_otherwise():
    eps, c = 0.2, 2.0
    beta = torch.tensor(1.0, requires_grad=True)
    # max KL 0.3: L_beta = beta * (0.2 - 2 * 0.3) = -0.4 beta -> dL/dbeta = -0.4: descent raises beta
    loss = fixpo_beta_loss(beta, torch.tensor([0.1, 0.3, 0.05]), eps, c)
    assert loss.item() == pytest.approx(-0.4)
    (grad,) = torch.autograd.grad(loss, beta)
    assert grad.item() == pytest.approx(-0.4)
    # max KL 0.05: 0.2 - 0.1 = 0.1 > 0 -> descent lowers beta
    (grad,) = torch.autograd.grad(fixpo_beta_loss(beta, torch.tensor([0.05, 0.01]), eps, c), beta)
    assert grad.item() == pytest.approx(0.1)
    # The KL is treated as data: no gradient flows into the policy through L_beta.
    kl = torch.tensor([0.3], requires_grad=True)
    fixpo_beta_loss(beta, kl, eps, c).backward()
    assert kl.grad is None


def test_constraint_is_on_the_max_over_states():
    assert violates_trust_region(torch.tensor([0.01, 0.21, 0.0]), 0.2)  # one state out is a violation
    assert not violates_trust_region(torch.tensor([0.19, 0.2, 0.0]), 0.2)  # on the boundary is inside


def test_bad_options_are_rejected():
    from rlfleet.errors import UserError

    with pytest.raises(UserError, match="c_beta"):
        build_config(get_rule("fixpo"), "CartPole-v1", 0, {"c_beta": "0.5"})
    with pytest.raises(UserError, match="eps_kl"):
        build_config(get_rule("fixpo"), "CartPole-v1", 0, {"eps_kl": "0"})


def test_fixup_enforces_the_trust_region_and_beta_is_checkpointed(ray_session, tmp_path):
    # A large step size and beta starting at 0 make the primary phase overshoot a small trust region, so the
    # fixup phase has work to do; after every update the max KL over the whole batch must be <= eps_KL.
    options = {"train_batch_size": "512", "minibatch_size": "64", "num_epochs": "4", "lr": "0.01",
               "eps_kl": "0.02", "init_beta": "0", "fixup_minibatch_size": "128"}
    rule = get_rule("fixpo")
    config, _ = build_config(rule, "CartPole-v1", 0, options)
    algo = config.build_algo()
    try:
        fixups = 0.0
        for _ in range(3):
            learner = algo.train()["learners"]["default_policy"]
            assert learner["fixup_incomplete"] == 0.0
            assert learner["max_kl"] <= 0.02 + 1e-7
            fixups += learner["fixup_steps"]
        assert fixups > 0  # the guarantee came from the fixup phase, not from luck
        beta = algo.learner_group._learner.get_state()[BETA_STATE_KEY]["default_policy"]
        assert beta > 0  # raised from 0 by the Lagrangian update
        algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    fresh, _ = build_config(rule, "CartPole-v1", 1, options)
    restored = fresh.build_algo()
    try:
        restored.restore_from_path(str(tmp_path / "ckpt"))
        assert restored.learner_group._learner.get_state()[BETA_STATE_KEY]["default_policy"] == pytest.approx(beta)
    finally:
        restored.stop()
