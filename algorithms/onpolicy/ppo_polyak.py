"""PPO whose policy takes P234's Polyak step (Li et al. 2024, "Enhancing Policy Gradient with the Polyak
Step-Size Adaption"), the demonstration rule for `algorithms/common/optimizers.py`.

Per minibatch, the policy parameters theta take a plain SGD step with the stochastic Polyak step size, bounded
(SPS_max, the form P234 builds on):

    eta_t = min( (f(theta_t) - f*) / (c ||grad f(theta_t)||^2), eta_max ),   theta <- theta - eta_t grad f(theta_t)

with f the policy part of PPO's loss (P147 eq. 7, with r_t = pi_theta / pi_theta_old, advantages A_t from GAE):

    f(theta) = -E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ] - c_H E_t[ H(pi_theta(.|s_t)) ]

P234's difficulty is f*, the optimal value, unknown for the return. PPO's minibatch objective has a known one:
as a function of each ratio, min(r A, clip(r) A) is largest at (1 + eps) A when A >= 0 and (1 - eps) A when A < 0
(the ratio pushed to its clip boundary), and the entropy of a categorical policy over n actions is at most log n:

    f(theta) - f* = E_t[ best_t - min(r_t A_t, clip(r_t) A_t) ] + c_H E_t[ log n - H_t ],
    best_t = (1 + eps) A_t if A_t >= 0 else (1 - eps) A_t                               (each term >= 0)

This f* is the SPS f_i* of the minibatch loss (the optimum over the policy's outputs; a network may not reach it,
so it is a lower bound, which makes the step larger, hence eta_max). The critic keeps PPO's Adam on
c1 (V - V_targ)^2 at `lr`. Choices the paper leaves open (it studies plain policy gradient, not PPO): the
objective and its f* as above instead of the paper's twin-model estimate of V* (not implemented, see
optimizers.py); the step is per minibatch; c = 32 and eta_max = 10 (measured, see the config); the entropy term
(P234 adds an entropy regulariser against near-deterministic policies, whose gradient and thus the step
denominator vanish: the step then grows to eta_max and the policy collapses) is on by default, c_H = 0.01, and
only for discrete actions, whose maximal entropy is known.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

from algorithms.common.losses import clipped_surrogate, masked_mean
from algorithms.onpolicy.ppo import PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.onpolicy.trpo import _is_value_param
from algorithms.options import Option, non_negative
from algorithms.rule import LearningCheck, Rule

POLICY_OPTIMIZER = "policy"
VALUE_OPTIMIZER = "value"


def ppo_polyak_gap(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    *,
    entropy: torch.Tensor | None = None,
    max_entropy: float = 0.0,
    entropy_coeff: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """f(theta) - f* of the policy part of the PPO loss on a minibatch (see the module docstring); >= 0."""
    best = torch.where(advantages >= 0, (1.0 + clip_eps) * advantages, (1.0 - clip_eps) * advantages)
    gap = best - clipped_surrogate(ratio, advantages, clip_eps)
    if entropy_coeff:
        gap = gap + entropy_coeff * (max_entropy - entropy)
    return masked_mean(gap, mask)


class PPOPolyakConfig(PPORuleConfig):
    """PPO's defaults (paper Table 3) with the Polyak step on the policy; the critic keeps Adam at `lr`."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PPOPolyak)
        self.step_size_rule = "polyak"
        # c = 32, eta_max = 10, c_H = 0.01: measured on CartPole-v1 (seed 0, mean return of the last 100 episodes
        # at 100k steps). With c <= 1 one step drove the policy to a deterministic one (entropy 0, zero gradient)
        # in the first iteration. This f* is each minibatch's optimum (every ratio of its 64 samples at the clip
        # boundary), which a step on parameters shared with the other 31 minibatches of the epoch cannot reach:
        # the gap stays at ~0.1-0.16 through all 10 epochs, so at c = 4 the steps (0.4-5) overshot the clip
        # region (clip fraction up to 0.69, KL 0.03-0.16 per iteration where PPO's Adam stays near 0.01), and
        # without the entropy term the policy repeatedly reached 500 and collapsed: 114.8. Entropy 0.01 and
        # c = 4: 283.6; c = 16: 444.0; c = 32: 460.8 reached at 84k steps (KL ~0.005-0.015, PPO-like).
        # eta_max = 10 was rarely hit (steps of 0.2-6 observed at c = 4).
        self.polyak_c = 32.0
        self.polyak_max_lr = 10.0
        self.entropy_coeff = 0.01  # P234's entropy regulariser against exploding steps
        # The bounded Polyak step is the step-length control; PPO's 0.5 global-norm clip would only shorten it.
        self.grad_clip = None

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        if self.step_size_rule != "polyak":
            self._value_error("ppo_polyak is PPO with the Polyak step: step_size_rule must be 'polyak' (use ppo)")
        if self.model_config.get("vf_share_layers"):
            self._value_error("ppo_polyak steps policy and critic separately: vf_share_layers=False")

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return PPOPolyakLearner


