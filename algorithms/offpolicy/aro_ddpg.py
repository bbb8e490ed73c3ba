"""ARO-DDPG: P211, Saxena, Jain & Bhatnagar 2023, "Off-Policy Average Reward Actor-Critic with Deterministic Policy
Search" (ICML), Algorithm 1, trained from the Redis replay of `base.py` (EnvRunners insert transitions, the learner
samples minibatches from the table: the data path of every off-policy rule).

The criterion is the average reward (gain) rho(mu) = lim_T 1/T E[sum_t r_t]; the critic learns the differential
action value, the gain is a learned scalar trained by the same TD loss (the authors' code: rho a parameter with its
own Adam, gradient of the critic loss), and the actor follows the off-policy average-reward deterministic policy
gradient grad J = E_{s ~ d^behaviour}[grad_a Q(s, a)|_{a = mu(s)} grad_theta mu(s)] (their Theorem 2). On replayed
(s, a, r, s', d):

    delta_i = r - rho + (1 - d) min_{j=1,2} Q_target_j(s', mu_target(s')) - Q_i(s, a)       (differential TD error)
    J_Q,rho = 1/2 sum_{i=1,2} mean_B delta_i^2            (minimised in the critics' parameters AND in rho)
    J_mu    = -mean_B min_{i=1,2} Q_i(s, mu(s))           (every `policy_delay`-th gradient step, actor only)
    targets <- tau theta + (1 - tau) targets              (on the actor's steps: actor and both critics)

No discount: `gamma` is not an option of this rule. Choices the paper leaves open, ours: the authors' code settings
where they exist (twin critics with the min in target and actor loss, actor and targets every second critic step,
tau 0.005, no target-policy smoothing, rho initialised at 0 and trained by Adam on the critic loss, `d` = true
termination stops the bootstrap); for the 20k-step Pendulum check the step sizes, 400-300 ReLU nets, replay ratio
(one gradient step on 128 transitions every second env step) and 1k uniform-random warm-up steps of the repo's
DDPG/TD3 rules; exploration N(0, 0.1) on the normalised action instead of their Ornstein-Uhlenbeck noise
(sigma 0.2); Adam 1e-3 also for rho (their 3e-4 is for 1M-step runs). Pendulum-v1 is a continuing task here: it
never terminates, the 200-step time limit only truncates (the stored s' is real, the bootstrap is kept), so an
episode's return is 200 x the average reward over that window.
"""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from torch import nn

from algorithms.common.average_reward import differential_td_error
from algorithms.common.config_fields import set_provided
from algorithms.offpolicy.deterministic import (
    DeterministicACAlgorithm,
    DeterministicACConfig,
    DeterministicActorCriticLearner,
    DeterministicActorCriticModule,
)
from algorithms.offpolicy.td3 import DETERMINISTIC_AC_OPTIONS
from algorithms.options import Option, positive
from algorithms.rule import LearningCheck, Rule

RHO_OPTIMIZER = "rho"


