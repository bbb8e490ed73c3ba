"""P206 Winner Takes It All: Training Performant RL Populations for Combinatorial Optimization (Grinsztajn et
al., NeurIPS 2023): Poppy.

A population of K policies pi_1..pi_K (one shared encoder, K heads) attempts every instance rho; the
population's value on rho is max_k R(tau_k). Poppy's objective is J_pop = E_rho[ max_k E_{tau_k ~ pi_k} R(tau_k) ],
and its gradient estimate trains only the member that wins each instance, with the runner-up as baseline:

    k*  = argmax_k R(tau_k),   k** = the second best member on the same instance
    grad J_pop ~ (1/N) sum_{rho=1}^{N} ( R(tau_{k*}) - R(tau_{k**}) ) grad log pi_{k*}(tau_{k*})       (Poppy)
    loss       = -(1/N) sum_rho ( R(tau_{k*}) - R(tau_{k**}) ) sum_t log pi_{k*}(a_t^{k*} | s_t^{k*})

(the paper's Algorithm 1 / Theorem 1, and the official code's `poppy` loss: advantage = max return - second max
return, log-probability of the max-return trajectory, mean over instances). The advantage is never negative: the
winner is pushed towards its winning trajectory by its margin over the rest, and no other member is touched,
which is what lets members specialise on subsets of instances.

Data layout: the rule wraps the configured env id in `envs.population.PopulationEnv`: one EnvRunner episode is
one instance attempted by all K members side by side (observation = the K members' observations, action = one
action per member), and the episode return the EnvRunner reports is the population's value max_k R(tau_k).
The members' returns and which members acted at each step come from the episode infos; the learner connector
`PoppyColumns` turns them into per-row columns (member returns, member-acted flags, 1/N).

The paper trains in two phases (the official code: a POMO checkpoint whose decoder is cloned across the
population, then the `poppy` loss); both are here:
1. `pretrain_steps` env steps of a single policy: all K members share head 0 ("tied"), each instance is attempted K
   times, and the shared baseline is the mean return of the K attempts (the official `pomo` loss with the K
   attempts in place of POMO's start nodes):
       loss_1 = -(1/(N K)) sum_rho sum_k ( R(tau_k) - mean_j R(tau_j) ) log pi_0(tau_k);
2. head 0 is cloned into all K heads and the population is trained with the Poppy loss above.
The default is `pretrain_steps` = 0 (clone the initial head 0 and train the population from the start): on the
knapsack check, phase 1 with this episode-level estimator at lr 1e-3 collapses to a near-deterministic policy
(measured: single-policy best-of-4 value falls from 3.0 to 2.85 while its entropy goes 0.65 -> 0.1), and the
population trained from scratch does not. Setting `pretrain_steps` >= the budget trains the single policy only
(K samples per instance, mean baseline): the same-estimator single-policy baseline of the learning check.

Choices the paper leaves open or sets for scale, and what this module does:
- one instance = one start (the paper also samples several start nodes per instance on TSP/CVRP, POMO style;
  the knapsack task has a single start);
- no critic (the runner-up is the baseline), so `vf_loss` is reported as 0;
- one full-batch Adam step per batch of N instances, as the official code's SGD step; no entropy bonus;
- the shared encoder and heads are MLPs over each member's own observation (64-64 tanh by default; the paper's
  attention encoder/decoders are for 50-100-node problems);
- ties for the best return: the advantage R(k*) - R(k**) is 0, so which tied member is "the winner" is moot.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian, TorchMultiCategorical
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from torch import nn

import envs.knapsack  # noqa: F401  (registers Knapsack10-v0 wherever this config is unpickled)
import envs.population
from algorithms.common.env_wrapping import WrappedEnvConfigMixin
from algorithms.common.losses import masked_mean
from algorithms.onpolicy.base import OnPolicyAlgorithm, OnPolicyConfig, OnPolicyLearner
from algorithms.options import ONPOLICY_OPTIONS, Option
from algorithms.rule import LearningCheck, Rule

POPPY_MEMBER_RETURNS = "poppy_member_returns"  # [rows, K]: each member's return on the row's instance
POPPY_MEMBER_ACTED = "poppy_member_acted"  # [rows, K]: 1 where the member took a real step in this row
POPPY_INSTANCE_WEIGHT = "poppy_instance_weight"  # [rows]: 1 / N, N = instances in the train batch


def poppy_loss(
    member_logp: torch.Tensor,
    member_returns: torch.Tensor,
    member_acted: torch.Tensor,
    instance_weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """-(1/N) sum_rows (R* - R**) log pi_{k*}(a_t | s_t) over the rows where k* acted; tensors are [rows, K].

    Summing the rows of one instance gives (R* - R**) log pi_{k*}(tau_{k*}); `instance_weight` = 1/N averages
    over the N instances of the batch.
    """
    top2 = torch.topk(member_returns, 2, dim=-1)
    winner = top2.indices[:, :1]
    margin = top2.values[:, 0] - top2.values[:, 1]
    winner_logp = member_logp.gather(-1, winner).squeeze(-1)
    winner_acted = member_acted.gather(-1, winner).squeeze(-1)
    weights = instance_weight * margin * winner_acted
    return {"policy_loss": -(weights * winner_logp).sum(), "winner_margin": margin.detach()}


def shared_baseline_loss(
    member_logp: torch.Tensor,
    member_returns: torch.Tensor,
    member_acted: torch.Tensor,
    instance_weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Phase 1: -(1/(N K)) sum_rows sum_k (R_k - mean_j R_j) log pi(a_t^k | s_t^k) over the rows where k acted."""
    k = member_returns.shape[-1]
    advantages = member_returns - member_returns.mean(-1, keepdim=True)
    weights = instance_weight.unsqueeze(-1) * advantages * member_acted / k
    return {"policy_loss": -(weights * member_logp).sum()}


