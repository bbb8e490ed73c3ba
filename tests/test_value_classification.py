"""P127 classification value losses (algorithms/common/value_classification.py) on hand-computed supports, and the
dqn_hl_gauss / ppo_hl_gauss rules built on them."""

import math

import gymnasium as gym
import pytest
import torch

from algorithms.common.value_classification import (
    bin_centers,
    bin_edges,
    classification_value_loss,
    cross_entropy,
    expected_value,
    hl_gauss_probs,
    target_probs,
    two_hot_probs,
)
from algorithms.offpolicy.dqn_hl_gauss import hl_gauss_dqn_loss
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

# Support [0, 3] with 3 bins: width 1, edges 0 1 2 3, centres 0.5 1.5 2.5; HL-Gauss sigma = 0.75.
EDGES = bin_edges(0.0, 3.0, 3)
CENTERS = bin_centers(0.0, 3.0, 3)


def test_support():
    torch.testing.assert_close(EDGES, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(CENTERS, torch.tensor([0.5, 1.5, 2.5]))


def test_hl_gauss_is_gaussian_mass_per_bin_renormalised():
    # y = 1.5: edges in sigma units (e - 1.5) / 0.75 = -2, -2/3, 2/3, 2;
    # Phi = 0.0227501, 0.2524925, 0.7475075, 0.9772499; bin masses 0.2297424, 0.4950149, 0.2297424;
    # mass inside the support Z = 0.9544997 -> q = 0.2406940, 0.5186119, 0.2406940.
    probs = hl_gauss_probs(torch.tensor([1.5]), EDGES, 0.75)
    torch.testing.assert_close(probs, torch.tensor([[0.2406940, 0.5186119, 0.2406940]]), atol=1e-6, rtol=0)
    # y = 0.2: (e - 0.2) / 0.75 = -0.2667, 1.0667, 2.4, 3.7333; Phi = 0.3948629, 0.8569388, 0.9918025, 0.9999055;
    # masses 0.4620759, 0.1348637, 0.0081031; Z = 0.6050426 -> q = 0.7637080, 0.2228994, 0.0133925.
    probs = target_probs(torch.tensor([0.2]), 0.0, 3.0, 3, "hl_gauss")
    torch.testing.assert_close(probs, torch.tensor([[0.7637080, 0.2228994, 0.0133925]]), atol=1e-6, rtol=0)


def test_targets_outside_the_support_are_clipped_into_it():
    inside = hl_gauss_probs(torch.tensor([0.0, 3.0]), EDGES, 0.75)
    outside = hl_gauss_probs(torch.tensor([-7.0, 40.0]), EDGES, 0.75)
    torch.testing.assert_close(outside, inside)
    torch.testing.assert_close(outside.sum(-1), torch.ones(2))


def test_hl_gauss_mean_tracks_the_target_on_a_fine_support():
    # 200 bins on [-10, 10] (width 0.1): the Gaussian is far from the ends, so its binned mean is y.
    probs = target_probs(torch.tensor([3.3, -1.234]), -10.0, 10.0, 200, "hl_gauss")
    means = (probs * bin_centers(-10.0, 10.0, 200)).sum(-1)
    torch.testing.assert_close(means, torch.tensor([3.3, -1.234]), atol=1e-4, rtol=0)


def test_two_hot_splits_mass_between_the_neighbouring_centres():
    probs = two_hot_probs(torch.tensor([1.0, 2.2, 2.5, -4.0, 0.5]), CENTERS)
    expected = torch.tensor([
        [0.5, 0.5, 0.0],   # 1.0 is halfway between 0.5 and 1.5
        [0.0, 0.3, 0.7],   # 2.2 = 0.3 * 1.5 + 0.7 * 2.5
        [0.0, 0.0, 1.0],   # the last centre exactly
        [1.0, 0.0, 0.0],   # below the support: clipped to the first centre
        [1.0, 0.0, 0.0],   # the first centre exactly
    ])
    torch.testing.assert_close(probs, expected)
    # Two-hot is exact in expectation inside [z_0, z_{m-1}].
    torch.testing.assert_close((probs[:3] * CENTERS).sum(-1), torch.tensor([1.0, 2.2, 2.5]))


def test_cross_entropy_expected_value_and_gradient():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)]], requires_grad=True)  # softmax = 1/4, 1/4, 1/2
    target = torch.tensor([[0.0, 0.3, 0.7]])
    loss = cross_entropy(logits, target)
    # -(0.3 ln(1/4) + 0.7 ln(1/2)) = 0.3 * 1.3862944 + 0.7 * 0.6931472 = 0.9010913
    torch.testing.assert_close(loss, torch.tensor([0.9010913]))
    # E[V] = 0.25 * 0.5 + 0.25 * 1.5 + 0.5 * 2.5 = 1.75
    torch.testing.assert_close(expected_value(logits, CENTERS), torch.tensor([1.75]))
    loss.sum().backward()
    # d CE / d logits = softmax - q = [0.25, -0.05, -0.2]
    torch.testing.assert_close(logits.grad, torch.tensor([[0.25, -0.05, -0.2]]))
    # The composed helper: the same number from the scalar target 2.2 (two-hot).
    torch.testing.assert_close(
        classification_value_loss(logits.detach(), torch.tensor([2.2]), 0.0, 3.0, "two_hot"), torch.tensor([0.9010913]))


