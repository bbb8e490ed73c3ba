"""SAC with a probabilistic mixture-of-experts policy: P045, Ren, Li, Ding, Pan & Dong 2021, "Probabilistic
Mixture-of-Experts for Efficient Deep Reinforcement Learning" (PMOE), on the SAC of `sac.py` and its Redis replay.

The actor is a Gaussian mixture over the pre-squash action u (a = tanh(u)): routing weights w(s) = softmax(l(s))
and K experts N(mu_k(s), sigma_k(s)^2) (algorithms/common/mixture_policy.py). Acting samples an expert k ~ w(s),
then u from it. Choosing an expert is not differentiable, so PMOE trains the two parts separately. On replayed s,
with one reparameterised sample a_k = tanh(mu_k + sigma_k eps_k) from every expert:

    k*(s)    = argmax_k min_i Q_i(s, a_k)                     (the best expert at s for the current critics)
    J_pi     = mean_B alpha log pi(a_k*|s) - min_i Q_i(s, a_k*)      (back-propagation through the best expert
                                                              only; log pi is the mixture's density, routing held)
    J_w      = mean_B sum_k (w_k(s) - 1[k = k*(s)])^2        (frequency loss: its expected gradient moves w_k towards
                                                              the frequency with which expert k is best)
    actor step on J_pi + c_w J_w;  critics: SAC's J_Q with a' ~ pi(.|s') and log pi(a'|s') of the mixture;
    temperature: SAC's J_alpha with log pi of a sample from the mixture.

Source note: only the paper's abstract and summaries ("frequency approximate gradient" for the routing, back-
propagation for the experts) could be read here, not its method section or code; the two losses above are our
reading of that estimator (least squares of the routing weights to the one-hot best expert, whose expectation is
each expert's frequency of being best; the SAC actor loss through the best expert's reparameterised action).
Choices the paper leaves open or that we made, ours: K = 4 experts on a shared torso (the last layer outputs the
K routing logits, means and log-stds); c_w = 1; log-stds clamped to [-5, 2]; the entropy term of J_pi uses the
mixture density at a_k* with the routing weights held constant (they learn from J_w only); the greedy action
(evaluation) is tanh of the most probable expert's mean; everything else is `sac.py`'s Pendulum-v1 setting. Pendulum
instead of the paper's MuJoCo tasks, for the shared 2-core machine.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.sac.sac_learner import QF_PREDS, QF_TWIN_PREDS
from ray.rllib.algorithms.sac.torch.default_sac_torch_rl_module import DefaultSACTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.models.configs import MLPHeadConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import check_positive_ints, set_provided
from algorithms.common.mixture_policy import (
    expert_samples,
    mixture_inputs_dim,
    mixture_log_prob,
    routing_frequency_loss,
    sample_mixture,
    split_mixture_inputs,
)
from algorithms.offpolicy import sac as _sac
from algorithms.offpolicy.sac import SACRule, SACRuleConfig, SACRuleLearner
from algorithms.options import Option, non_negative
from algorithms.rule import LearningCheck, Rule

ROUTING_LOGITS, LOGP_POLICY_SAMPLE = "pmoe_logits", "pmoe_logp_policy_sample"
Q_PER_EXPERT, LOGP_PER_EXPERT = "pmoe_q_per_expert", "pmoe_logp_per_expert"  # [B, K], gradients to the actor


def best_expert_terms(q_per_expert: torch.Tensor, logp_per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """From Q(s, a_k) and log pi(a_k|s), both [B, K]: k*, Q(s, a_k*) and log pi(a_k*|s) (gradients kept)."""
    best = q_per_expert.detach().argmax(dim=-1)
    pick = best.unsqueeze(-1)
    return {"best": best, "q": q_per_expert.gather(-1, pick).squeeze(-1),
            "logp": logp_per_expert.gather(-1, pick).squeeze(-1)}


def pmoe_actor_loss(q_per_expert: torch.Tensor, logp_per_expert: torch.Tensor, logits: torch.Tensor,
                    alpha: torch.Tensor | float, frequency_coeff: float = 1.0) -> dict[str, torch.Tensor]:
    """J_pi on the best expert plus c_w times the routing frequency loss."""
    best = best_expert_terms(q_per_expert, logp_per_expert)
    actor = (alpha * best["logp"] - best["q"]).mean()
    frequency = routing_frequency_loss(logits, best["best"])
    return {"actor": actor, "frequency": frequency, "total": actor + frequency_coeff * frequency,
            "best": best["best"]}


class PMOESACModule(DefaultSACTorchRLModule):
    """SAC module whose policy head outputs a K-expert Gaussian mixture; acting samples it (in [-1, 1]^d)."""

    @override(DefaultSACTorchRLModule)
    def setup(self) -> None:
        super().setup()
        if not isinstance(self.action_space, gym.spaces.Box):
            raise ValueError(f"sac_pmoe needs a Box action space, got {self.action_space}")
        self.num_experts = int(self.model_config["num_experts"])
        self.action_dim = int(np.prod(self.action_space.shape))
        self.pi = MLPHeadConfig(
            input_dims=self.catalog.latent_dims, hidden_layer_dims=self.catalog.pi_and_qf_head_hiddens,
            hidden_layer_activation=self.catalog.pi_and_qf_head_activation, output_layer_activation="linear",
            output_layer_dim=mixture_inputs_dim(self.num_experts, self.action_dim),
        ).build(framework=self.framework)

    def mixture(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = self.pi(self.pi_encoder({Columns.OBS: obs})[ENCODER_OUT])
        return split_mixture_inputs(raw, self.num_experts, self.action_dim)

    def _shaped(self, flat_actions: torch.Tensor) -> torch.Tensor:
        return flat_actions.reshape(-1, *self.action_space.shape)

    @override(DefaultSACTorchRLModule)
    def _forward_inference(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits, mean, _ = self.mixture(batch[Columns.OBS])
        index = logits.argmax(dim=-1).view(-1, 1, 1).expand(-1, 1, self.action_dim)
        return {Columns.ACTIONS: self._shaped(torch.tanh(mean.gather(1, index).squeeze(1)))}

    @override(DefaultSACTorchRLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logits, mean, log_std = self.mixture(batch[Columns.OBS])
        return {Columns.ACTIONS: self._shaped(torch.tanh(sample_mixture(logits, mean, log_std)))}

    def _frozen_critic_q(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_i Q_i(s, a) with the critics' parameters frozen, so only the actor receives gradients."""
        params = [p for net in (self.qf, self.qf_encoder, self.qf_twin, self.qf_twin_encoder) for p in net.parameters()]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.compute_q_values({Columns.OBS: obs, Columns.ACTIONS: actions})
        finally:
            for p in params:
                p.requires_grad_(True)

    @override(DefaultSACTorchRLModule)
    def _forward_train(self, batch: dict[str, Any]) -> dict[str, Any]:
        obs, next_obs, actions = batch[Columns.OBS], batch[Columns.NEXT_OBS], batch[Columns.ACTIONS]
        critic_batch = {Columns.OBS: obs, Columns.ACTIONS: actions}
        out = {QF_PREDS: self._qf_forward_train_helper(critic_batch, self.qf_encoder, self.qf),
               QF_TWIN_PREDS: self._qf_forward_train_helper(critic_batch, self.qf_twin_encoder, self.qf_twin)}
        batch_size, k = obs.shape[0], self.num_experts

        logits, mean, log_std = self.mixture(obs)
        u = expert_samples(mean, log_std)  # [B, K, d]: one reparameterised action per expert
        repeated_obs = obs.unsqueeze(1).expand(-1, k, *obs.shape[1:]).reshape(batch_size * k, *obs.shape[1:])
        q_per_expert = self._frozen_critic_q(repeated_obs, self._shaped(torch.tanh(u))).view(batch_size, k)
        logp_per_expert = mixture_log_prob(u, logits.detach(), mean, log_std)  # routing learns from J_w only
        best = best_expert_terms(q_per_expert, logp_per_expert)
        # q_curr / logp_resampled feed sac.py's loss code; the learner replaces its actor loss by pmoe_actor_loss.
        out.update({"q_curr": best["q"], "logp_resampled": best["logp"], ROUTING_LOGITS: logits,
                    Q_PER_EXPERT: q_per_expert, LOGP_PER_EXPERT: logp_per_expert})
        with torch.no_grad():
            # The temperature follows the entropy of the mixture itself: log pi of a sample from pi.
            sample = sample_mixture(logits, mean, log_std)
            out[LOGP_POLICY_SAMPLE] = mixture_log_prob(sample, logits, mean, log_std)
            next_logits, next_mean, next_log_std = self.mixture(next_obs)
            next_u = sample_mixture(next_logits, next_mean, next_log_std)
            out["logp_next_resampled"] = mixture_log_prob(next_u, next_logits, next_mean, next_log_std)
            out["q_target_next"] = self.forward_target(
                {Columns.OBS: next_obs, Columns.ACTIONS: self._shaped(torch.tanh(next_u))})
        return out