class PopulationModule(TorchRLModule):
    """K policies: a shared MLP encoder applied to each member's observation, and K linear heads.

    Input: the K members' observations side by side ([B, K * d]). Output: ACTION_DIST_INPUTS for the joint action,
    i.e. K categorical logit vectors (MultiDiscrete) or K Gaussian means followed by K log-stds (Box).
    """

    @override(TorchRLModule)
    def setup(self):
        self.population_size = int(self.model_config["population_size"])
        k = self.population_size
        self.member_obs_dim = int(np.prod(self.observation_space.shape)) // k
        if isinstance(self.action_space, gym.spaces.MultiDiscrete):
            self.discrete = True
            nvec = np.asarray(self.action_space.nvec).reshape(-1)
            if len(nvec) != k or len(set(nvec.tolist())) != 1:
                raise ValueError(f"expected MultiDiscrete([n] * {k}), got {self.action_space}")
            self.member_out = int(nvec[0])
        elif isinstance(self.action_space, gym.spaces.Box):
            self.discrete = False
            self.member_out = int(np.prod(self.action_space.shape)) // k
            self.log_std = nn.Parameter(torch.zeros(k, self.member_out))
        else:
            raise ValueError(f"PopulationModule supports MultiDiscrete or Box joint actions, got {self.action_space}")
        activation = {"tanh": nn.Tanh, "relu": nn.ReLU, "swish": nn.SiLU, "elu": nn.ELU, "linear": nn.Identity}[
            self.model_config.get("fcnet_activation", "tanh")
        ]
        layers, width = [], self.member_obs_dim
        for hidden in self.model_config.get("fcnet_hiddens", [64, 64]):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        self.encoder = nn.Sequential(*layers)
        # K independent heads, stored as one [K, width, out] tensor (each initialised like an nn.Linear).
        bound = 1.0 / np.sqrt(width)
        self.head_weight = nn.Parameter(torch.empty(k, width, self.member_out).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(k, self.member_out).uniform_(-bound, bound))
        # 1 = phase 1, every member acts with head 0 (one policy); 0 = K separate heads. A buffer, so the weight
        # sync to the EnvRunners and the checkpoints carry it.
        self.register_buffer("tied", torch.ones(()))

    def member_outputs(self, obs: torch.Tensor) -> torch.Tensor:
        """[B, K * d] -> per-member head outputs [B, K, out] (logits or Gaussian means)."""
        k = self.population_size
        members = obs.reshape(obs.shape[0], k, self.member_obs_dim)
        features = self.encoder(members)
        weight, bias = self.head_weight, self.head_bias
        if bool(self.tied):
            weight, bias = weight[:1].expand_as(weight), bias[:1].expand_as(bias)
        return torch.einsum("bkh,kho->bko", features, weight) + bias

    @torch.no_grad()
    def untie(self) -> None:
        """Phase 1 -> 2: clone head 0 (and its log-std) into every head."""
        self.head_weight.copy_(self.head_weight[:1].expand_as(self.head_weight))
        self.head_bias.copy_(self.head_bias[:1].expand_as(self.head_bias))
        if not self.discrete:
            self.log_std.copy_(self.log_std[:1].expand_as(self.log_std))
        self.tied.fill_(0.0)

    @override(TorchRLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        out = self.member_outputs(batch[Columns.OBS].float())
        flat = out.reshape(out.shape[0], -1)
        if not self.discrete:
            log_std = self.log_std[:1].expand_as(self.log_std) if bool(self.tied) else self.log_std
            flat = torch.cat([flat, log_std.reshape(1, -1).expand(out.shape[0], -1)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: flat}

    def member_log_probs(self, dist_inputs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi_k(a_k | s_k) for every member: [B, K]."""
        k, out = self.population_size, self.member_out
        if self.discrete:
            logits = dist_inputs.reshape(-1, k, out)
            return torch.log_softmax(logits, -1).gather(-1, actions.long().reshape(-1, k, 1)).squeeze(-1)
        mean = dist_inputs[:, : k * out].reshape(-1, k, out)
        log_std = dist_inputs[:, k * out :].reshape(-1, k, out)
        normal = torch.distributions.Normal(mean, log_std.exp())
        return normal.log_prob(actions.reshape(-1, k, out)).sum(-1)

    def member_entropy(self, dist_inputs: torch.Tensor) -> torch.Tensor:
        """Mean over members of each member's entropy: [B]."""
        k, out = self.population_size, self.member_out
        if self.discrete:
            logp = torch.log_softmax(dist_inputs.reshape(-1, k, out), -1)
            return -(logp.exp() * logp).sum(-1).mean(-1)
        log_std = dist_inputs[:, k * out :].reshape(-1, k, out)
        return (log_std + 0.5 * np.log(2 * np.pi * np.e)).sum(-1).mean(-1)

    def _dist_cls(self):
        if self.discrete:
            return TorchMultiCategorical.get_partial_dist_cls(
                space=self.action_space, input_lens=[self.member_out] * self.population_size
            )
        return TorchDiagGaussian

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self):
        return self._dist_cls()

    @override(TorchRLModule)
    def get_inference_action_dist_cls(self):
        return self._dist_cls()

    @override(TorchRLModule)
    def get_train_action_dist_cls(self):
        return self._dist_cls()


class PoppyColumns(ConnectorV2):
    """Learner connector piece: per-row member returns, member-acted flags and 1/N, from the episodes' infos.

    Runs after RLlib's default pieces, so each episode (of length T + 1 with the phantom row) maps to T + 1
    consecutive rows, in the episodes' order. Row t < T is step t: the member flags come from the info returned
    by that step (index t + 1; index 0 is the reset info); the phantom row gets no flags, hence no gradient.
    """

    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        returns, acted = [], []
        for episode in episodes:
            rows = len(episode)  # T real steps + the phantom row
            infos = episode.get_infos()
            final = np.asarray(infos[rows - 1]["member_returns"], dtype=np.float32)  # after the last real step
            returns.append(np.broadcast_to(final, (rows, len(final))))
            flags = np.zeros((rows, len(final)), np.float32)
            for t in range(rows - 1):
                flags[t] = np.asarray(infos[t + 1]["member_active"], dtype=np.float32)
            acted.append(flags)
        num_rows = sum(len(r) for r in returns)
        columns = {
            POPPY_MEMBER_RETURNS: np.concatenate(returns),
            POPPY_MEMBER_ACTED: np.concatenate(acted),
            POPPY_INSTANCE_WEIGHT: np.full(num_rows, 1.0 / max(len(episodes), 1), np.float32),
        }
        for module_id, module_batch in batch.items():
            device = module_batch[Columns.OBS].device
            for key, data in columns.items():
                module_batch[key] = torch.as_tensor(data, device=device)
        return batch


class PoppyConfig(WrappedEnvConfigMixin, OnPolicyConfig):
    """Poppy's options. The configured env id is wrapped into a K-member PopulationEnv."""

    WRAPPER_ENV_ID = envs.population.ENV_ID

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or Poppy)
        self.population_size = 4
        self.pretrain_steps = 0  # phase 1 (one shared policy) for this many env steps, then Poppy (see docstring)
        self.lr = 1e-3
        self.train_batch_size_per_learner = 1280  # N = 128 instances of the 10-item knapsack
        self.batch_mode = "complete_episodes"  # a member's return is only known at the end of its instance
        self.minibatch_size = None  # one full-batch step per batch of instances
        self.num_epochs = 1
        self.grad_clip = None
        self.entropy_coeff = 0.0
        # The reported return is the population's value on one instance, which varies a lot between instances:
        # average it over more instances than RLlib's default 100 (engineering, no effect on the update).
        self.metrics_num_episodes_for_smoothing = 500

    def wrapper_env_config(self) -> dict[str, Any]:
        return {"population_size": self.population_size}

    @override(OnPolicyConfig)
    def training(self, *, population_size: int = NotProvided, pretrain_steps: int = NotProvided,
                 **kwargs) -> "PoppyConfig":
        super().training(**kwargs)
        if population_size is not NotProvided:
            self.population_size = population_size
        if pretrain_steps is not NotProvided:
            self.pretrain_steps = pretrain_steps
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"population_size": self.population_size}

    @override(OnPolicyConfig)
    def validate(self) -> None:
        super().validate()
        if not isinstance(self.population_size, int) or self.population_size < 2:
            self._value_error(f"population_size must be an integer >= 2 (a winner needs a runner-up), "
                              f"got {self.population_size}")
        if not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0:
            self._value_error(f"pretrain_steps must be an integer >= 0, got {self.pretrain_steps}")
        if self.batch_mode != "complete_episodes":
            self._value_error("Poppy compares whole attempts: batch_mode='complete_episodes'")
        if self.minibatch_size is not None or self.num_epochs != 1:
            self._value_error("Poppy takes one full-batch step per batch of instances: minibatch_size=None, "
                              "num_epochs=1")

    @override(OnPolicyConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PopulationModule)

    @override(OnPolicyConfig)
    def get_default_learner_class(self):
        return PoppyLearner


