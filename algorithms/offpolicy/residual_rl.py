"""ResFiT: P103, Ankile, Jiang, Duan, Shi, Abbeel & Nagabandi 2025, "Residual Off-Policy RL for Finetuning Behavior
Cloning Policies" (arXiv 2509.19301): a frozen behaviour-cloned base policy plus a per-step residual learned by
off-policy RL, trained from the Redis replay of `base.py` (EnvRunners insert the executed transitions, the learner
samples minibatches from the table).

Phase 1 (in the learner's build, before any env step): demonstrations from an imperfect scripted controller,
a deterministic BC policy pi_base fitted to them (algorithms/common/behavior_cloning.py), then frozen (its weights
are buffers: synced to the EnvRunners and checkpointed, never trained).
Phase 2: the executed action is the base action plus a bounded residual that sees the state and the base action,

    a_t = clip(a_base + s_res * pi_res(o_t, a_base), -1, 1),   a_base = pi_base(o_t),  pi_res in [-1, 1]^k (tanh)

and TD3 (Fujimoto et al. 2018, the off-policy learner ResFiT builds on) learns pi_res and the critics on the
combined action, replayed (s, a, r, s', d) with a the executed action:

    a~'   = clip(clip(a_base(s') + s_res pi_res_target(s', a_base(s')), -1, 1) + clip(eps, -c, c), -1, 1)
    y     = r + gamma (1 - d) min_{i=1,2} Q_target_i(s', a~')
    J_Q   = sum_i mean_B (Q_i(s, a) - y)^2;   J_res = -mean_B Q_1(s, a(s))  (gradient only into pi_res; delayed)

Choices the paper leaves open or that differ on this small task, ours: the base is a per-step MLP (the paper's bases
are action-chunked visuomotor policies) cloned from 10 episodes of a torque-limited energy swing-up + PD controller
with N(0, 0.3^2) action noise (mean return about -250; the clone scores about -350: BC's compounding errors); the
residual's last layer starts at zero, so the first episodes are the base policy's (ResFiT's warm start: no uniform-
random warm-up) and the residual actor only moves after 1000 critic-only gradient steps (a critic burn-in as in
residual policy learning, Silver et al. 2018: a first run without it fell from -300 to -840 while the critic was
still random); exploration adds N(0, 0.1^2) to the executed action; residual scale s_res = 0.25 of the normalised
action range (the demonstrator never uses more than half the torque, so base + residual stays inside [-1, 1] where
the clip has a gradient; with s_res = 0.5 the first actor steps saturated the residual and the return fell to about
-1050 within 1.5k steps; with 0.25 it still fell to about -900: the residual's Adam step size is 1e-4 (DDPG's actor
value, P171) instead of TD3's 1e-3, so the residual moves slower than the critic learns about actions away from the
base); no demonstrations mixed into the replay, one-step targets, no layer norm (the paper's recipe for sparse-
reward, image-based tasks); TD3's Pendulum settings of the repo's td3 rule (gamma 0.98, tau 0.005, delay 2,
smoothing 0.2 / 0.5, critic Adam 1e-3, 400-300 ReLU, one gradient step on 128 transitions every second env step).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.from_config import NotProvided
from torch import nn

from algorithms.common.behavior_cloning import FrozenMLP, collect_demonstrations, fit_behavior_cloning
from algorithms.common.config_fields import set_provided
from algorithms.offpolicy.deterministic import (
    DeterministicACAlgorithm,
    DeterministicACConfig,
    DeterministicActorCriticLearner,
    DeterministicActorCriticModule,
    _mlp,
)
from algorithms.offpolicy.td3 import DETERMINISTIC_AC_OPTIONS
from algorithms.options import Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule


def pendulum_demonstrator(obs: np.ndarray) -> np.ndarray:
    """An imperfect Pendulum-v1 expert: energy-pumping swing-up, PD catch near the top, torque limited to 1 (of 2).

    Pendulum's dynamics are theta'' = 15 sin(theta) + 3 u (theta = 0 upright), so E = theta'^2 / 2 + 15 (cos(theta)
    - 1) is 0 at rest upright and dE/dt = 3 u theta': pushing along theta' while E < 0 pumps energy in."""
    cos_t, sin_t, speed = (float(x) for x in obs)
    theta = np.arctan2(sin_t, cos_t)
    if cos_t > 0.85:
        torque = -(5.0 * theta + 1.0 * speed)
    else:
        energy = 0.5 * speed**2 + 15.0 * (cos_t - 1.0)
        torque = 0.5 * (1.0 if speed >= 0 else -1.0) * (-energy)
    return np.array([np.clip(torque, -1.0, 1.0)])


# Scripted demonstrators by env id: the rule needs one for the env it trains on.
DEMONSTRATORS = {"Pendulum-v1": pendulum_demonstrator}


def residual_action(base: torch.Tensor, residual: torch.Tensor, scale: float) -> torch.Tensor:
    """ResFiT's executed action clip(a_base + scale * a_res, -1, 1) in the normalised action box."""
    return torch.clamp(base + scale * residual, -1.0, 1.0)


