"""P209 FixPO: Guaranteed Trust Region Optimization via Two-Phase KL Penalization (Zentner, Puri, Huang, Sukhatme 2023).

Per batch sampled with pi_old, with D(s) = KL(pi_old(.|s) || pi_theta(.|s)) and a penalty coefficient beta >= 0:

Primary phase, `num_epochs` passes of minibatch Adam on

    L_theta = -E[ r A ] + beta E_s[ D(s) ] + c1 (V - V_targ)^2 - c2 H,       r = pi_theta(a|s) / pi_old(a|s)

(the unclipped importance-weighted objective: the KL penalty replaces PPO's clipping), and after every minibatch
one Adam step (step size gamma_beta) on the Lagrange-multiplier-style loss

    L_beta = beta * ( eps_KL - C_beta * max_{s in minibatch} D(s) ),   then beta <- max(beta, 0),

so beta grows while C_beta * max D exceeds eps_KL: the primary phase aims at max D ~ eps_KL / C_beta, leaving
a margin to the trust region eps_KL.

Fixup phase (after every epoch): cut the batch into fixed minibatches of `fixup_minibatch_size` rows; while some
minibatch has max_s D(s) > eps_KL, take a gradient step on beta * E_s[D(s)] alone for each violating minibatch
(and update beta as above). It ends after a full pass without a violation, so when the update returns,
max_s D(s) <= eps_KL holds on every state of the batch: the trust-region guarantee.

Choices, from the authors' code (uscresl/stabilized-rl, `fixpo_tianshou.py`) where the paper leaves them open:
the KL statistic constrained is the max over states; gamma_beta = 0.01 with Adam, beta_0 = 1, eps_KL = 0.2,
C_beta = 2 (its class defaults); the fixup runs after every epoch; gradient-norm clipping applies in both
phases. Here the PPO rule's CartPole settings are used for the rest (batch 2048, 10 epochs, minibatches of 64,
standardised GAE advantages, c1 = 0.5, Adam 3e-4, clip 0.5); the authors' MuJoCo runs normalise rewards, clip
the value change and decay the learning rate, not done here. `max_fixup_steps` bounds the fixup loop as a
safety net for a service (the paper's loop is unbounded); hitting it is reported as `fixup_incomplete` = 1.
beta is saved in the learner's checkpoint state (its Adam moments restart after a restore).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.losses import importance_weighted_surrogate, masked_mean, value_loss
from algorithms.onpolicy.base import OnPolicyAlgorithm, OnPolicyConfig, OnPolicyLearner
from algorithms.options import ONPOLICY_OPTIONS, Option, positive
from algorithms.rule import LearningCheck, Rule

BETA_STATE_KEY = "fixpo_beta"


def fixpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kl_old_new: torch.Tensor,
    values: torch.Tensor,
    value_targets: torch.Tensor,
    entropy: torch.Tensor,
    *,
    beta: float,
    vf_coeff: float,
    entropy_coeff: float,
) -> dict[str, torch.Tensor]:
    """The primary-phase loss L_theta on a minibatch (all rows real); `kl_old_new` is D(s) per row."""
    surrogate = importance_weighted_surrogate(torch.exp(logp - old_logp), advantages).mean()
    kl = kl_old_new.mean()
    vf = value_loss(values, value_targets).mean()
    mean_entropy = entropy.mean()
    total = -surrogate + beta * kl + vf_coeff * vf - entropy_coeff * mean_entropy
    return {"total_loss": total, "policy_loss": -surrogate, "kl": kl, "vf_loss": vf, "entropy": mean_entropy}


def fixpo_beta_loss(beta: torch.Tensor, kl_old_new: torch.Tensor, eps_kl: float, c_beta: float) -> torch.Tensor:
    """L_beta = beta * (eps_KL - C_beta * max_s D(s)); D is detached, only beta gets a gradient."""
    return beta * (eps_kl - c_beta * kl_old_new.detach().max())


def violates_trust_region(kl_old_new: torch.Tensor, eps_kl: float) -> bool:
    """True when some state's KL(pi_old || pi_theta) exceeds eps_KL."""
    return bool((kl_old_new > eps_kl).any())


