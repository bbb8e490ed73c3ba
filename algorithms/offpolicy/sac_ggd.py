"""SAC with generalized Gaussian TD errors: P256, Kim, Lee, Cho, Han & Hwang, "Generalized Gaussian Temporal
Difference Error for Uncertainty-aware Reinforcement Learning" (arXiv 2408.02295), on the SAC of `sac.py` (the paper
applies it to SAC for continuous control) and its Redis replay.

Each critic i = 1, 2 outputs, besides Q_i(s, a), the scale alpha_i(s, a) and shape beta_i(s, a) of a zero-mean
generalized Gaussian model of its TD error (algorithms/common/generalized_gaussian.py). With the soft target y of
`sac.py` (target critics' min at a' ~ pi(.|s'), minus alpha_ent log pi(a'|s')):

    delta_i  = y - Q_i(s, a)
    NLL_i    = (|delta_i| / alpha_i)^beta_i + log alpha_i - log beta_i + log Gamma(1 / beta_i) + log 2
    w_i      = beta_i / (beta_1 + beta_2)          (risk-averse weighting: the critic whose error distribution
                                                    has the lower aleatoric variance alpha^2 Gamma(3/b)/Gamma(1/b),
                                                    i.e. the larger beta, counts more; held constant)
    J_Q_i    = mean_B w_i NLL_i                     (replaces SAC's 1/2 mean_B delta_i^2)

The actor, temperature and target-network updates are SAC's (Q_i is the critics' first output).

Choices the paper leaves open or that we made, ours: (1) the scale alpha_i is learned by the critic too (the
authors' code fixes alpha = 1 and learns beta only, which ties the loss to the units of the reward); (2) one linear
"GGD head" per critic on the critic's last hidden layer gives alpha = softplus(u) + 1e-3 and
beta = clamp(softplus(v) + 0.5, max 8), initialised at alpha = 1, beta = 2 (a Gaussian), the bounds keep
(|delta| / alpha)^beta finite; (3) the weights are detached (the authors' code lets gradients flow into them),
and the NLL has the GGD's own (|delta| / alpha)^beta term (the authors' code multiplies |delta| by beta);
(4) the paper's second part, batch inverse error-variance weighting for epistemic uncertainty, needs an ensemble
of more than two critics and is not implemented; (5) everything else is `sac.py`'s Pendulum-v1 setting.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import nn
from ray.rllib.algorithms.sac.sac_learner import QF_LOSS_KEY, QF_PREDS, QF_TWIN_LOSS_KEY, QF_TWIN_PREDS
from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import VF_LOSS_KEY
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.common.generalized_gaussian import ggd_nll, ggd_variance, risk_averse_weights
from algorithms.common.td_targets import soft_q_target
from algorithms.offpolicy.sac import SACRule, SACRuleConfig, SACRuleLearner
from algorithms.offpolicy import sac as _sac
from algorithms.options import Option
from algorithms.rule import LearningCheck, Rule

MIN_SCALE, MIN_SHAPE, MAX_SHAPE = 1e-3, 0.5, 8.0
GGD_PARAMS = "ggd_params"  # [2 critics, B, 2]: (alpha, beta) of each critic at the replayed (s, a)


def sac_ggd_critic_losses(q: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor,
                          weighted: bool = True) -> dict[str, torch.Tensor]:
    """J_Q_i for the critics stacked on dim 0: q, scale, shape are [N, B], target is [B]."""
    nll = ggd_nll(target.detach().unsqueeze(0) - q, scale, shape)
    weights = risk_averse_weights(shape, dim=0) if weighted else torch.ones_like(nll)
    return {"critic_losses": (weights * nll).mean(dim=1), "nll": nll.detach(), "weights": weights}


class GGDCriticHead(nn.Module):
    """RLlib's Q head plus a linear head for (alpha, beta); calling it returns Q only, so SAC's paths are unchanged."""

    def __init__(self, q_head: nn.Module, latent_dim: int):
        super().__init__()
        self.q_head = q_head
        self.ggd = nn.Linear(latent_dim, 2)
        nn.init.uniform_(self.ggd.weight, -1e-3, 1e-3)
        with torch.no_grad():  # softplus^-1: alpha = 1, beta = 2 at the start (a Gaussian TD error)
            self.ggd.bias.copy_(torch.tensor([1.0 - MIN_SCALE, 2.0 - MIN_SHAPE]).expm1().log())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.q_head(features)

    def scale_shape(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = nn.functional.softplus(self.ggd(features))
        return raw[..., 0] + MIN_SCALE, torch.clamp(raw[..., 1] + MIN_SHAPE, max=MAX_SHAPE)


class GGDSACModule(DefaultSACTorchRLModule):
    @override(DefaultSACTorchRLModule)
    def setup(self) -> None:
        super().setup()
        if not self.inference_only:  # the EnvRunners' modules hold the actor only
            latent = int(self.catalog.latent_dims[0])
            self.qf = GGDCriticHead(self.qf, latent)
            self.qf_twin = GGDCriticHead(self.qf_twin, latent)

    @override(DefaultSACTorchRLModule)
    def _forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super()._forward_train(batch)
        critic_batch = {Columns.OBS: batch[Columns.OBS], Columns.ACTIONS: batch[Columns.ACTIONS]}
        params = []
        for key, encoder, head in ((QF_PREDS, self.qf_encoder, self.qf), (QF_TWIN_PREDS, self.qf_twin_encoder,
                                                                         self.qf_twin)):
            features = encoder(critic_batch)[ENCODER_OUT]
            out[key] = head(features).squeeze(-1)  # Q from the same forward pass as its (alpha, beta)
            params.append(torch.stack(head.scale_shape(features), dim=-1))
        out[GGD_PARAMS] = torch.stack(params, dim=0)
        return out


class SACGGDConfig(SACRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SACGGD)
        self.risk_averse_weighting = True

    @override(SACRuleConfig)
    def training(self, *, risk_averse_weighting: bool = NotProvided, **kwargs) -> "SACGGDConfig":
        super().training(**kwargs)
        set_provided(self, risk_averse_weighting=risk_averse_weighting)
        return self

    @override(SACRuleConfig)
    def validate(self) -> None:
        super().validate()
        if not isinstance(self.risk_averse_weighting, bool):
            self._value_error(f"risk_averse_weighting must be true or false, got {self.risk_averse_weighting!r}")

    @override(SACRuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=GGDSACModule, model_config=self.model_config)

    @override(SACRuleConfig)
    def get_default_learner_class(self):
        return SACGGDLearner


class SACGGDLearner(SACRuleLearner):
    @override(SACRuleLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        if not isinstance(self._module[module_id].action_space, gym.spaces.Box):
            raise ValueError("sac_ggd is a continuous-action algorithm: the action space must be a Box")
        # SAC's actor and temperature losses (and its squared critic losses, replaced below).
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        target = soft_q_target(batch[Columns.REWARDS], batch[Columns.TERMINATEDS], config.gamma,
                               [fwd_out["q_target_next"]], fwd_out["logp_next_resampled"],
                               self.curr_log_alpha[module_id].exp().detach())
        params = fwd_out[GGD_PARAMS]
        q = torch.stack([fwd_out[QF_PREDS], fwd_out[QF_TWIN_PREDS]], dim=0)
        terms = sac_ggd_critic_losses(q, target, params[..., 0], params[..., 1], config.risk_averse_weighting)
        critic, critic_twin = terms["critic_losses"]
        replaced = self._temp_losses[(module_id, QF_LOSS_KEY)] + self._temp_losses[(module_id, QF_TWIN_LOSS_KEY)]
        self._temp_losses[(module_id, QF_LOSS_KEY)] = critic
        self._temp_losses[(module_id, QF_TWIN_LOSS_KEY)] = critic_twin
        shape = params[..., 1].detach()
        self.metrics.log_dict({
            QF_LOSS_KEY: critic, QF_TWIN_LOSS_KEY: critic_twin, VF_LOSS_KEY: critic + critic_twin,
            "ggd_scale_mean": params[..., 0].detach().mean(), "ggd_shape_mean": shape.mean(),
            "ggd_td_variance_mean": ggd_variance(params[..., 0].detach(), shape).mean(),
        }, key=module_id, window=1)
        return total - replaced + critic + critic_twin


class SACGGD(SACRule):
    @classmethod
    @override(SACRule)
    def get_default_config(cls) -> SACGGDConfig:
        return SACGGDConfig()


RULE = Rule(
    name="sac_ggd",
    family="off-policy",
    paper_ids=("P256",),
    summary="SAC whose critics model their TD error as a generalized Gaussian (learned scale and shape): GGD "
            "negative log-likelihood with risk-averse (shape) weighting; Redis replay",
    config_class=SACGGDConfig,
    options=_sac.RULE.options + (
        Option("risk_averse_weighting", "weight each critic's GGD loss by beta_i / sum_j beta_j"),
    ),
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-250.0,
        source="the sac rule's check (RL-Baselines3-Zoo SAC Pendulum-v1, 2e4 steps, benchmark about -150); P256 "
               "reports GGD-SAC at least matching SAC; budget 40k = the zoo's 20k to learn + 20k for the window "
               "of the score (the mean of the last 100 training episodes, 200 steps each on Pendulum)",
    ),
    smoke_overrides=dict(_sac.RULE.smoke_overrides),
)