class PPOPolyak(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> PPOPolyakConfig:
        return PPOPolyakConfig()


class PPOPolyakLearner(PPORuleLearner):
    """Policy: SGD with the Polyak step on the PPO policy loss. Critic: Adam at `lr`."""

    @override(PPORuleLearner)
    def configure_optimizers_for_module(self, module_id: str, config=None) -> None:
        module = self._module[module_id]
        policy = [p for n, p in module.named_parameters() if not _is_value_param(n)]
        value = [p for n, p in module.named_parameters() if _is_value_param(n)]
        if not policy or not value:
            raise ValueError("ppo_polyak needs separate policy and value parameters (vf.*, encoder.critic_encoder.*)")
        self.register_optimizer(module_id=module_id, optimizer_name=POLICY_OPTIMIZER,
                                optimizer=torch.optim.SGD(policy, lr=config.polyak_max_lr), params=policy,
                                lr_or_lr_schedule=config.polyak_max_lr)
        self.register_optimizer(module_id=module_id, optimizer_name=VALUE_OPTIMIZER,
                                optimizer=torch.optim.Adam(value), params=value, lr_or_lr_schedule=config.lr)

    def polyak_optimizer_names(self, module_id: str) -> list[str]:
        return [POLICY_OPTIMIZER]

    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: PPOPolyakConfig, batch: dict[str, Any], fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        module = self.module[module_id].unwrapped()
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        with torch.no_grad():
            dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
            ratio = torch.exp(dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP])
            gap = ppo_polyak_gap(
                ratio, batch[Postprocessing.ADVANTAGES], config.clip_param,
                entropy=dist.entropy() if entropy_coeff else None,
                max_entropy=_max_entropy(module.action_space) if entropy_coeff else 0.0,
                entropy_coeff=entropy_coeff, mask=batch.get(Columns.LOSS_MASK),
            )
        self.set_polyak_gap(module_id, gap, POLICY_OPTIMIZER)
        return total


def _max_entropy(action_space: gym.Space | None) -> float:
    """log n for n discrete actions: the entropy term's optimum. Continuous entropies have none."""
    if isinstance(action_space, gym.spaces.Discrete):
        return math.log(action_space.n)
    raise ValueError("ppo_polyak's entropy term needs a discrete action space (a Gaussian's entropy is unbounded); "
                     "set entropy_coeff=0")


RULE = Rule(
    name="ppo_polyak",
    family="optimizer",
    paper_ids=("P234", "P243", "P232"),
    summary="PPO whose policy takes the bounded stochastic Polyak step (f - f*)/(c||g||^2) with the clipped "
            "surrogate's known optimum as f*; selectable P243/P232 gradient clipping",
    config_class=PPOPolyakConfig,
    # step_size_rule is fixed to polyak and the rule supplies f - f* itself, so those two options are not offered.
    options=tuple(o for o in PPO_OPTIONS if o.name not in ("entropy_coeff", "step_size_rule", "polyak_f_star")) + (
        Option("entropy_coeff", "entropy-bonus coefficient c_H (discrete actions only)", non_negative, ">= 0"),
    ),
    learning_check=LearningCheck("CartPole-v1", 100_000, 450.0,
                                 "as PPO (CleanRL/SB3 reach ~500 on CartPole-v1 within 100k steps); P234 claims "
                                 "faster convergence than a hand-set step size (not reproduced here: the ppo rule "
                                 "reaches 450 at 66k steps, this rule at 84k, seed 0)"),
)
