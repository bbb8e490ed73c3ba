"""Gradient clipping (P243, P232), the Polyak step size (P234) and ppo_polyak's f - f*, on hand-computed cases."""

import math

import gymnasium as gym
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from algorithms.common.optimizers import (
    clip_by_component_norm_,
    clip_by_global_norm_,
    clip_gradients_,
    polyak_step_size,
)
from algorithms.onpolicy.ppo import PPORuleConfig
from algorithms.onpolicy.ppo_polyak import PPOPolyakConfig, ppo_polyak_gap
from algorithms.onpolicy.trpo import _is_value_param
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError


def _grads():
    return [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]


def test_global_norm_clip_is_pascanus_rule():
    grads = _grads()
    norm = clip_by_global_norm_(grads, 6.5)
    # ||g|| = sqrt(9 + 16 + 144) = 13 >= 6.5, so g <- 6.5/13 g = g/2.
    assert float(norm) == 13.0
    torch.testing.assert_close(grads[0], torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(grads[1], torch.tensor([6.0]))


def test_global_norm_below_threshold_is_untouched():
    grads = _grads()
    clip_by_global_norm_(grads, 20.0)  # 13 < 20
    torch.testing.assert_close(grads[0], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(grads[1], torch.tensor([12.0]))
    zero = [torch.zeros(3)]
    clip_by_global_norm_(zero, 1.0)  # a zero gradient: no division by its norm
    assert torch.equal(zero[0], torch.zeros(3))


def test_component_clip_bounds_each_tensor_alone():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])]
    norms = clip_by_component_norm_(grads, 2.0)
    # ||g_1|| = 5 >= 2: g_1 <- 2/5 g_1 = [1.2, 1.6]; ||g_2|| = 1 < 2: unchanged.
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(grads[0], torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(grads[1], torch.tensor([0.6, 0.8]))
    # The global rule would have shrunk both: joint norm sqrt(26), scale 2/sqrt(26).
    together = [torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])]
    clip_gradients_(together, 2.0, "global_norm")
    torch.testing.assert_close(together[1], torch.tensor([0.6, 0.8]) * 2.0 / math.sqrt(26.0))


def test_value_clip_and_unknown_mode():
    grads = [torch.tensor([-3.0, 0.5, 2.0])]
    clip_gradients_(grads, 1.0, "value")
    torch.testing.assert_close(grads[0], torch.tensor([-1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="grad_clip_by='layer' is unknown"):
        clip_gradients_(grads, 1.0, "layer")
    clip_gradients_(grads, None, "layer")  # no threshold: nothing to do, whatever the mode


def test_polyak_step_size_by_hand():
    # (f - f*) / (c ||g||^2) = 2 / (0.5 * 4) = 1.0, below the bound 10.
    assert polyak_step_size(2.0, 4.0, 0.5, 10.0) == pytest.approx(1.0)
    assert polyak_step_size(2.0, 4.0, 0.5, 0.25) == 0.25  # SPS_max: capped at eta_max
    assert polyak_step_size(0.0, 4.0, 0.5, 10.0) == 0.0  # at the optimum: no step
    assert polyak_step_size(-1.0, 4.0, 0.5, 10.0) == 0.0  # below the assumed optimum: no step
    assert polyak_step_size(float("nan"), 4.0, 0.5, 10.0) == 0.0
    assert polyak_step_size(1.0, 0.0, 0.5, 10.0) == 10.0  # zero gradient: the bound (the step is 0 anyway)


def test_ppo_polyak_gap_by_hand():
    ratio = torch.tensor([1.5, 0.9, 0.7, 1.1])
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    # best_t = 1.2 A for A >= 0, 0.8 A for A < 0:  [1.2, 1.2, -1.6, -0.8]
    # min(r A, clip(r, 0.8, 1.2) A):             [min(1.5, 1.2), min(0.9, 0.9), min(-1.4, -1.6), min(-1.1, -1.1)]
    #                                           = [1.2, 0.9, -1.6, -1.1]
    # per-sample gaps [0, 0.3, 0, 0.3]; mean 0.15; without the last row (masked) 0.3 / 3 = 0.1.
    gap = ppo_polyak_gap(ratio, adv, 0.2)
    assert float(gap) == pytest.approx(0.15)
    mask = torch.tensor([True, True, True, False])
    assert float(ppo_polyak_gap(ratio, adv, 0.2, mask=mask)) == pytest.approx(0.1)
    # Entropy term, 2 actions: 0.1 * mean(log 2 - H) with H = [0.5, 0.6, log 2, 0.3].
    entropy = torch.tensor([0.5, 0.6, math.log(2.0), 0.3])
    expected = 0.15 + 0.1 * float(torch.mean(math.log(2.0) - entropy))
    got = ppo_polyak_gap(ratio, adv, 0.2, entropy=entropy, max_entropy=math.log(2.0), entropy_coeff=0.1)
    assert float(got) == pytest.approx(expected)


def _batch(module, n=6):
    torch.manual_seed(0)
    batch = {
        Columns.OBS: torch.randn(n, 4),
        Columns.ACTIONS: torch.tensor([0, 1, 1, 0, 1, 0])[:n],
        Postprocessing.ADVANTAGES: torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3, 0.1])[:n],
        Postprocessing.VALUE_TARGETS: torch.randn(n),
    }
    with torch.no_grad():
        out = module.forward_train(batch)
        dist = module.get_train_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        batch[Columns.ACTION_LOGP] = dist.logp(batch[Columns.ACTIONS])
        batch[Columns.ACTION_DIST_INPUTS] = out[Columns.ACTION_DIST_INPUTS]
    return batch