class ResidualActor(nn.Module):
    """pi(o) = residual_action(pi_base(o), pi_res(o, pi_base(o))): the frozen base and the trainable residual."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], activation: str, base_hidden: list[int],
                 scale: float):
        super().__init__()
        self.scale = scale
        self.base = FrozenMLP([obs_dim, *base_hidden, act_dim])
        self.residual = _mlp([obs_dim + act_dim, *hidden, act_dim], activation, nn.Tanh())
        last = [m for m in self.residual if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():  # pi_res = 0 at the start: the agent first acts as the base policy
            last.weight.zero_()
            last.bias.zero_()

    def residual_of(self, obs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.residual(torch.cat([obs, base], dim=-1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        base = self.base(obs)
        return residual_action(base, self.residual_of(obs, base), self.scale)


class ResidualModule(DeterministicActorCriticModule):
    """DeterministicActorCriticModule whose actor `pi` (and so `target_pi`) is a ResidualActor."""

    def setup(self) -> None:
        super().setup()
        cfg = self.model_config
        obs_dim = int(np.prod(self.observation_space.shape))
        self.pi = ResidualActor(obs_dim, self.act_dim, list(cfg.get("fcnet_hiddens", [256, 256])),
                                cfg.get("fcnet_activation", "relu"), list(cfg["bc_hidden_sizes"]),
                                float(cfg["residual_scale"]))


class ResidualLearner(DeterministicActorCriticLearner):
    """TD3's learner; its build first clones and freezes the base policy (ResFiT's phase 1). The residual actor
    waits `critic_warmup_steps` gradient steps: an untrained critic's action gradient would move the residual
    at random and throw away the base policy's competence (the cold start of residual RL)."""

    def _policy_step(self) -> bool:
        return self._gradient_steps >= self.config.critic_warmup_steps and super()._policy_step()

    def build(self) -> None:
        super().build()  # the modules and their target copies
        config = self.config
        seed = int(config.seed or 0)
        demos = collect_demonstrations(config.env, DEMONSTRATORS[config.env], config.demo_episodes,
                                       config.demo_noise, seed=10_000 + seed)
        policy, loss = fit_behavior_cloning(demos["obs"], demos["actions"], list(config.bc_hidden_sizes),
                                            config.bc_steps, batch_size=256, lr=config.bc_lr, seed=seed)
        self.demo_return, self.bc_final_loss = demos["mean_return"], loss
        for module_id in self.module.keys():
            module = self.module[module_id].unwrapped()
            module.pi.base.load_from(policy)
            module.target_pi.base.load_from(policy)  # the target actor shares the frozen base


