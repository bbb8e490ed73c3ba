"""P069 Multi-level Actor-Critic (MAC) for average-reward RL without mixing-time knowledge.

(Patel, Suttle, Koppel, Aggarwal, Sadler, Bedi, Manocha 2024, "Towards Global Optimality for Practical
Average Reward RL without Mixing Time Oracles"; the MAC algorithm of Suttle et al. 2023.)

Average-reward actor-critic on one continuing trajectory. Iteration k:

    J_k ~ Geom(1/2);  roll the current policy pi_theta on for T_k = 2^J_k steps (T_k = 1 if 2^J_k > T_max),
                      continuing from where the previous rollout stopped
    delta_t  = r_t - eta_k + V_omega(s_t+1) - V_omega(s_t)                      (average-reward TD error)
    f_t      = r_t - eta_k                                                      (average-reward tracking)
    h_t      = delta_t grad_omega V_omega(s_t)                                  (TD(0) semi-gradient)
    g_t      = delta_t grad_theta log pi_theta(a_t|s_t)                        (policy gradient)
    X^MLMC   = X^0 + 2^J_k (X^J_k - X^(J_k - 1))  if 2^J_k <= T_max, else X^0  (X^j: mean of the first 2^j X_t)
    eta_k+1   = eta_k   + gamma_k f^MLMC
    omega_k+1 = omega_k + beta_k  h^MLMC
    theta_k+1 = theta_k + alpha_k g^MLMC,   alpha_k = alpha' / sqrt(b_0^2 + sum_{i <= k} ||g_i^MLMC||^2)  (AdaGrad-Norm)

The MLMC estimate is linear in the samples (`algorithms/common/mlmc.py`): X^MLMC = sum_t w_t X_t, so each
update is one step of SGD on a w-weighted sum of per-step surrogate losses (`mac_losses`), whose gradients are
exactly -f^MLMC, -h^MLMC and -g^MLMC.

The actor's AdaGrad-Norm step (`algorithms/common/adagrad_norm.py`) is MAC's modified AdaGrad step size: it
shrinks after large MLMC estimates (their variance grows with 2^J), where a constant step occasionally threw
the policy into a deterministic, zero-gradient corner (measured on the check's task: constant alpha = 0.01
reached 88 and 83 per 1000 steps in two runs, then collapsed to ~0; AdaGrad-Norm with alpha' = 2, b_0 = 200,
i.e. the same first step, rose steadily to 115 by 270k steps; with b_0 ~ 0 its first unit-length steps made
the policy deterministic at once). Choices the paper leaves open or that we fix: alpha' = `mac_actor_lr`,
b_0 = `mac_actor_b0`; constant SGD steps for the critic and eta (`mac_critic_lr` = 0.1, `mac_eta_lr` = 0.01);
T_max = 2^7 = 128; MLP actor and critic
(the model's hidden sizes); when 2^J > T_max only the one step g^0 needs is collected; the rollout may cross a
reporting-window reset of the env (its transitions are used as they are: the reset is one more jump of the
chain). One chain: one EnvRunner with one env (or the local EnvRunner), since MLMC needs a single Markov
trajectory. The learning check's task is `ContinuingGridworld-v0` (envs/continuing_gridworld.py), the
paper's sparse-reward 2-D goal-reaching navigation as a continuing task.
"""

from __future__ import annotations


import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)
from torch import nn

import envs.continuing_gridworld  # noqa: F401  (registers ContinuingGridworld-v0 wherever the config is unpickled)
from algorithms.common.adagrad_norm import AdaGradNorm
from algorithms.common.config_fields import check_not_recurrent, set_provided
from algorithms.common.mlmc import mlmc_weights, rollout_length, sample_level
from algorithms.common.sampling import call_learners, episode_arrays, sample_env_steps
from algorithms.onpolicy.base import OnPolicyAlgorithm, OnPolicyConfig, OnPolicyLearner
from algorithms.options import ONPOLICY_OPTIONS, Option, positive
from algorithms.rule import LearningCheck, Rule

ACTOR, CRITIC_OPT, ETA = "actor", "critic", "average_reward"