class FixPOConfig(OnPolicyConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or FixPO)
        self.lr = 3e-4
        self.train_batch_size_per_learner = 2048
        self.minibatch_size = 64
        self.num_epochs = 10
        self.gamma = 0.99
        self.lambda_ = 0.95
        self.vf_loss_coeff = 0.5
        self.entropy_coeff = 0.0
        self.grad_clip = 0.5
        self.eps_kl = 0.2
        self.c_beta = 2.0
        self.beta_lr = 0.01
        self.init_beta = 1.0
        self.fixup_minibatch_size = 1024
        self.fixup_every_epoch = True
        self.max_fixup_steps = 10_000

    @override(OnPolicyConfig)
    def training(
        self,
        *,
        eps_kl: float = NotProvided,
        c_beta: float = NotProvided,
        beta_lr: float = NotProvided,
        init_beta: float = NotProvided,
        fixup_minibatch_size: int = NotProvided,
        fixup_every_epoch: bool = NotProvided,
        max_fixup_steps: int = NotProvided,
        **kwargs,
    ) -> "FixPOConfig":
        super().training(**kwargs)
        for name, value in dict(eps_kl=eps_kl, c_beta=c_beta, beta_lr=beta_lr, init_beta=init_beta,
                                fixup_minibatch_size=fixup_minibatch_size, fixup_every_epoch=fixup_every_epoch,
                                max_fixup_steps=max_fixup_steps).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @override(OnPolicyConfig)
    def validate(self) -> None:
        super().validate()
        if self.eps_kl <= 0:
            self._value_error(f"eps_kl must be > 0, got {self.eps_kl}")
        if self.c_beta < 1:
            self._value_error(f"c_beta must be >= 1 (the primary phase targets eps_kl / c_beta), got {self.c_beta}")
        if self.beta_lr <= 0 or self.init_beta < 0:
            self._value_error(f"beta_lr must be > 0 and init_beta >= 0, got {self.beta_lr}, {self.init_beta}")
        if self.minibatch_size is None or self.minibatch_size < 1 or self.num_epochs < 1:
            self._value_error("FixPO's primary phase needs minibatch_size >= 1 and num_epochs >= 1")
        if self.fixup_minibatch_size < 1 or self.max_fixup_steps < 1:
            self._value_error("fixup_minibatch_size and max_fixup_steps must be >= 1")
        if self.use_kl_loss:
            self._value_error("FixPO has its own KL penalty: use_kl_loss must be False")

    @override(OnPolicyConfig)
    def get_default_learner_class(self):
        return FixPOLearner


class FixPO(OnPolicyAlgorithm):
    @classmethod
    @override(OnPolicyAlgorithm)
    def get_default_config(cls) -> FixPOConfig:
        return FixPOConfig()


