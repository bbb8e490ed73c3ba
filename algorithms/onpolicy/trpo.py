"""P145 Trust Region Policy Optimization (Schulman et al. 2015), the practical algorithm of section 6.

Each iteration solves, on the fresh batch (theta_old = current parameters),

    maximise_theta  L(theta) = E_t[ pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t) * A_t ]         (eq. 14)
    subject to      KL_bar(theta_old, theta) = E_s[ KL(pi_theta_old(.|s) || pi_theta(.|s)) ] <= delta

approximately (Appendix C): g = grad L, F = Hessian of KL_bar at theta_old (Fisher-vector products by double
backprop, plus damping), x = F^-1 g by conjugate gradient, full step s = sqrt(2 delta / x^T F x) * x, then a
backtracking line search that shrinks s until KL_bar <= delta and L improves. The critic is fitted
separately by minibatch Adam on (V(s_t) - V_t^targ)^2 with GAE targets (P158 fits it with a trust region too;
SGD is the common practical choice). The rule owns its whole update: it overrides `_uncompiled_update`.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.conjugate_gradient import backtracking_line_search, conjugate_gradient, max_step_scale
from algorithms.common.divergences import mean_kl
from algorithms.common.losses import importance_weighted_surrogate, masked_mean, value_loss
from algorithms.onpolicy.base import OnPolicyAlgorithm, OnPolicyConfig, OnPolicyLearner
from algorithms.options import ONPOLICY_OPTIONS, Option, positive
from algorithms.rule import LearningCheck, Rule

VALUE_OPTIMIZER = "value"


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """d output / d params, flattened into one vector."""
    grads = torch.autograd.grad(output, params, **kwargs)
    return torch.cat([g.reshape(-1) for g in grads])


def add_to_params(params: list[torch.Tensor], flat_delta: torch.Tensor) -> None:
    """params += delta, where delta is one flat vector in params' order."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.add_(flat_delta[offset : offset + n].view_as(p))
            offset += n


def trust_region_step(
    surrogate_fn,
    kl_fn,
    params: list[torch.Tensor],
    *,
    max_kl: float,
    cg_iters: int,
    cg_damping: float,
    backtrack_coeff: float,
    max_backtracks: int,
) -> dict[str, float]:
    """One TRPO policy step, in place on `params`.

    surrogate_fn() -> L(theta) with graph; kl_fn() -> KL_bar(theta_old, theta) with graph, where theta_old is
    frozen inside kl_fn. Returns diagnostics (kl after the step, improvement, backtracks).
    """
    surrogate = surrogate_fn()
    g = flat_grad(surrogate, params, retain_graph=True)
    grad_kl = flat_grad(kl_fn(), params, create_graph=True)

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        return flat_grad(grad_kl @ v, params, retain_graph=True) + cg_damping * v

    direction = conjugate_gradient(fisher_vector_product, g, iterations=cg_iters)
    full_step = max_step_scale(direction, fisher_vector_product(direction), max_kl) * direction
    surrogate_before = surrogate.item()
    applied = 0.0

    def evaluate(fraction: float) -> tuple[float, float]:
        nonlocal applied
        add_to_params(params, (fraction - applied) * full_step)
        applied = fraction
        with torch.no_grad():
            return surrogate_fn().item() - surrogate_before, kl_fn().item()

    accepted, backtracks = backtracking_line_search(evaluate, max_kl, backtrack_coeff, max_backtracks)
    add_to_params(params, (accepted - applied) * full_step)  # lands on the accepted step (or theta_old)
    with torch.no_grad():
        kl_after = kl_fn().item()
        improvement = surrogate_fn().item() - surrogate_before
    return {
        "kl": kl_after,
        "surrogate_improvement": improvement,
        "expected_improvement": float(g @ full_step),
        "line_search_backtracks": float(backtracks),
        "step_accepted": float(accepted > 0.0),
    }