def mac_losses(
    logp: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    rewards: torch.Tensor,
    eta: torch.Tensor,
    weights: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Surrogate losses whose gradients are minus MAC's MLMC estimates (rows = the rollout's steps, in order).

    actor:  -sum_t w_t delta_t log pi(a_t|s_t)            (delta_t held constant)
    critic:  sum_t w_t (r_t - eta + V(s_t+1) - V(s_t))^2 / 2  (eta and V(s_t+1) held constant: semi-gradient)
    eta:     sum_t w_t (r_t - eta)^2 / 2
    """
    delta = rewards - eta.detach() + next_values.detach() - values
    return {
        "policy_loss": -(weights * delta.detach() * logp).sum(),
        "vf_loss": (weights * 0.5 * delta.pow(2)).sum(),
        "eta_loss": (weights * 0.5 * (rewards - eta).pow(2)).sum(),
        "td_error": (weights * delta.detach()).sum(),  # delta^MLMC, for logging
    }


class MACModule(DefaultPPOTorchRLModule):
    """PPO's actor-critic networks plus the average-reward estimate eta (a learner-only parameter)."""

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        self.average_reward = nn.Parameter(torch.zeros(()))

    @override(DefaultPPOTorchRLModule)
    def get_non_inference_attributes(self) -> list[str]:
        return super().get_non_inference_attributes() + ["average_reward"]


class MACConfig(OnPolicyConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or MAC)
        self.mac_t_max = 128
        self.mac_actor_lr = 2.0  # alpha'
        self.mac_actor_b0 = 200.0  # b_0: the first actor steps are alpha' / b_0 = 0.01 long
        self.mac_critic_lr = 0.1
        self.mac_eta_lr = 0.01
        # Episodes are 1000-step reporting windows of one continuing chain: RLlib's default mean over the last 100
        # episodes would average over 100k steps (and the training loop averages those again over 100 episodes).
        # Each iteration's figure covers the last 10 windows (10k steps) instead.
        self.metrics_num_episodes_for_smoothing = 10
        self.train_batch_size_per_learner = 2000  # env steps per reported iteration (many MAC updates)
        self.grad_clip = None
        self._model_config = {"fcnet_hiddens": [64], "fcnet_activation": "tanh", "vf_share_layers": False}

    @override(OnPolicyConfig)
    def training(self, *, mac_t_max: int = NotProvided, mac_actor_lr: float = NotProvided,
                 mac_actor_b0: float = NotProvided, mac_critic_lr: float = NotProvided, mac_eta_lr: float = NotProvided,
                 **kwargs) -> "MACConfig":
        super().training(**kwargs)
        set_provided(self, mac_t_max=mac_t_max, mac_actor_lr=mac_actor_lr, mac_actor_b0=mac_actor_b0,
                     mac_critic_lr=mac_critic_lr, mac_eta_lr=mac_eta_lr)
        return self

    @override(OnPolicyConfig)
    def validate(self) -> None:
        super().validate()
        if not isinstance(self.mac_t_max, int) or self.mac_t_max < 2:
            self._value_error(f"mac_t_max must be an integer >= 2, got {self.mac_t_max!r}")
        for name in ("mac_actor_lr", "mac_actor_b0", "mac_critic_lr", "mac_eta_lr"):
            if getattr(self, name) <= 0:
                self._value_error(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_env_runners > 1 or self.num_envs_per_env_runner != 1:
            self._value_error("MAC follows one Markov chain: num_env_runners <= 1 and num_envs_per_env_runner = 1")
        check_not_recurrent(self, "mac")

    @override(OnPolicyConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=MACModule)

    @override(OnPolicyConfig)
    def get_default_learner_class(self):
        return MACLearner


class MACLearner(OnPolicyLearner):
    """Three optimizers (actor: AdaGrad-Norm; critic, eta: SGD) and `mac_update`, one MAC iteration."""

    @override(OnPolicyLearner)
    def configure_optimizers_for_module(self, module_id: str, config: MACConfig = None) -> None:
        module = self._module[module_id].unwrapped()
        critic_ids = {id(p) for name, p in module.named_parameters() if name.startswith(("vf.", "encoder.critic_encoder."))}
        groups = {
            ACTOR: [p for name, p in module.named_parameters() if id(p) not in critic_ids and name != "average_reward"],
            CRITIC_OPT: [p for p in module.parameters() if id(p) in critic_ids],
            ETA: [module.average_reward],
        }
        optimizers = {
            ACTOR: (AdaGradNorm(groups[ACTOR], lr=config.mac_actor_lr, initial_accumulator=config.mac_actor_b0**2),
                    config.mac_actor_lr),
            CRITIC_OPT: (torch.optim.SGD(groups[CRITIC_OPT], lr=config.mac_critic_lr), config.mac_critic_lr),
            ETA: (torch.optim.SGD(groups[ETA], lr=config.mac_eta_lr), config.mac_eta_lr),
        }
        for name, params in groups.items():
            if not params:
                raise ValueError(f"mac found no {name} parameters (it needs vf_share_layers=False)")
            optimizer, lr = optimizers[name]
            self.register_optimizer(module_id=module_id, optimizer_name=name, optimizer=optimizer, params=params,
                                    lr_or_lr_schedule=lr)

    def mac_update(self, rollout: dict[str, np.ndarray], weights: np.ndarray,
                   module_id: str = DEFAULT_MODULE_ID) -> dict[str, float]:
        module = self.module[module_id].unwrapped()
        to = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=self._device)  # noqa: E731
        obs, next_obs = to(rollout["obs"]), to(rollout["next_obs"])
        both = module.compute_values({Columns.OBS: torch.cat([obs, next_obs])})
        values, next_values = both[: len(obs)], both[len(obs):]
        next_values = next_values * (1.0 - to(rollout["terminateds"]))
        logits = module.pi(module.encoder.actor_encoder({Columns.OBS: obs})["encoder_out"])
        dist = module.get_train_action_dist_cls().from_logits(logits)
        terms = mac_losses(dist.logp(to(rollout["actions"], torch.long)), values, next_values, to(rollout["rewards"]),
                           module.average_reward, to(weights))
        optimizers = [self.get_optimizer(module_id, name) for name in (ACTOR, CRITIC_OPT, ETA)]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        (terms["policy_loss"] + terms["vf_loss"] + terms["eta_loss"]).backward()  # disjoint parameter sets
        for optimizer in optimizers:
            optimizer.step()
        return {key: float(value.detach()) for key, value in terms.items()} | {
            "average_reward": float(module.average_reward.detach()), "entropy": float(dist.entropy().mean().detach())}


