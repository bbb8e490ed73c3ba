"""P009 N-PG-IGT: normalized policy gradient with implicit gradient transport (Fatkhullin et al. 2023, Algorithm 1).

Each iteration samples whole trajectories at the extrapolated point theta~_t and updates (ascent on J):

    theta~_t    = theta_t + (1 - eta_t)/eta_t (theta_t - theta_{t-1})            (theta_{-1} = theta_0)
    d_t         = (1 - eta_t) d_{t-1} + eta_t g(tau_t, theta~_t)                 (d_0 = g_0, since eta_0 = 1)
    theta_{t+1} = theta_t + gamma_t d_t / ||d_t||
    g(tau, theta) = (1/M) sum_i sum_h gamma^h Psi_h grad log pi(a_h|s_h),  Psi_h = G_h - b(s_h)   (GPOMDP)

with gamma_t = gamma_0 * 2/(t+2), eta_t = eta_0 * (2/(t+2))^(4/5) (the math is `algorithms/common/momentum_pg.py`).
No importance sampling: the momentum is "transported" by evaluating the gradient at theta~_t instead.

Choices the paper leaves open, and ours:
- one trajectory per iteration in the theory; the authors' experiments use batches of 1000-5000 steps. Here a batch
  of whole episodes (batch_mode complete_episodes) of at least `train_batch_size` steps, averaged per trajectory;
- the baseline b(s) (the experiments use a linear feature baseline): the module's value network, fitted after
  every step by Adam on the discounted returns-to-go (`vf_epochs` passes), G_h from GAE with lambda = 1 and raw
  (unstandardised) values; a time-limit truncation bootstraps with V(s_T);
- the RLModule holds the point the next trajectories are sampled at (theta~_{t+1}), so the EnvRunners, checkpoints
  and serving all see the policy that is acting; theta_t, theta_{t-1}, d_t and t are learner state (checkpointed);
- gamma_0 (the paper tunes it per task): 0.5 for the 64-64 tanh network, measured on CartPole-v1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.common.losses import masked_mean
from algorithms.common.momentum_pg import (
    ascent_step,
    flat_grad,
    igt_extrapolation,
    momentum_direction,
    npg_igt_schedule,
    trajectory_index,
    trajectory_terms,
)
from algorithms.onpolicy.trpo import TRPO, TRPOConfig, TRPOLearner, _is_value_param
from algorithms.options import ONPOLICY_OPTIONS, Option, positive
from algorithms.rule import LearningCheck, Rule

STATE_KEY = "momentum_pg"


def npg_igt_step(theta: torch.Tensor, theta_prev: torch.Tensor, d_prev: torch.Tensor | None, g: torch.Tensor,
                 t: int, gamma_0: float, eta_0: float) -> dict[str, Any]:
    """One N-PG-IGT update, given g measured at theta~_t. Returns theta_{t+1}, d_t, the next sampling point
    theta~_{t+1} and the step sizes used."""
    gamma_t, eta_t = npg_igt_schedule(t, gamma_0, eta_0)
    d = momentum_direction(d_prev, g, eta_t)
    theta_next = ascent_step(theta, d, gamma_t, normalized=True)
    _, eta_next = npg_igt_schedule(t + 1, gamma_0, eta_0)
    return {"theta": theta_next, "d": d, "sample_at": igt_extrapolation(theta_next, theta, eta_next),
            "gamma": gamma_t, "eta": eta_t}


class NPGIGTConfig(TRPOConfig):
    """Options of N-PG-IGT. The critic (baseline) fit reuses TRPO's: `lr`, `vf_epochs`, `vf_minibatch_size`."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or NPGIGT)
        self.pg_gamma_0 = 0.5
        self.pg_eta_0 = 1.0
        self.gamma = 0.99
        self.lambda_ = 1.0  # Psi_h = G_h - b(s_h): GAE with lambda = 1
        self.standardize_advantages = False
        self.batch_mode = "complete_episodes"
        self.train_batch_size_per_learner = 1000
        self.lr = 1e-3

    @override(TRPOConfig)
    def training(self, *, pg_gamma_0: float = NotProvided, pg_eta_0: float = NotProvided, **kwargs) -> "NPGIGTConfig":
        super().training(**kwargs)
        set_provided(self, pg_gamma_0=pg_gamma_0, pg_eta_0=pg_eta_0)
        return self

    @override(TRPOConfig)
    def validate(self) -> None:
        super().validate()
        if not self.pg_gamma_0 > 0:
            self._value_error(f"pg_gamma_0 must be > 0, got {self.pg_gamma_0}")
        if not 0 < self.pg_eta_0 <= 1:
            self._value_error(f"pg_eta_0 must be in (0, 1], got {self.pg_eta_0}")
        if self.batch_mode != "complete_episodes":
            self._value_error("P009's estimators need whole trajectories: batch_mode='complete_episodes'")

    @override(TRPOConfig)
    def get_default_learner_class(self):
        return NPGIGTLearner


class NPGIGT(TRPO):
    @classmethod
    @override(TRPO)
    def get_default_config(cls) -> NPGIGTConfig:
        return NPGIGTConfig()


