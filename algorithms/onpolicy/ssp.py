"""P184 Time-Efficient Reinforcement Learning with Stochastic Stateful Policies (Al-Hafez, Zhao, Peters, Tateo,
ICLR 2024): a stateful policy trained with the stateful policy gradient instead of BPTT, in its PPO form.

The policy carries an internal state z and factorises into a stateless action policy and a stochastic internal-state
kernel, both conditioned on the current observation o_t and state z_t:

    pi_theta(a_t, z_{t+1} | o_t, z_t) = pi_a(a_t | o_t, z_t) * pi_z(z_{t+1} | o_t, z_t),     z_0 = 0

The stateful policy gradient treats z_{t+1} as part of the action and (o_t, z_t) as the state:

    grad J = E[ sum_t grad log pi_theta(a_t, z_{t+1} | o_t, z_t) A(o_t, z_t, a_t, z_{t+1}) ]
           = E[ sum_t ( grad log pi_a(a_t | o_t, z_t) + grad log pi_z(z_{t+1} | o_t, z_t) ) A_t ]

so each step's gradient needs one forward pass on (o_t, z_t): nothing is back-propagated through time. Its PPO
instance (the paper builds stateful PPO this way) clips the joint ratio

    r_t = pi_a(a_t|o_t,z_t) pi_z(z_{t+1}|o_t,z_t) / (pi_a_old(a_t|o_t,z_t) pi_z_old(z_{t+1}|o_t,z_t))
    loss = -E[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)] + c1 E[(V(o_t, z_t) - V_t^targ)^2]

with GAE advantages from a critic V(o_t, z_t) of the extended state (P147/P158 otherwise unchanged).

Data layout: the rule wraps the configured env in `envs.stateful_policy.StatefulPolicyEnv`, the extended MDP
(observation (o_t, z_t), action (a_t, z_{t+1})); the EnvRunner samples z_{t+1} with a_t from the module's joint
distribution, and the wrapper feeds it back as the next z. The internal state lives with the episode, so the
learner sees each (o_t, z_t, a_t, z_{t+1}) as one independent row.

Choices the paper leaves open, and what this module does:
- the kernel pi_z is a diagonal Gaussian whose mean and log-std are outputs of the policy network (the same
  64-64 tanh MLP as pi_a, on (o_t, z_t)); z has `state_dim` = 4 dims, bounded to [-1, 1] (RLlib's action
  normalisation range; a sample outside is clipped by the wrapper);
- the kernel's initial spread: the log-std outputs of z start at log(`state_init_std`) = log(0.2) (their output
  weights zeroed, their biases set), so z begins as a nearly deterministic function of (o_t, z_t) rather than
  noise filling the whole [-1, 1] range (RLlib's default would start every std at 1);
- the critic takes (o_t, z_t) (no privileged state);
- PPO's hyper-parameters are the ppo rule's (P147's MuJoCo settings).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import tree
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical, TorchMultiDistribution
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from torch import nn

import envs.masked_cartpole  # noqa: F401  (registers CartPoleNoVel-v0 wherever this config is unpickled)
import envs.stateful_policy
from algorithms.common.env_wrapping import WrappedEnvConfigMixin
from algorithms.common.losses import masked_mean
from algorithms.onpolicy.ppo import PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.options import Option
from algorithms.rule import LearningCheck, Rule


def stateful_log_probs(dist, actions: Any, state_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_a(a_t | o_t, z_t), log pi_z(z_{t+1} | o_t, z_t)) of an extended action under the joint distribution.

    `dist` is RLlib's distribution over the extended action: a Tuple (base, z) distribution for a Discrete base, or
    one diagonal Gaussian over [base action dims, z dims] for a Box base (the z dims are the last `state_dim`).
    """
    if isinstance(dist, TorchMultiDistribution):
        base_dist, state_dist = dist._flat_child_distributions
        base_action, next_state = tree.flatten(actions)
        if isinstance(base_dist, TorchCategorical) and base_action.dim() > 1:
            base_action = base_action.squeeze(-1)
        return base_dist.logp(base_action), state_dist.logp(next_state)
    per_dim = dist._dist.log_prob(actions)  # a diagonal Gaussian: one log-density per action dim
    return per_dim[..., :-state_dim].sum(-1), per_dim[..., -state_dim:].sum(-1)