class MAC(OnPolicyAlgorithm):
    """Each training step runs MAC iterations (rollout of 2^J steps -> update -> weight sync) for a batch of steps."""

    @classmethod
    @override(OnPolicyAlgorithm)
    def get_default_config(cls) -> MACConfig:
        return MACConfig()

    @override(OnPolicyAlgorithm)
    def setup(self, config) -> None:
        super().setup(config)
        self._levels = np.random.default_rng(self.config.seed)

    @override(OnPolicyAlgorithm)
    def training_step(self) -> None:
        config: MACConfig = self.config
        sampled, runner_metrics, stats = 0, [], []
        while sampled < config.total_train_batch_size:
            level = sample_level(self._levels)
            length = rollout_length(level, config.mac_t_max)
            with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
                episodes, metrics = sample_env_steps(self, length)
            runner_metrics += metrics
            rollout = {key: value[:length] for key, value in episode_arrays(episodes).items()}
            sampled += sum(len(e) for e in episodes)
            weights = mlmc_weights(level, config.mac_t_max)[: len(rollout["obs"])]
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
                stats += call_learners(self.learner_group, lambda learner: learner.mac_update(rollout, weights))
            with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
                self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        for key in stats[-1]:
            # The last update's terms (window=1, like the other rules' loss snapshots) and eta's trajectory.
            self.metrics.log_value((LEARNER_RESULTS, DEFAULT_MODULE_ID, key), stats[-1][key], window=1)
        self.metrics.log_value((LEARNER_RESULTS, DEFAULT_MODULE_ID, "mac_updates"), len(stats), window=1)


MAC_OPTIONS = ONPOLICY_OPTIONS + (
    Option("mac_t_max", "T_max: longest MLMC rollout (2^J beyond it falls back to one step)", lambda x: x >= 2, ">= 2"),
    Option("mac_actor_lr", "alpha': actor AdaGrad-Norm step size", positive, "> 0"),
    Option("mac_actor_b0", "b_0: AdaGrad-Norm's initial accumulator root (first step = alpha' / b_0)", positive, "> 0"),
    Option("mac_critic_lr", "beta: critic SGD step size", positive, "> 0"),
    Option("mac_eta_lr", "gamma: average-reward SGD step size", positive, "> 0"),
)

RULE = Rule(
    name="mac",
    family="on-policy",
    paper_ids=("P069",),
    summary="average-reward actor-critic with multi-level Monte Carlo (Geom(1/2) rollout length) gradient estimates",
    config_class=MACConfig,
    options=MAC_OPTIONS,
    learning_check=LearningCheck(
        "ContinuingGridworld-v0", 400_000, 100.0,
        "80% of the optimal average reward of the task (0.1261 per step = 126 per 1000-step window, exact relative "
        "value iteration on the env's model; a uniform random policy gets 3.4); P069 reports MAC learning this "
        "sparse-reward goal-reaching gridworld"),
    smoke_overrides={},
)