class MomentumPGLearner(TRPOLearner):
    """What N-PG-IGT and HARPG share: their state vectors (checkpointed), the GPOMDP estimate on a batch of whole
    episodes, writing a flat vector into the policy, the baseline fit (TRPO's critic Adam) and the metrics."""

    @override(TRPOLearner)
    def build(self) -> None:
        super().build()
        self._pg_state: dict[str, dict[str, Any]] = {}

    def _policy_params(self, module) -> list[torch.nn.Parameter]:
        return [p for n, p in module.named_parameters() if not _is_value_param(n)]

    def _state_for(self, module_id: str, params: list[torch.Tensor]) -> dict[str, Any]:
        if module_id not in self._pg_state:
            theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
            self._pg_state[module_id] = {"t": 0, "theta": theta, "theta_prev": theta.clone(), "d": None}
        return self._pg_state[module_id]

    @staticmethod
    def _write(params: list[torch.Tensor], vector: torch.Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vector, params)

    def _objective_terms(self, module, batch: dict[str, Any], config) -> tuple[torch.Tensor, ...]:
        """Per-trajectory Phi and log p at the module's current parameters (with graph), and the entropy."""
        mask = batch[Columns.LOSS_MASK]
        traj, steps, num = trajectory_index(mask)
        dist = module.get_train_action_dist_cls().from_logits(module.forward_train(batch)[Columns.ACTION_DIST_INPUTS])
        logp = dist.logp(batch[Columns.ACTIONS])[mask.bool()]
        psi = batch[Postprocessing.ADVANTAGES][mask.bool()]
        phi, log_p = trajectory_terms(logp, psi, steps, traj, num, config.gamma)
        with torch.no_grad():
            entropy = masked_mean(dist.entropy(), mask.bool())
        return phi, log_p, entropy

    def _gradient(self, module, batch: dict[str, Any], config, params) -> tuple[torch.Tensor, float, float]:
        """GPOMDP g = grad J_hat at the module's parameters; also J_hat and the mean entropy."""
        phi, _, entropy = self._objective_terms(module, batch, config)
        objective = phi.mean()
        return flat_grad(objective, params), objective.item(), entropy.item()

    def _log(self, module_id: str, objective: float, vf_loss: torch.Tensor, entropy: float, **stats) -> None:
        self.metrics.log_dict({POLICY_LOSS_KEY: -objective, VF_LOSS_KEY: vf_loss.item(), ENTROPY_KEY: entropy,
                               **stats}, key=module_id, window=1)

    @override(TRPOLearner)
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[STATE_KEY] = {
            module_id: {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for module_id, s in self._pg_state.items()
        }
        return state

    @override(TRPOLearner)
    def set_state(self, state) -> None:
        super().set_state(state)
        for module_id, saved in (state.get(STATE_KEY) or {}).items():
            self._pg_state[module_id] = {
                k: (torch.as_tensor(np.asarray(v), device=self._device) if isinstance(v, np.ndarray) else v)
                for k, v in saved.items()
            }


class NPGIGTLearner(MomentumPGLearner):
    @override(TRPOLearner)
    def _update_module(self, module_id: str, batch: dict[str, Any]) -> torch.Tensor:
        config = self.config.get_config_for_module(module_id)
        module = self.module[module_id].unwrapped()
        params = self._policy_params(module)
        state = self._state_for(module_id, params)
        # The batch was sampled at the module's parameters, theta~_t.
        g, objective, entropy = self._gradient(module, batch, config, params)
        step = npg_igt_step(state["theta"], state["theta_prev"], state["d"], g, state["t"],
                            config.pg_gamma_0, config.pg_eta_0)
        self._write(params, step["sample_at"])
        state.update(t=state["t"] + 1, theta_prev=state["theta"], theta=step["theta"], d=step["d"])
        vf_loss = self._fit_critic(module_id, module, batch, config)
        self._log(module_id, objective, vf_loss, entropy, step_size=step["gamma"], momentum=step["eta"],
                  gradient_norm=g.norm().item(), direction_norm=step["d"].norm().item())
        return vf_loss


# The update is the rule's own: grad_clip would be ignored, and Psi_h is the return-to-go minus the baseline
# (lambda = 1, raw values), so those options are not offered.
_NOT_OFFERED = {"lr", "grad_clip", "lambda_", "advantage_estimator", "standardize_advantages", "vf_share_layers"}
MOMENTUM_PG_OPTIONS = tuple(o for o in ONPOLICY_OPTIONS if o.name not in _NOT_OFFERED) + (
    Option("pg_gamma_0", "initial step size gamma_0 of the normalized policy step", positive, "> 0"),
    Option("pg_eta_0", "initial momentum parameter eta_0", lambda x: x is not None and 0 < x <= 1, "in (0, 1]"),
    Option("lr", "Adam step size of the baseline (critic) fit", positive, "> 0"),
    Option("vf_epochs", "baseline (critic) Adam passes per batch", positive, ">= 1"),
    Option("vf_minibatch_size", "baseline (critic) minibatch size", positive, ">= 1"),
)

RULE = Rule(
    name="npg_igt",
    family="on-policy",
    paper_ids=("P009",),
    summary="normalized policy gradient with implicit gradient transport momentum, whole trajectories sampled at "
            "the extrapolated point, no importance sampling",
    config_class=NPGIGTConfig,
    options=MOMENTUM_PG_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 500_000, 450.0,
                                 "RL Baselines3 Zoo trains A2C, a first-order on-policy policy gradient, on "
                                 "CartPole-v1 for 500k steps (it reaches ~500); threshold 450"),
    smoke_overrides={"train_batch_size": 200},
)