def test_bad_supports_and_kinds_are_refused():
    with pytest.raises(ValueError, match="v_max"):
        bin_edges(1.0, 1.0, 3)
    with pytest.raises(ValueError, match="num_bins"):
        bin_edges(0.0, 1.0, 1)
    with pytest.raises(ValueError, match="unknown value loss"):
        target_probs(torch.tensor([0.0]), 0.0, 1.0, 4, "mse")


def test_dqn_hl_gauss_loss_on_the_taken_action():
    # Two transitions, two actions, support [0, 3] with 3 bins, two-hot targets, gamma = 0.9.
    logits = torch.zeros(2, 2, 3)
    logits[0, 1, 2] = math.log(2.0)  # Q(s0, a=1): probs 1/4 1/4 1/2 -> 1.75
    logits.requires_grad_(True)
    q_values = expected_value(logits.detach(), CENTERS)  # [[1.5, 1.75], [1.5, 1.5]]
    out = hl_gauss_dqn_loss(
        logits, q_values, torch.tensor([1, 0]), torch.tensor([1.12, -1.0]), torch.tensor([False, True]),
        torch.tensor([[1.2, 0.5], [10.0, 10.0]]), 0.9, 0.0, 3.0, kind="two_hot")
    # y_0 = 1.12 + 0.9 * max(1.2, 0.5) = 2.2;  y_1 = -1 (terminated), clipped to the first centre for the projection
    torch.testing.assert_close(out["target"], torch.tensor([2.2, -1.0]))
    torch.testing.assert_close(out["td_error"], torch.tensor([1.75 - 2.2, 1.5 + 1.0]))
    # CE_0 = 0.9010913 (above); CE_1 = -ln(1/3) = 1.0986123; mean 0.9998518
    torch.testing.assert_close(out["loss"], torch.tensor(0.9998518))
    out["loss"].backward()
    expected_grad = torch.zeros(2, 2, 3)
    expected_grad[0, 1] = torch.tensor([0.25, -0.05, -0.2]) / 2
    expected_grad[1, 0] = (torch.tensor([1 / 3, 1 / 3, 1 / 3]) - torch.tensor([1.0, 0.0, 0.0])) / 2
    torch.testing.assert_close(logits.grad, expected_grad)  # the actions not taken get no gradient


def test_dqn_hl_gauss_weights_and_discount_tensor():
    logits = torch.zeros(2, 2, 3)
    q_values = expected_value(logits, CENTERS)
    # Per-sample discounts (n-step records): y = r + gamma_i max Q' -> [0.5 + 0.5 * 2, 0 + 0 * 2] = [1.5, 0]
    out = hl_gauss_dqn_loss(logits, q_values, torch.tensor([0, 0]), torch.tensor([0.5, 0.0]),
                            torch.tensor([False, False]), torch.full((2, 2), 2.0), torch.tensor([0.5, 0.0]), 0.0, 3.0,
                            kind="two_hot", weights=torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out["target"], torch.tensor([1.5, 0.0]))
    # uniform logits: CE = ln 3 for each; weighted mean (2 ln 3 + 0) / 2 = ln 3
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(3.0)))


def test_dqn_hl_gauss_module_uses_the_bin_centres_as_atoms():
    config, options = build_config(get_rule("dqn_hl_gauss"), "CartPole-v1", 0, {"num_bins": "4", "value_min": "0",
                                                                                 "value_max": "8"})
    model = config.model_config
    # width 2: centres 1 3 5 7 = RLlib's atoms linspace(v_min, v_max, num_atoms)
    assert (model["num_atoms"], model["v_min"], model["v_max"]) == (4, 1.0, 7.0)
    assert config.num_atoms == 1  # RLlib's C51 loss stays off
    env = gym.make("CartPole-v1")
    module = config.get_rl_module_spec(env=env).build()
    assert module.af.net.mlp[-1].out_features == 2 * 4


def test_bad_hl_gauss_options_are_refused():
    for name in ("dqn_hl_gauss", "ppo_hl_gauss"):
        rule = get_rule(name)
        with pytest.raises(UserError, match="value_loss"):
            build_config(rule, "CartPole-v1", 0, {"value_loss": "mse"})
        with pytest.raises(UserError, match="num_bins"):
            build_config(rule, "CartPole-v1", 0, {"num_bins": "1"})
        with pytest.raises(UserError, match="value_max"):
            build_config(rule, "CartPole-v1", 0, {"value_min": "5", "value_max": "5"})
        with pytest.raises(UserError, match="sigma_ratio"):
            build_config(rule, "CartPole-v1", 0, {"sigma_ratio": "0"})


def test_ppo_hl_gauss_critic_is_the_expected_value_of_its_bins():
    config, _ = build_config(get_rule("ppo_hl_gauss"), "CartPole-v1", 0, {"num_bins": "5", "value_min": "-1",
                                                                           "value_max": "4"})
    env = gym.make("CartPole-v1")
    spec = config.get_rl_module_spec(env=env)
    spec.observation_space, spec.action_space = env.observation_space, env.action_space
    module = spec.build()
    batch = {"obs": torch.randn(6, 4)}
    logits = module.value_logits(batch)
    assert logits.shape == (6, 5)
    # centres of 5 bins on [-1, 4]: -0.5 0.5 1.5 2.5 3.5
    torch.testing.assert_close(module.bin_centers, torch.tensor([-0.5, 0.5, 1.5, 2.5, 3.5]))
    torch.testing.assert_close(module.compute_values(batch), expected_value(logits, module.bin_centers))
    with pytest.raises(UserError, match="value_clip"):
        build_config(get_rule("ppo_hl_gauss"), "CartPole-v1", 0, {"value_clip": "0.2"})