class SACPMOEConfig(SACRuleConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SACPMOE)
        self.num_experts = 4
        self.frequency_loss_coeff = 1.0

    @override(SACRuleConfig)
    def training(self, *, num_experts: int = NotProvided, frequency_loss_coeff: float = NotProvided,
                 **kwargs) -> "SACPMOEConfig":
        super().training(**kwargs)
        set_provided(self, num_experts=num_experts, frequency_loss_coeff=frequency_loss_coeff)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"num_experts": self.num_experts}

    @override(SACRuleConfig)
    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "num_experts")
        if self.frequency_loss_coeff < 0:
            self._value_error(f"frequency_loss_coeff must be >= 0, got {self.frequency_loss_coeff}")

    @override(SACRuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PMOESACModule, model_config=self.model_config)

    @override(SACRuleConfig)
    def get_default_learner_class(self):
        return SACPMOELearner


class SACPMOELearner(SACRuleLearner):
    @override(SACRuleLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        # SAC's four losses on the best expert's action (J_pi above); then the routing loss and the temperature
        # loss on a genuine mixture sample replace or extend the actor's and temperature's terms.
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        log_alpha = self.curr_log_alpha[module_id]
        actor = pmoe_actor_loss(fwd_out[Q_PER_EXPERT], fwd_out[LOGP_PER_EXPERT], fwd_out[ROUTING_LOGITS],
                                log_alpha.exp().detach(), config.frequency_loss_coeff)
        alpha_loss = -(log_alpha * (fwd_out[LOGP_POLICY_SAMPLE] + self.target_entropy[module_id])).mean()
        replaced = self._temp_losses[(module_id, "alpha_loss")] + self._temp_losses[(module_id, POLICY_LOSS_KEY)]
        self._temp_losses[(module_id, "alpha_loss")] = alpha_loss
        self._temp_losses[(module_id, POLICY_LOSS_KEY)] = actor["total"]
        usage = torch.bincount(actor["best"], minlength=fwd_out[ROUTING_LOGITS].shape[-1]).float()
        routing = torch.distributions.Categorical(logits=fwd_out[ROUTING_LOGITS].detach())
        self.metrics.log_dict({
            POLICY_LOSS_KEY: actor["actor"], "alpha_loss": alpha_loss, "frequency_loss": actor["frequency"],
            "routing_entropy": routing.entropy().mean(), "best_expert_max_share": usage.max() / usage.sum(),
        }, key=module_id, window=1)
        return total - replaced + alpha_loss + actor["total"]


class SACPMOE(SACRule):
    @classmethod
    @override(SACRule)
    def get_default_config(cls) -> SACPMOEConfig:
        return SACPMOEConfig()


RULE = Rule(
    name="sac_pmoe",
    family="off-policy",
    paper_ids=("P045",),
    summary="SAC with a Gaussian-mixture (PMOE) policy: actor gradient through the best expert by Q, routing "
            "weights by the frequency loss; Redis replay",
    config_class=SACPMOEConfig,
    options=_sac.RULE.options + (
        Option("num_experts", "K: Gaussian experts in the mixture policy",
               lambda x: isinstance(x, int) and x >= 1, "an integer >= 1"),
        Option("frequency_loss_coeff", "weight c_w of the routing frequency loss", non_negative, ">= 0"),
    ),
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-250.0,
        source="the sac rule's check (RL-Baselines3-Zoo SAC Pendulum-v1, 2e4 steps, benchmark about -150); P045 "
               "reports PMOE-SAC at least matching SAC; budget 40k = the zoo's 20k to learn + 20k for the window "
               "of the score (the mean of the last 100 training episodes, 200 steps each on Pendulum)",
    ),
    smoke_overrides=dict(_sac.RULE.smoke_overrides),
)
