"""P262 PG-Rainbow: the distilled critic V = f(V_theta * q_phi), the IQN TD loss and the module, by hand."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.onpolicy.pg_rainbow import PGRainbowConfig, PGRainbowModule, iqn_loss, pg_rainbow_value
from algorithms.registry import build_config, get_rule
from rlfleet.errors import UserError

MODEL = {"fcnet_hiddens": [8, 8], "fcnet_activation": "tanh", "vf_share_layers": False,
         "iqn_num_quantiles": 4, "iqn_num_cosines": 6}


def _module(inference_only=False, action_space=gym.spaces.Discrete(3)):
    return RLModuleSpec(module_class=PGRainbowModule, observation_space=gym.spaces.Box(-1, 1, (2,), np.float32),
                        action_space=action_space, model_config=MODEL, inference_only=inference_only).build()


def test_distilled_value_by_hand():
    distill = torch.nn.Linear(2, 1)
    with torch.no_grad():
        distill.weight.copy_(torch.tensor([[0.5, -1.0]]))
        distill.bias.fill_(1.0)
    # V_theta * q = [1*3, 2*4] = [3, 8]; f = 0.5*3 - 1*8 + 1 = -5.5
    v = pg_rainbow_value(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), distill)
    torch.testing.assert_close(v, torch.tensor([-5.5]))


def test_iqn_loss_by_hand():
    quantiles, taus = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.25, 0.75]])
    # Targets r + gamma Z' = 0.5 + 0.5 * [0, 3] = [0.5, 2.0]; the quantile Huber loss (kappa=1) of Z = [0, 1] at
    # taus [.25, .75] against them is .203125 + .203125 = .40625 (see test_distributional.py).
    loss = iqn_loss(quantiles, taus, torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([[0.0, 3.0]]),
                    gamma=0.5, kappa=1.0)
    assert loss.item() == pytest.approx(0.40625)
    # Terminated: targets are r = [0.5, 0.5]. i=0: delta .5 twice -> .125 * .25 = .03125 each, mean .03125;
    # i=1: delta -.5 twice -> .125 * |.75 - 1| = .03125; total .0625.
    loss = iqn_loss(quantiles, taus, torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([[0.0, 3.0]]),
                    gamma=0.5, kappa=1.0)
    assert loss.item() == pytest.approx(0.0625)


def test_greedy_quantiles_pick_the_action_with_the_highest_mean():
    module = _module()
    z = torch.tensor([[[1.0, 0.0, 5.0], [2.0, 9.0, 5.0]]])  # [B=1, N=2, A=3]: means 1.5, 4.5, 5.0 -> action 2
    module.iqn.forward = lambda obs, taus: z
    torch.testing.assert_close(module.iqn.greedy_quantiles(torch.zeros(1, 2), torch.zeros(1, 2)),
                               torch.tensor([[5.0, 5.0]]))


def test_module_value_is_the_distillation_of_v_theta_and_iqn_quantiles():
    torch.manual_seed(0)
    module = _module()
    obs = torch.randn(5, 2)
    batch = {Columns.OBS: obs}
    values = module.compute_values(batch)
    embeddings = module.encoder.critic_encoder(batch)["encoder_out"]
    taus = torch.tensor([0.125, 0.375, 0.625, 0.875]).expand(5, 4)
    expected = module.distill(module.vf(embeddings) * module.iqn.greedy_quantiles(obs, taus)).squeeze(-1)
    torch.testing.assert_close(values, expected)
    # The value loss trains V_theta and f_psi, never the IQN (its own quantile loss does).
    values.sum().backward()
    assert all(p.grad is None for p in module.iqn.parameters())
    assert module.vf.weight.grad is not None and module.distill[0].weight.grad is not None


def test_env_runner_module_holds_only_the_policy():
    module = _module(inference_only=True)
    assert not hasattr(module, "iqn") and not hasattr(module, "iqn_target") and not hasattr(module, "distill")
    learner_module = _module()
    state = learner_module.get_state(inference_only=True)
    assert not any(k.startswith(("iqn", "distill", "vf")) for k in state)
    module.set_state(state)  # the weights EnvRunners receive fit their module exactly


def test_continuous_actions_are_rejected():
    with pytest.raises(ValueError, match="discrete"):
        _module(action_space=gym.spaces.Box(-1, 1, (1,), np.float32))


def test_bad_options_are_rejected():
    rule = get_rule("pg_rainbow")
    with pytest.raises(UserError, match="iqn_kappa"):
        build_config(rule, "CartPole-v1", 0, {"iqn_kappa": "-1"})
    config = PGRainbowConfig().environment("CartPole-v1")
    config.iqn_num_quantiles = 0
    with pytest.raises(ValueError, match="iqn_num_quantiles"):
        config.validate()
