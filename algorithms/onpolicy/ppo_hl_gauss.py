"""P127 Farebrother et al. 2024, "Stop Regressing: Training Value Functions via Classification for Scalable Deep
RL", applied to PPO's critic (P147): the value head outputs logits over m bins and is trained by cross-entropy
against the HL-Gauss (or two-hot) projection of the GAE value target, instead of the squared error.

With p(s) = softmax(l(s)) over bin centres z (algorithms/common/value_classification.py) and the GAE (P158) target
V_t^targ = A_t + V_old(s_t):

    V(s)     = sum_i p_i(s) z_i                               (what GAE, the advantages and the bootstrap use)
    L^VF     = E_t[ - sum_i q_i(V_t^targ) log p_i(s_t) ]      (HL-Gauss: sigma = 0.75 bin width; or two-hot)
    loss     = -L^CLIP + c1 L^VF - c2 E_t[ H(pi(.|s_t)) ]    (P147 eq. 9 with the classification value loss)

Choices the paper leaves open, ours: the paper's experiments are value-based (and SAC/actor-critic at scale); for
PPO we replace only the value loss and keep PPO's defaults (P147 MuJoCo settings, separate 64-64 tanh torsos; the
value head is one linear layer to m logits). Support [-10, 110] with 120 bins (width 1, sigma 0.75): CartPole's
discounted returns lie in [0, 100]; targets outside are clipped into the support. `value_clip` (a clipped
regression) has no classification analogue and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import VF_LOSS_KEY
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from torch import nn

from algorithms.common.config_fields import check_not_recurrent
from algorithms.common.losses import masked_mean
from algorithms.common.value_classification import (
    SUPPORT_OPTIONS,
    ValueSupportConfigMixin,
    bin_centers,
    classification_value_loss,
    expected_value,
)
from algorithms.onpolicy.ppo import PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.rule import LearningCheck, Rule

_SUPPORT_KEYS = ("value_num_bins", "value_min", "value_max")  # model_config keys the module reads


class HLGaussPPOModule(DefaultPPOTorchRLModule):
    """PPO's actor-critic whose value head has m outputs (bin logits); compute_values is their expected value."""

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        config = self.model_config
        self.vf = nn.Linear(self.catalog.latent_dims[0], int(config["value_num_bins"]))
        self.register_buffer("bin_centers", bin_centers(config["value_min"], config["value_max"],
                                                        int(config["value_num_bins"])), persistent=False)

    def value_logits(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """[B, m]: the base class's value path (critic torso + self.vf) without its scalar squeeze."""
        return super().compute_values(batch, embeddings=embeddings)

    @override(DefaultPPOTorchRLModule)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        return expected_value(self.value_logits(batch, embeddings), self.bin_centers)


class _WithoutValueLoss:
    """A read-only view of a config with c1 = 0: PPO's learner then adds no regression value loss."""

    vf_loss_coeff = 0.0

    def __init__(self, config: Any):
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class PPOHLGaussConfig(ValueSupportConfigMixin, PPORuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PPOHLGauss)
        self._init_value_support()

    @property
    @override(PPORuleConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | dict(zip(_SUPPORT_KEYS, (self.num_bins, self.value_min,
                                                                               self.value_max)))

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.value_clip is not None:
            self._value_error("ppo_hl_gauss trains the value by classification: value_clip must be none")
        check_not_recurrent(self, "ppo_hl_gauss")

    @override(PPORuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=HLGaussPPOModule)

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return PPOHLGaussLearner


class PPOHLGauss(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> PPOHLGaussConfig:
        return PPOHLGaussConfig()


class PPOHLGaussLearner(PPORuleLearner):
    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: PPOHLGaussConfig, batch: dict[str, Any], fwd_out):
        # PPO's clipped surrogate, entropy bonus (and KL penalty if on) with c1 = 0, then c1 times the cross-entropy.
        total = super().compute_loss_for_module(module_id=module_id, config=_WithoutValueLoss(config), batch=batch,
                                                fwd_out=fwd_out)
        module = self.module[module_id].unwrapped()
        logits = module.value_logits(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        per_sample = classification_value_loss(logits, batch[Postprocessing.VALUE_TARGETS], config.value_min,
                                               config.value_max, config.value_loss, config.sigma_ratio)
        vf_loss = masked_mean(per_sample, batch.get(Columns.LOSS_MASK))
        if self.log_minibatch_metrics:
            self.metrics.log_dict({VF_LOSS_KEY: vf_loss, "value_mean": expected_value(
                logits.detach(), module.bin_centers).mean()}, key=module_id, window=1)
        return total + config.vf_loss_coeff * vf_loss


RULE = Rule(
    name="ppo_hl_gauss",
    family="on-policy",
    paper_ids=("P127",),
    summary="PPO whose critic is a categorical value head trained by HL-Gauss (or two-hot) cross-entropy",
    config_class=PPOHLGaussConfig,
    options=tuple(o for o in PPO_OPTIONS if o.name != "value_clip") + SUPPORT_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 450.0,
                                 "P127: classification value losses match or beat regression; the ppo rule's "
                                 "check (CleanRL/SB3 PPO reach ~500 on CartPole-v1 within 100k steps)"),
)