class Poppy(OnPolicyAlgorithm):
    @classmethod
    @override(OnPolicyAlgorithm)
    def get_default_config(cls) -> PoppyConfig:
        return PoppyConfig()


class PoppyLearner(OnPolicyLearner):
    @override(OnPolicyLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.append(PoppyColumns())

    @override(OnPolicyLearner)
    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        steps = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)
        for module_id in self.module.keys():
            module = self.module[module_id].unwrapped()
            if bool(module.tied) and steps >= self.config.get_config_for_module(module_id).pretrain_steps:
                module.untie()  # phase 2 starts: the population is K clones of the pre-trained policy

    @override(OnPolicyLearner)
    def compute_loss_for_module(self, *, module_id: str, config: PoppyConfig, batch: dict[str, Any], fwd_out):
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        dist_inputs = fwd_out[Columns.ACTION_DIST_INPUTS]
        member_logp = module.member_log_probs(dist_inputs, batch[Columns.ACTIONS])
        acted = batch[POPPY_MEMBER_ACTED]
        if mask is not None:
            acted = acted * mask.float().unsqueeze(-1)
        returns, weight = batch[POPPY_MEMBER_RETURNS], batch[POPPY_INSTANCE_WEIGHT]
        pretraining = bool(module.tied)
        loss_fn = shared_baseline_loss if pretraining else poppy_loss
        terms = loss_fn(member_logp, returns, acted, weight)
        with torch.no_grad():
            entropy = masked_mean(module.member_entropy(dist_inputs), mask)
            top2 = torch.topk(returns, 2, dim=-1).values
            # Each instance's rows share one weight 1/N: sum_rows weight * x / (rows per instance) is awkward, so
            # read the per-instance numbers on the phantom rows (one per instance).
            phantom = ~mask if mask is not None else torch.ones_like(weight, dtype=torch.bool)
            margin = (top2[:, 0] - top2[:, 1])[phantom].mean() if phantom.any() else torch.zeros(())
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: terms["policy_loss"],
                VF_LOSS_KEY: 0.0,  # Poppy has no critic: the runner-up (phase 1: the attempts' mean) is the baseline
                ENTROPY_KEY: entropy,
                "winner_margin": margin,
                "pretraining": float(pretraining),
            },
            key=module_id,
            window=1,
        )
        return terms["policy_loss"]