def _policy_gradient(module, batch):
    """grad of -mean(r A) at theta_old (r = 1 lies inside the clip range, so clipping changes nothing)."""
    params = [p for n, p in module.named_parameters() if not _is_value_param(n)]
    dist = module.get_train_action_dist_cls().from_logits(module.forward_train(batch)[Columns.ACTION_DIST_INPUTS])
    ratio = torch.exp(dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP])
    loss = -(ratio * batch[Postprocessing.ADVANTAGES]).mean()
    return params, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_ppo_polyak_learner_takes_the_polyak_step(grad_clip):
    # c = 4 and no entropy term (the defaults are c = 32, c_H = 0.01), so the step below is easy to write out.
    config = PPOPolyakConfig().environment("CartPole-v1").training(grad_clip=grad_clip, polyak_c=4.0,
                                                                   entropy_coeff=0.0)
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    batch = _batch(module)
    params, grads = _policy_gradient(module, batch)
    before = [p.detach().clone() for p in params]
    learner._uncompiled_update({"default_policy": batch})
    # At theta_old every ratio is 1: per-sample gap = eps |A_t|, so f - f* = 0.2 * mean|A| = 0.2 * 4.9 / 6.
    gap = 0.2 * 4.9 / 6
    sq_norm = sum(float((g**2).sum()) for g in grads)
    eta = min(gap / (4.0 * sq_norm), 10.0)  # c = 4, eta_max = 10; from the raw (unclipped) gradient
    scale = 1.0 if grad_clip is None or sq_norm**0.5 < grad_clip else grad_clip / sq_norm**0.5  # P243 clip
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - eta * scale * g, rtol=1e-5, atol=1e-7)
    assert grad_clip is None or scale < 1.0  # the clipped case really clipped