class FixPOLearner(OnPolicyLearner):
    """Both phases in one `_uncompiled_update` call on the whole batch (the fixup phase needs all of it)."""

    @override(OnPolicyLearner)
    def build(self) -> None:
        super().build()
        self._betas: dict[str, torch.nn.Parameter] = {}
        self._beta_optimizers: dict[str, torch.optim.Optimizer] = {}

    def _beta(self, module_id: str) -> torch.nn.Parameter:
        if module_id not in self._betas:
            config = self.config.get_config_for_module(module_id)
            self._betas[module_id] = torch.nn.Parameter(torch.tensor(float(config.init_beta)))
            self._beta_optimizers[module_id] = torch.optim.Adam([self._betas[module_id]], lr=config.beta_lr)
        return self._betas[module_id]

    @override(OnPolicyLearner)
    def update(self, *args, num_epochs: int = 1, minibatch_size: int | None = None, **kwargs):
        # The rule runs its own epochs and minibatches from the config; RLlib hands over the whole batch once.
        return super().update(*args, num_epochs=1, minibatch_size=None, **kwargs)

    @override(OnPolicyLearner)
    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[BETA_STATE_KEY] = {module_id: float(beta.detach()) for module_id, beta in self._betas.items()}
        return state

    @override(OnPolicyLearner)
    def set_state(self, state) -> None:
        super().set_state(state)
        for module_id, value in (state.get(BETA_STATE_KEY) or {}).items():
            with torch.no_grad():
                self._beta(module_id).fill_(value)

    @override(OnPolicyLearner)
    def _uncompiled_update(self, batch: dict[str, Any], **kwargs):
        losses = {module_id: self._update_module(module_id, module_batch) for module_id, module_batch in batch.items()}
        return {}, losses, {}

    def _update_module(self, module_id: str, batch: dict[str, Any]) -> torch.Tensor:
        config = self.config.get_config_for_module(module_id)
        module = self.module[module_id].unwrapped()
        if module.is_stateful():
            raise ValueError("fixpo supports feed-forward modules only (its minibatches are rows)")
        rows = _real_rows(batch)
        data = {key: batch[key][rows] for key in (Columns.OBS, Columns.ACTIONS, Columns.ACTION_LOGP,
                                                  Columns.ACTION_DIST_INPUTS, Postprocessing.ADVANTAGES,
                                                  Postprocessing.VALUE_TARGETS)}
        num_rows = len(rows)
        optimizer = self.get_optimizer(module_id)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        beta = self._beta(module_id)
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        fixup_steps, incomplete, terms = 0, False, None
        for epoch in range(config.num_epochs):
            for chunk in torch.randperm(num_rows).split(config.minibatch_size):
                new_dist, kl, values = self._forward(module, data, chunk, with_values=True)
                terms = fixpo_loss(
                    new_dist.logp(data[Columns.ACTIONS][chunk]), data[Columns.ACTION_LOGP][chunk],
                    data[Postprocessing.ADVANTAGES][chunk], kl, values, data[Postprocessing.VALUE_TARGETS][chunk],
                    new_dist.entropy(), beta=float(beta.detach()), vf_coeff=config.vf_loss_coeff,
                    entropy_coeff=entropy_coeff,
                )
                _gradient_step(optimizer, params, terms["total_loss"], config.grad_clip)
                self._update_beta(module_id, kl, config)
            if config.fixup_every_epoch or epoch == config.num_epochs - 1:
                steps, incomplete = self._fixup(module_id, module, data, num_rows, optimizer, params, config,
                                                config.max_fixup_steps - fixup_steps)
                fixup_steps += steps

        with torch.no_grad():
            _, kl_all, _ = self._forward(module, data, torch.arange(num_rows), with_values=False)
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: terms["policy_loss"].item(),
                VF_LOSS_KEY: terms["vf_loss"].item(),
                ENTROPY_KEY: terms["entropy"].item(),
                "mean_kl_loss": kl_all.mean().item(),
                "max_kl": kl_all.max().item(),
                "beta": float(beta.detach()),
                "fixup_steps": float(fixup_steps),
                "fixup_incomplete": float(incomplete),
            },
            key=module_id,
            window=1,
        )
        return terms["total_loss"].detach()

    def _forward(self, module, data: dict[str, torch.Tensor], chunk: torch.Tensor, with_values: bool):
        """(pi_theta on the rows, D(s) = KL(pi_old || pi_theta) per row, V(s) or None)."""
        minibatch = {Columns.OBS: data[Columns.OBS][chunk]}
        out = module.forward_train(minibatch)
        dist_cls = module.get_train_action_dist_cls()
        new_dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
        old_dist = dist_cls.from_logits(data[Columns.ACTION_DIST_INPUTS][chunk])
        values = module.compute_values(minibatch, embeddings=out.get(Columns.EMBEDDINGS)) if with_values else None
        return new_dist, old_dist.kl(new_dist), values

    def _update_beta(self, module_id: str, kl: torch.Tensor, config: FixPOConfig) -> None:
        beta, optimizer = self._betas[module_id], self._beta_optimizers[module_id]
        optimizer.zero_grad(set_to_none=True)
        fixpo_beta_loss(beta, kl, config.eps_kl, config.c_beta).backward()
        optimizer.step()
        with torch.no_grad():
            beta.clamp_(min=0.0)

    def _fixup(self, module_id, module, data, num_rows, optimizer, params, config, budget) -> tuple[int, bool]:
        """Gradient steps on beta * E[D] until no fixed minibatch has a state with D > eps_KL.

        Returns (steps taken, whether the step budget ran out first).
        """
        chunks = torch.arange(num_rows).split(config.fixup_minibatch_size)
        steps = 0
        while True:
            satisfied = True
            for chunk in chunks:
                _, kl, _ = self._forward(module, data, chunk, with_values=False)
                if not violates_trust_region(kl, config.eps_kl):
                    continue
                satisfied = False
                if steps >= budget:
                    return steps, True
                _gradient_step(optimizer, params, self._betas[module_id].detach() * kl.mean(), config.grad_clip)
                self._update_beta(module_id, kl, config)
                steps += 1
            if satisfied:
                return steps, False