def aro_ddpg_losses(q1: torch.Tensor, q2: torch.Tensor, rho: torch.Tensor, rewards: torch.Tensor,
                    terminateds: torch.Tensor, next_q1: torch.Tensor, next_q2: torch.Tensor,
                    q_of_policy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """P211's critic/gain loss and actor loss. `next_q*`: target critics at (s', mu_target(s')); `q_of_policy`:
    min_i Q_i(s, mu(s)) (None on a delayed step: no actor loss)."""
    next_values = torch.minimum(next_q1, next_q2)
    delta1 = differential_td_error(q1, rewards, rho, terminateds, next_values)
    delta2 = differential_td_error(q2, rewards, rho, terminateds, next_values)
    out = {"critic": 0.5 * ((delta1**2).mean() + (delta2**2).mean()), "td_error": delta1.detach()}
    if q_of_policy is not None:
        out["actor"] = -q_of_policy.mean()
    return out


class AroDDPGModule(DeterministicActorCriticModule):
    """The deterministic actor and twin critics, plus the learned gain rho (learner side only)."""

    def setup(self) -> None:
        super().setup()
        if not self.inference_only:
            self.rho = nn.Parameter(torch.zeros(()))

    @override(DeterministicActorCriticModule)
    def get_non_inference_attributes(self) -> list[str]:
        return super().get_non_inference_attributes() + ["rho"]


class AroDDPGLearner(DeterministicActorCriticLearner):
    @override(DeterministicActorCriticLearner)
    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        super().configure_optimizers_for_module(module_id, config)
        rho = [self.module[module_id].unwrapped().rho]
        self.register_optimizer(module_id=module_id, optimizer_name=RHO_OPTIMIZER,
                                optimizer=torch.optim.Adam(rho), params=rho, lr_or_lr_schedule=config.rho_lr)

    @override(DeterministicActorCriticLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        obs, actions, next_obs = batch[Columns.OBS], batch[Columns.ACTIONS], batch[Columns.NEXT_OBS]
        with torch.no_grad():
            next_actions = module.forward_target({Columns.OBS: next_obs})[Columns.ACTIONS]
            next_q1 = module.q(module.target_qf, next_obs, next_actions)
            next_q2 = module.q(module.target_qf_twin, next_obs, next_actions)
        q1, q2 = module.q(module.qf, obs, actions), module.q(module.qf_twin, obs, actions)
        q_of_policy = None
        if self._policy_step():
            mu = module.pi(obs.flatten(1))
            q_of_policy = torch.minimum(module.q(module.qf, obs, mu), module.q(module.qf_twin, obs, mu))
        losses = aro_ddpg_losses(q1, q2, module.rho, batch[Columns.REWARDS], batch[Columns.TERMINATEDS],
                                 next_q1, next_q2, q_of_policy)
        # DeterministicActorCriticLearner.compute_gradients: critic loss backward (reaches the critics and rho),
        # actor loss differentiated w.r.t. the actor's parameters only.
        self._pending = (module_id, losses)
        logged = {VF_LOSS_KEY: losses["critic"], "qf_mean": q1.mean().detach(), "rho": module.rho.detach(),
                  "td_error_mean": losses["td_error"].abs().mean()}
        if "actor" in losses:
            logged[POLICY_LOSS_KEY] = losses["actor"]
        self.metrics.log_dict(logged, key=module_id, window=1)
        return losses["critic"] + losses.get("actor", 0.0)


class AroDDPGConfig(DeterministicACConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or AroDDPG)
        self.gamma = 1.0  # unused: the differential target has no discount
        self.twin_q = True
        self.policy_delay = 2
        self.target_noise = 0.0
        self.rho_lr = 1e-3

    def training(self, *, rho_lr: float = NotProvided, **kwargs) -> "AroDDPGConfig":
        super().training(**kwargs)
        set_provided(self, rho_lr=rho_lr)
        return self

    def validate(self) -> None:
        super().validate()
        if not self.rho_lr > 0:
            self._value_error(f"rho_lr must be > 0, got {self.rho_lr}")
        if not self.twin_q or self.target_noise != 0:
            self._value_error("aro_ddpg has twin critics and no target-policy smoothing (twin_q True, "
                              "target_noise 0)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=AroDDPGModule, model_config=self.model_config)

    def get_default_learner_class(self):
        return AroDDPGLearner


class AroDDPG(DeterministicACAlgorithm):
    @classmethod
    def get_default_config(cls) -> AroDDPGConfig:
        return AroDDPGConfig()


RULE = Rule(
    name="aro_ddpg",
    family="off-policy",
    paper_ids=("P211",),
    summary="ARO-DDPG: average-reward deterministic actor-critic, differential TD target r - rho + Q(s', mu(s')), "
            "learned gain rho, Redis replay",
    config_class=AroDDPGConfig,
    options=tuple(o for o in DETERMINISTIC_AC_OPTIONS if o.name != "gamma") + (
        Option("rho_lr", "Adam step size of the average-reward estimate rho", positive, "> 0"),
        Option("policy_delay", "critic steps per actor and target step", positive, ">= 1"),
    ),
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-250.0,
        source="Pendulum-v1 as a continuing task (P211 evaluates average reward on continuing tasks): threshold "
               "-250 per 200-step window = average reward -1.25 per step, the RL-Baselines3-Zoo DDPG/TD3 Pendulum "
               "benchmark level (mean about -150 at 2e4 steps) with the repo's ddpg/td3 margin; budget 4e4 because "
               "the check averages the last 100 windows (2e4 steps), which must all come after learning",
    ),
    smoke_overrides={"learning_starts": 64, "random_warmup_steps": 32, "rollout_fragment_length": 128,
                     "samples_per_insert": 2.0, "train_batch_size": 64},
)