def test_any_rule_gets_polyak_with_a_known_optimum():
    # A rule that supplies no gap of its own: f - f* = total loss - polyak_f_star, over all parameters (one SGD).
    config = PPORuleConfig().environment("CartPole-v1").training(
        step_size_rule="polyak", polyak_f_star=-5.0, polyak_c=0.5, polyak_max_lr=100.0, grad_clip=None
    )
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    batch = _batch(module)
    params = list(module.parameters())
    before = [p.detach().clone() for p in params]
    fwd = module.forward_train(batch)
    loss = learner.compute_loss_for_module(module_id="default_policy", config=config, batch=batch, fwd_out=fwd)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    eta = (loss.item() + 5.0) / (0.5 * sum(float((g**2).sum()) for g in grads))
    learner._uncompiled_update({"default_policy": batch})
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - min(eta, 100.0) * g, rtol=1e-5, atol=1e-7)


def test_component_clipping_inside_the_learner():
    config = PPORuleConfig().environment("CartPole-v1").training(grad_clip=0.01, grad_clip_by="norm")
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    module = learner.module["default_policy"]
    batch = _batch(module)
    multi_batch = {"default_policy": batch}
    losses = learner.compute_losses(fwd_out=learner.module.forward_train(multi_batch), batch=multi_batch)
    raw = {ref: g.clone() for ref, g in learner.compute_gradients(losses).items() if g is not None}
    clipped = learner.postprocess_gradients({ref: g.clone() for ref, g in raw.items()})
    for ref, g in raw.items():
        norm = float(g.norm())
        expected = g * (0.01 / norm) if norm >= 0.01 else g  # each parameter tensor on its own (P232)
        torch.testing.assert_close(clipped[ref], expected)
    assert not learner._lean_step_supported()  # the fused step would clip by global norm: it must stay off


def test_ppo_family_rules_offer_the_gradient_rules():
    # Every rule on PPO's learner takes them through --set; a rule with its own optimizers is not offered the
    # Polyak step (it would need plain SGD on each of them) but keeps the clipping rules.
    config, _ = build_config(get_rule("ppo"), "CartPole-v1", 0, {"step_size_rule": "polyak", "grad_clip_by": "norm"})
    assert config.step_size_rule == "polyak" and config.grad_clip_by == "norm"
    config, _ = build_config(get_rule("ript"), "SparseReach-v0", 0, {"grad_clip_by": "value", "grad_clip": "0.1"})
    assert config.grad_clip_by == "value"
    with pytest.raises(UserError, match="unknown option 'step_size_rule' for rule props"):
        build_config(get_rule("props"), "CartPole-v1", 0, {"step_size_rule": "polyak"})
    config, _ = build_config(get_rule("props"), "CartPole-v1", 0, {"grad_clip_by": "norm"})
    assert config.grad_clip_by == "norm"


def test_global_norm_clip_keeps_the_fused_step():
    # Plain PPO (grad_clip 0.5 by global norm) must not lose the lean fused step to the gradient-rule mixin.
    learner = PPORuleConfig().environment("CartPole-v1").build_learner(env=gym.make("CartPole-v1"))
    assert learner._lean_step_supported()


def test_bad_options_are_refused():
    rule = get_rule("ppo_polyak")
    with pytest.raises(UserError, match="grad_clip_by must be one of global_norm, norm, value"):
        build_config(rule, "CartPole-v1", 0, {"grad_clip_by": "layer"})
    with pytest.raises(UserError, match="polyak_c must be > 0"):
        build_config(rule, "CartPole-v1", 0, {"polyak_c": "0"})
    with pytest.raises(UserError, match="unknown option 'step_size_rule' for rule ppo_polyak"):
        build_config(rule, "CartPole-v1", 0, {"step_size_rule": "optimizer"})
    fixed = PPOPolyakConfig()
    fixed.step_size_rule = "optimizer"
    with pytest.raises(ValueError, match="step_size_rule must be 'polyak'"):
        fixed.validate()
    config = PPORuleConfig()
    config.step_size_rule = "sgd"
    with pytest.raises(ValueError, match="step_size_rule='sgd' is unknown"):
        config.validate()
    config = PPORuleConfig()
    config.polyak_max_lr = -1.0
    with pytest.raises(ValueError, match="polyak_max_lr must be > 0"):
        config.validate()