class TRPOConfig(OnPolicyConfig):
    """TRPO's options. Defaults follow the paper (delta = 0.01, 10 CG iterations) and SB3-contrib's critic fit."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TRPO)
        self.train_batch_size_per_learner = 2048
        self.gamma = 0.99
        self.lambda_ = 0.95
        self.lr = 1e-3  # the critic's Adam step size
        self.max_kl = 0.01
        self.cg_iters = 10
        self.cg_damping = 0.1
        self.backtrack_coeff = 0.8
        self.max_backtracks = 10
        self.vf_epochs = 10
        self.vf_minibatch_size = 128
        self.entropy_coeff = 0.0
        # The whole batch reaches `_uncompiled_update` once; the rule does its own critic minibatching.
        self.minibatch_size = None
        self.num_epochs = 1

    @override(OnPolicyConfig)
    def training(
        self,
        *,
        max_kl: float = NotProvided,
        cg_iters: int = NotProvided,
        cg_damping: float = NotProvided,
        backtrack_coeff: float = NotProvided,
        max_backtracks: int = NotProvided,
        vf_epochs: int = NotProvided,
        vf_minibatch_size: int = NotProvided,
        **kwargs,
    ) -> "TRPOConfig":
        super().training(**kwargs)
        for name, value in dict(
            max_kl=max_kl, cg_iters=cg_iters, cg_damping=cg_damping, backtrack_coeff=backtrack_coeff,
            max_backtracks=max_backtracks, vf_epochs=vf_epochs, vf_minibatch_size=vf_minibatch_size,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @override(OnPolicyConfig)
    def validate(self) -> None:
        super().validate()
        if self.max_kl <= 0:
            self._value_error(f"max_kl must be > 0, got {self.max_kl}")
        if not 0 < self.backtrack_coeff < 1:
            self._value_error(f"backtrack_coeff must be in (0, 1), got {self.backtrack_coeff}")
        if self.cg_iters < 1 or self.vf_epochs < 1 or self.vf_minibatch_size < 1 or self.max_backtracks < 1:
            self._value_error("cg_iters, vf_epochs, vf_minibatch_size and max_backtracks must be >= 1")
        if self.minibatch_size is not None or self.num_epochs != 1:
            self._value_error("TRPO takes one natural-gradient step per batch: minibatch_size=None, num_epochs=1")
        if self.model_config.get("vf_share_layers"):
            self._value_error("TRPO needs separate policy and value networks: vf_share_layers=False")

    @override(OnPolicyConfig)
    def get_default_learner_class(self):
        return TRPOLearner


class TRPO(OnPolicyAlgorithm):
    @classmethod
    @override(OnPolicyAlgorithm)
    def get_default_config(cls) -> TRPOConfig:
        return TRPOConfig()


def _is_value_param(name: str) -> bool:
    return name.startswith("vf.") or name.startswith("encoder.critic_encoder.")


class TRPOLearner(OnPolicyLearner):
    """Policy: natural-gradient trust-region step. Critic: Adam, its own (only) registered optimizer."""

    @override(OnPolicyLearner)
    def configure_optimizers_for_module(self, module_id: str, config=None) -> None:
        module = self._module[module_id]
        value_params = [p for n, p in module.named_parameters() if _is_value_param(n)]
        if not value_params:
            raise ValueError("TRPO found no value-network parameters (vf.*, encoder.critic_encoder.*)")
        self.register_optimizer(
            module_id=module_id,
            optimizer_name=VALUE_OPTIMIZER,
            optimizer=torch.optim.Adam(value_params),
            params=value_params,
            lr_or_lr_schedule=config.lr,
        )

    @override(OnPolicyLearner)
    def _uncompiled_update(self, batch: dict[str, Any], **kwargs):
        losses = {}
        for module_id, module_batch in batch.items():
            losses[module_id] = self._update_module(module_id, module_batch)
        return {}, losses, {}

    def _update_module(self, module_id: str, batch: dict[str, Any]) -> torch.Tensor:
        config = self.config.get_config_for_module(module_id)
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        policy_params = [p for n, p in module.named_parameters() if not _is_value_param(n)]
        dist_cls = module.get_train_action_dist_cls()
        actions, advantages = batch[Columns.ACTIONS], batch[Postprocessing.ADVANTAGES]

        with torch.no_grad():
            old_inputs = module.forward_train(batch)[Columns.ACTION_DIST_INPUTS]
        old_dist = dist_cls.from_logits(old_inputs)
        old_logp = old_dist.logp(actions)

        def current_dist():
            return dist_cls.from_logits(module.forward_train(batch)[Columns.ACTION_DIST_INPUTS])

        def surrogate_fn() -> torch.Tensor:
            ratio = torch.exp(current_dist().logp(actions) - old_logp)
            return masked_mean(importance_weighted_surrogate(ratio, advantages), mask)

        def kl_fn() -> torch.Tensor:
            return mean_kl(old_dist, current_dist(), mask)

        stats = trust_region_step(
            surrogate_fn, kl_fn, policy_params,
            max_kl=config.max_kl, cg_iters=config.cg_iters, cg_damping=config.cg_damping,
            backtrack_coeff=config.backtrack_coeff, max_backtracks=config.max_backtracks,
        )
        vf_loss = self._fit_critic(module_id, module, batch, config)
        with torch.no_grad():
            entropy = masked_mean(current_dist().entropy(), mask)
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: -stats["surrogate_improvement"],
                VF_LOSS_KEY: vf_loss.item(),
                ENTROPY_KEY: entropy.item(),
                "mean_kl_loss": stats["kl"],
                **{k: v for k, v in stats.items() if k != "kl"},
            },
            key=module_id,
            window=1,
        )
        return vf_loss

    def _fit_critic(self, module_id: str, module, batch: dict[str, Any], config: TRPOConfig) -> torch.Tensor:
        """`vf_epochs` passes of minibatch Adam on the squared value error (phantom rows excluded)."""
        optimizer = self.get_optimizer(module_id, VALUE_OPTIMIZER)
        mask = batch.get(Columns.LOSS_MASK)
        rows = torch.nonzero(mask).squeeze(-1) if mask is not None else torch.arange(len(batch[Columns.OBS]))
        obs, targets = batch[Columns.OBS][rows], batch[Postprocessing.VALUE_TARGETS][rows]
        last = torch.zeros(())
        for _ in range(config.vf_epochs):
            for chunk in torch.randperm(len(rows)).split(config.vf_minibatch_size):
                values = module.compute_values({Columns.OBS: obs[chunk]})
                loss = value_loss(values, targets[chunk]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = loss.detach()
        return last


TRPO_OPTIONS = ONPOLICY_OPTIONS + (
    Option("max_kl", "trust-region size delta", positive, "> 0"),
    Option("cg_iters", "conjugate-gradient iterations", positive, ">= 1"),
    Option("cg_damping", "damping added to the Fisher-vector product", lambda x: x >= 0, ">= 0"),
    Option("backtrack_coeff", "line-search shrink factor", lambda x: 0 < x < 1, "in (0, 1)"),
    Option("max_backtracks", "line-search attempts", positive, ">= 1"),
    Option("vf_epochs", "critic Adam passes per batch", positive, ">= 1"),
    Option("vf_minibatch_size", "critic minibatch size", positive, ">= 1"),
)

RULE = Rule(
    name="trpo",
    family="trust-region",
    paper_ids=("P145", "P158"),
    summary="conjugate-gradient natural step on the surrogate, KL <= delta enforced by line search",
    config_class=TRPOConfig,
    options=TRPO_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 400.0,
                                 "SB3-contrib TRPO reaches ~500 on CartPole-v1 within 100k steps"),
)