class ResidualRLConfig(DeterministicACConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or ResidualRL)
        self.residual_scale = 0.25
        self.demo_episodes = 10
        self.demo_noise = 0.3
        self.bc_steps = 2000
        self.bc_lr = 1e-3
        self.bc_hidden_sizes = [64, 64]
        self.critic_warmup_steps = 1000
        self.actor_lr = 1e-4  # the residual moves slowly against a critic that has only seen actions near the base
        self.random_warmup_steps = 0  # the base policy explores from the first step

    def training(self, *, residual_scale: float = NotProvided, demo_episodes: int = NotProvided,
                 demo_noise: float = NotProvided, bc_steps: int = NotProvided, bc_lr: float = NotProvided,
                 bc_hidden_sizes: list[int] = NotProvided, critic_warmup_steps: int = NotProvided,
                 **kwargs) -> "ResidualRLConfig":
        super().training(**kwargs)
        set_provided(self, residual_scale=residual_scale, demo_episodes=demo_episodes, demo_noise=demo_noise,
                     bc_steps=bc_steps, bc_lr=bc_lr, bc_hidden_sizes=bc_hidden_sizes,
                     critic_warmup_steps=critic_warmup_steps)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "residual_scale": self.residual_scale, "bc_hidden_sizes": list(self.bc_hidden_sizes),
        }

    def validate(self) -> None:
        super().validate()
        if self.env not in DEMONSTRATORS:
            self._value_error(f"residual_rl clones a scripted demonstrator first; there is one for "
                              f"{', '.join(sorted(DEMONSTRATORS))}, not for {self.env!r}")
        if not 0 < self.residual_scale <= 2:
            self._value_error(f"residual_scale must be in (0, 2] (the action box is [-1, 1]), got {self.residual_scale}")
        if not isinstance(self.critic_warmup_steps, int) or self.critic_warmup_steps < 0:
            self._value_error(f"critic_warmup_steps must be an integer >= 0, got {self.critic_warmup_steps!r}")
        for name in ("demo_episodes", "bc_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                self._value_error(f"{name} must be an integer >= 1, got {value!r}")
        if self.demo_noise < 0 or not self.bc_lr > 0:
            self._value_error(f"demo_noise must be >= 0 and bc_lr > 0, got {self.demo_noise}, {self.bc_lr}")
        if not self.bc_hidden_sizes or any(not isinstance(h, int) or h < 1 for h in self.bc_hidden_sizes):
            self._value_error(f"bc_hidden_sizes must be a non-empty list of positive ints, got {self.bc_hidden_sizes}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=ResidualModule, model_config=self.model_config)

    def get_default_learner_class(self):
        return ResidualLearner


class ResidualRL(DeterministicACAlgorithm):
    @classmethod
    def get_default_config(cls) -> ResidualRLConfig:
        return ResidualRLConfig()


RULE = Rule(
    name="residual_rl",
    family="off-policy",
    paper_ids=("P103",),
    summary="ResFiT: frozen BC base policy + per-step residual a = a_base + s * pi_res(o, a_base) learned by TD3, "
            "Redis replay",
    config_class=ResidualRLConfig,
    options=DETERMINISTIC_AC_OPTIONS + (
        Option("policy_delay", "critic steps per residual-actor and target step (d)", positive, ">= 1"),
        Option("target_noise", "std of the target-policy smoothing noise", non_negative, ">= 0"),
        Option("residual_scale", "bound of the residual in the normalised action box [-1, 1]",
               lambda x: 0 < x <= 2, "in (0, 2]"),
        Option("demo_episodes", "episodes of the scripted demonstrator to clone", positive, ">= 1"),
        Option("demo_noise", "std of the Gaussian noise on the demonstrator's actions (env units)", non_negative,
               ">= 0"),
        Option("bc_steps", "Adam steps of the behaviour-cloning fit", positive, ">= 1"),
        Option("critic_warmup_steps", "gradient steps of critic-only training before the residual actor moves",
               non_negative, ">= 0"),
    ),
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-200.0,
        source="P103's claim (the residual improves the BC base): the frozen BC base scores about -350 on "
               "Pendulum-v1 (tests/test_residual_rl.py measures it below -250), so -200 averaged over the last 100 "
               "episodes is a gain of at least 50 (about 150) over the base",
    ),
    smoke_overrides={"learning_starts": 64, "rollout_fragment_length": 128, "samples_per_insert": 2.0,
                     "train_batch_size": 64, "bc_steps": 50, "demo_episodes": 1, "critic_warmup_steps": 0},
)