def _real_rows(batch: dict[str, Any]) -> torch.Tensor:
    """Indices of the rows that are real steps (the phantom bootstrap rows have LOSS_MASK False)."""
    mask = batch.get(Columns.LOSS_MASK)
    if mask is None:
        return torch.arange(len(batch[Columns.OBS]))
    return mask.nonzero().squeeze(-1)


def _gradient_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor,
                   grad_clip: float | None) -> None:
    """One optimizer step on `loss`; parameters it does not touch keep grad None, so Adam leaves them alone."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
    optimizer.step()


FIXPO_OPTIONS = ONPOLICY_OPTIONS + (
    Option("num_epochs", "primary-phase passes over each batch", positive, ">= 1"),
    Option("minibatch_size", "primary-phase minibatch size", positive, ">= 1"),
    Option("vf_loss_coeff", "value-loss coefficient c1", lambda x: x >= 0, ">= 0"),
    Option("entropy_coeff", "entropy-bonus coefficient c2", lambda x: x >= 0, ">= 0"),
    Option("eps_kl", "trust region eps_KL on max_s KL(pi_old || pi)", positive, "> 0"),
    Option("c_beta", "C_beta: the primary phase targets max KL ~ eps_KL / C_beta", lambda x: x >= 1, ">= 1"),
    Option("beta_lr", "Adam step size gamma_beta of the KL coefficient", positive, "> 0"),
    Option("init_beta", "initial KL coefficient beta", lambda x: x >= 0, ">= 0"),
    Option("fixup_minibatch_size", "rows per fixup-phase minibatch", positive, ">= 1"),
    Option("fixup_every_epoch", "run the fixup phase after every epoch (false: after the last)"),
    Option("max_fixup_steps", "safety bound on fixup gradient steps per update", positive, ">= 1"),
)

RULE = Rule(
    name="fixpo",
    family="trust-region",
    paper_ids=("P209", "P158"),
    summary="KL-penalised surrogate with Lagrangian beta, then fixup steps on the KL until max KL <= eps_KL",
    config_class=FixPOConfig,
    options=FIXPO_OPTIONS,
    learning_check=LearningCheck(
        "CartPole-v1", 100_000, 400.0,
        "P209: FixPO is competitive with other trust-region methods; SB3-contrib TRPO reaches ~500 on "
        "CartPole-v1 within 100k steps (the trpo rule's check)",
    ),
    smoke_overrides={"fixup_minibatch_size": 128},
)