POPPY_OPTIONS = tuple(o for o in ONPOLICY_OPTIONS if o.name not in ("gamma", "lambda_", "advantage_estimator",
                                                                   "standardize_advantages", "vf_share_layers")) + (
    Option("population_size", "K, the number of policies (heads on one shared encoder)",
           lambda x: isinstance(x, int) and x >= 2, "an integer >= 2"),
    Option("pretrain_steps", "env steps of phase 1 (one shared policy, mean-of-K baseline) before Poppy",
           lambda x: isinstance(x, int) and x >= 0, "an integer >= 0"),
)

RULE = Rule(
    name="poppy",
    family="on-policy",
    paper_ids=("P206",),
    summary="K-head population; per instance only the best member is trained, runner-up return as baseline",
    config_class=PoppyConfig,
    options=POPPY_OPTIONS,
    learning_check=LearningCheck(
        envs.knapsack.ENV_ID, 200_000, 3.6,
        "population value max_k R on 10-item knapsacks (w, v ~ U(0,1), C = 2.5), K = 4, per-iteration mean over "
        "128 instances. References: optimum 3.78, greedy value/weight heuristic 3.73 (98.6%), best of 4 random "
        "attempts ~2.5-3.0. Measured same-budget single policy (this rule with pretrain_steps >= budget: one "
        "policy, 4 attempts per instance, mean baseline, same estimator): best-of-4 2.9 at 150k steps. P206 claims "
        "the population beats the single agent sampled K times; 3.6 = 95% of optimum, 3.5% below greedy"),
    smoke_overrides={"train_batch_size": 100, "pretrain_steps": 150},
)