class SSPModule(DefaultPPOTorchRLModule):
    """RLlib's default PPO module on the extended MDP, with the internal-state kernel's std initialised.

    Whether the base action is Discrete (Tuple inputs [logits, z means, z log-stds]) or a Box (inputs [means of
    base and z dims, log-stds of base and z dims]), the last `state_dim` outputs of the policy head are z's log-stds.
    """

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        state_dim = int(self.model_config["ssp_state_dim"])
        init_std = float(self.model_config["ssp_state_init_std"])
        last = [m for m in self.pi.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight[-state_dim:].zero_()
            last.bias[-state_dim:].fill_(math.log(init_std))


class SSPConfig(WrappedEnvConfigMixin, PPORuleConfig):
    """Stateful PPO's options: PPO's plus the internal state's size."""

    WRAPPER_ENV_ID = envs.stateful_policy.ENV_ID

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SSP)
        self.state_dim = 4
        self.state_init_std = 0.2

    def wrapper_env_config(self) -> dict[str, Any]:
        return {"state_dim": self.state_dim}

    @override(PPORuleConfig)
    def training(self, *, state_dim: int = NotProvided, state_init_std: float = NotProvided,
                 **kwargs) -> "SSPConfig":
        super().training(**kwargs)
        if state_dim is not NotProvided:
            self.state_dim = state_dim
        if state_init_std is not NotProvided:
            self.state_init_std = state_init_std
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"ssp_state_dim": self.state_dim,
                                                       "ssp_state_init_std": self.state_init_std}

    @override(PPORuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=SSPModule)

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        if not isinstance(self.state_dim, int) or self.state_dim < 1:
            self._value_error(f"state_dim must be an integer >= 1, got {self.state_dim}")
        if not self.state_init_std > 0:
            self._value_error(f"state_init_std must be > 0, got {self.state_init_std}")

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return SSPLearner


class SSP(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> SSPConfig:
        return SSPConfig()


class SSPLearner(PPORuleLearner):
    """PPO's clipped loss on the joint log-likelihood log pi_a + log pi_z (the stateful policy gradient).

    PPORuleLearner already takes `dist.logp(actions)` of the extended action, which is that sum; this learner
    also reports the two parts (how much of the update is the internal-state kernel).
    """

    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: SSPConfig, batch: dict[str, Any], fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        if self.log_minibatch_metrics:
            module = self.module[module_id].unwrapped()
            mask = batch.get(Columns.LOSS_MASK)
            with torch.no_grad():
                dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
                logp_action, logp_state = stateful_log_probs(dist, batch[Columns.ACTIONS], config.state_dim)
                self.metrics.log_dict(
                    {"action_logp": masked_mean(logp_action, mask), "state_kernel_logp": masked_mean(logp_state, mask)},
                    key=module_id,
                    window=1,
                )
        return total


SSP_OPTIONS = PPO_OPTIONS + (
    Option("state_dim", "size of the policy's internal state z", lambda x: isinstance(x, int) and x >= 1,
           "an integer >= 1"),
    Option("state_init_std", "initial std of the internal-state kernel pi_z", lambda x: x > 0, "> 0"),
)

RULE = Rule(
    name="ssp",
    family="on-policy",
    paper_ids=("P184",),
    summary="stateful policy pi_a(a|o,z) pi_z(z'|o,z); z' is part of the action, PPO on the joint ratio, no BPTT",
    config_class=SSPConfig,
    options=SSP_OPTIONS,
    learning_check=LearningCheck(
        envs.masked_cartpole.ENV_ID, 500_000, 300.0,
        "CartPole-v1 with velocities masked (max 500). Measured memoryless baseline: the ppo rule (same PPO "
        "settings, no internal state) peaks at 61 (mean return over the last episodes) within 400k steps and ends "
        "near 48; P184 claims stateful policies trained with the stateful PG solve such POMDPs without BPTT. "
        "300 = 5x the memoryless peak"),
)
