"""P262 PG-Rainbow: Using Distributional Reinforcement Learning in Policy Gradient Methods (Jeon, Lee, Lee 2024).

PPO (P147) whose critic receives the return-quantile information of an Implicit Quantile Network. Three
networks: PPO's policy pi_theta, PPO's value network V_theta (here with N outputs instead of one) and an IQN
Z_phi(s, a, tau) trained off-policy from a replay buffer of all experience collected so far. The critic that
PPO's GAE and value loss use is the paper's distillation of the two:

    q_phi(s)  = [ Z_phi(s, a*(s), tau_i) ]_{i=1..N},   a*(s) = argmax_a (1/N) sum_i Z_phi(s, a, tau_i)
    V_psi(s)  = f_psi( V_theta(s) (Hadamard) q_phi(s) )                                  (P262, critic)

and the policy sees the distribution through the advantages A_t = GAE(V_psi) of PPO's clipped loss:

    loss_PPO  = -L^CLIP(theta) + c1 (V_psi(s_t) - V_t^targ)^2 - c2 H(pi_theta)              (P147 eq. 9)

The IQN is trained as in Dabney et al. 2018 (IQN eqs. 3-4) on replayed transitions (s, a, r, s', d):

    y_j       = r + gamma (1 - d) Z_phi-(s', a'(s'), tau'_j),  a'(s') = argmax_a mean_k Z_phi-(s', a, tau_k)
    loss_IQN  = sum_i (1/N') sum_j rho^kappa_{tau_i}(y_j - Z_phi(s, a, tau_i)),  tau_i, tau'_j ~ U(0, 1)

(quantile Huber loss, `algorithms/common/distributional.py`; phi- is a target copy refreshed every
`iqn_target_update_freq` IQN steps). One IQN minibatch step runs with every PPO minibatch step, with its own
Adam optimizer; the PPO value loss does not flow into the IQN (q_phi is an input of the distillation net).

Choices the paper leaves open (its public text gives the critic equation and the replay-trained IQN; the
rest is ours): q_phi(s) is the quantile vector of the IQN's greedy action at the N fixed midpoints
tau_i = (2i - 1) / 2N (deterministic, so V_psi is a function of s); f_psi is a 2-layer ReLU MLP; V_theta is
PPO's value MLP with N outputs; the IQN is an MLP of the model's hidden sizes with a 64-cosine quantile
embedding, N = N' = 8 sampled fractions for its loss, kappa = 1, a hard target copy every 50 IQN steps (short,
so the targets propagate over CartPole's ~100-step discounted horizon within the budget); the replay buffer
lives in the learner (FIFO, not checkpointed: it refills from fresh batches after a restore). Discrete
actions only (the IQN maximises over actions; the paper evaluates on Atari).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import CRITIC, ENCODER_OUT
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided
from torch import nn

from algorithms.common.config_fields import check_not_recurrent, check_positive_ints, set_provided
from algorithms.common.distributional import QuantileEmbedding, midpoint_taus, quantile_huber_loss, quantile_td_targets
from algorithms.common.transitions import TransitionRecorder, TransitionRing
from algorithms.onpolicy.ppo import POLYAK_OPTION_NAMES, PPO_OPTIONS, PPORule, PPORuleConfig, PPORuleLearner
from algorithms.options import Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule

IQN_OPTIMIZER = "iqn"
# model_config keys the module reads (filled from the config's iqn_* options).
_MODEL_KEYS = ("iqn_num_quantiles", "iqn_num_cosines")


def pg_rainbow_value(v_theta: torch.Tensor, q_phi: torch.Tensor, distill: nn.Module) -> torch.Tensor:
    """V_psi(s) = f_psi(V_theta(s) * q_phi(s)) for a batch: [B, N] x [B, N] -> [B]."""
    return distill(v_theta * q_phi).squeeze(-1)


def iqn_loss(
    quantiles: torch.Tensor,
    taus: torch.Tensor,
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    next_quantiles: torch.Tensor,
    *,
    gamma: float,
    kappa: float,
) -> torch.Tensor:
    """Mean over the batch of IQN's quantile Huber TD loss (IQN eq. 3); next_quantiles are Z'(s', a'), [B, N']."""
    targets = quantile_td_targets(rewards, terminateds, gamma, next_quantiles)
    return quantile_huber_loss(quantiles, taus, targets, kappa).mean()


class ImplicitQuantileNetwork(nn.Module):
    """Z(s, a, tau) = head(psi(s) * phi(tau))_a  (IQN); forward(obs [B, D], taus [B, N]) -> [B, N, A]."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: list[int], num_cosines: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.torso = nn.Sequential(*layers)
        self.embedding = QuantileEmbedding(width, num_cosines)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_actions))

    def forward(self, obs: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(obs).unsqueeze(1) * self.embedding(taus))

    def greedy_quantiles(self, obs: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """The quantiles at `taus` of the action with the highest mean over `taus`: [B, N]."""
        z = self(obs, taus)
        best = z.mean(1).argmax(-1)
        return z.gather(-1, best.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(-1)


class PGRainbowModule(DefaultPPOTorchRLModule):
    """PPO's actor-critic with an N-output V_theta, an IQN (online + target copy) and the distillation net f_psi.

    Only the policy travels to EnvRunners: the critic parts are non-inference attributes.
    """

    @override(DefaultPPOTorchRLModule)
    def setup(self):
        super().setup()
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"pg_rainbow needs a discrete action space (its IQN maximises over actions); "
                             f"got {self.action_space}")
        n = int(self.model_config["iqn_num_quantiles"])
        hidden = list(self.model_config.get("fcnet_hiddens") or [64, 64])
        obs_dim = int(gym.spaces.flatdim(self.observation_space))
        self.vf = nn.Linear(self.catalog.latent_dims[0], n)  # V_theta(s) in R^N
        self.iqn = ImplicitQuantileNetwork(obs_dim, self.action_space.n, hidden, int(self.model_config["iqn_num_cosines"]))
        self.iqn_target = ImplicitQuantileNetwork(obs_dim, self.action_space.n, hidden,
                                                  int(self.model_config["iqn_num_cosines"]))
        self.iqn_target.load_state_dict(self.iqn.state_dict())
        self.iqn_target.requires_grad_(False)
        self.distill = nn.Sequential(nn.Linear(n, hidden[-1]), nn.ReLU(), nn.Linear(hidden[-1], 1))  # f_psi

    @override(DefaultPPOTorchRLModule)
    def get_non_inference_attributes(self) -> list[str]:
        return super().get_non_inference_attributes() + ["iqn", "iqn_target", "distill"]

    def quantile_features(self, obs: torch.Tensor) -> torch.Tensor:
        """q_phi(s): the IQN's greedy-action quantiles at the N midpoints (no gradient into the IQN)."""
        n = int(self.model_config["iqn_num_quantiles"])
        with torch.no_grad():
            return self.iqn.greedy_quantiles(obs.float(), midpoint_taus(n, obs.shape[0], obs.device))

    @override(DefaultPPOTorchRLModule)
    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            if hasattr(self.encoder, "critic_encoder"):
                embeddings = self.encoder.critic_encoder(batch)[ENCODER_OUT]
            else:
                embeddings = self.encoder(batch)[ENCODER_OUT][CRITIC]
        return pg_rainbow_value(self.vf(embeddings), self.quantile_features(batch[Columns.OBS]), self.distill)


class PGRainbowConfig(PPORuleConfig):
    """PPO's defaults (P147) plus the IQN's (Dabney et al. 2018, scaled to small control tasks)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or PGRainbow)
        self.iqn_num_quantiles = 32  # N: size of q_phi(s) and V_theta(s)
        self.iqn_num_cosines = 64  # n in IQN eq. 4
        self.iqn_num_tau_samples = 8  # N = N' sampled fractions in the IQN loss (IQN paper)
        self.iqn_kappa = 1.0
        self.iqn_lr = 5e-4
        self.iqn_batch_size = 64
        self.iqn_replay_capacity = 50_000
        # IQN gradient steps between target copies. Each copy extends the horizon the targets have propagated by
        # about one step, so it must be short next to the return horizon: with one IQN step per PPO minibatch
        # (320 per 2048-step batch) 500 left the quantiles near 10 after 30k CartPole steps where returns are ~90.
        self.iqn_target_update_freq = 50

    @property
    @override(PPORuleConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"iqn_num_quantiles": self.iqn_num_quantiles,
                                                      "iqn_num_cosines": self.iqn_num_cosines}

    @override(PPORuleConfig)
    def training(self, *, iqn_num_quantiles: int = NotProvided, iqn_num_cosines: int = NotProvided,
                 iqn_num_tau_samples: int = NotProvided, iqn_kappa: float = NotProvided, iqn_lr: float = NotProvided,
                 iqn_batch_size: int = NotProvided, iqn_replay_capacity: int = NotProvided,
                 iqn_target_update_freq: int = NotProvided, **kwargs) -> "PGRainbowConfig":
        super().training(**kwargs)
        set_provided(self, iqn_num_quantiles=iqn_num_quantiles, iqn_num_cosines=iqn_num_cosines,
                     iqn_num_tau_samples=iqn_num_tau_samples, iqn_kappa=iqn_kappa, iqn_lr=iqn_lr,
                     iqn_batch_size=iqn_batch_size, iqn_replay_capacity=iqn_replay_capacity,
                     iqn_target_update_freq=iqn_target_update_freq)
        return self

    @override(PPORuleConfig)
    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "iqn_num_quantiles", "iqn_num_cosines", "iqn_num_tau_samples", "iqn_batch_size",
                            "iqn_replay_capacity", "iqn_target_update_freq")
        if self.iqn_kappa < 0:
            self._value_error(f"iqn_kappa must be >= 0, got {self.iqn_kappa}")
        if self.iqn_lr <= 0:
            self._value_error(f"iqn_lr must be > 0, got {self.iqn_lr}")
        check_not_recurrent(self, "pg_rainbow")

    @override(PPORuleConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PGRainbowModule)

    @override(PPORuleConfig)
    def get_default_learner_class(self):
        return PGRainbowLearner


class PGRainbow(PPORule):
    @classmethod
    @override(PPORule)
    def get_default_config(cls) -> PGRainbowConfig:
        return PGRainbowConfig()


def _iqn_parameter_ids(module: PGRainbowModule) -> set[int]:
    return {id(p) for p in module.iqn.parameters()} | {id(p) for p in module.iqn_target.parameters()}


class PGRainbowLearner(PPORuleLearner):
    """PPO's learner plus a replay buffer of every transition seen and one IQN step per PPO minibatch step."""

    @override(PPORuleLearner)
    def build(self) -> None:
        super().build()
        self._replay: dict[str, TransitionRing] = {}
        self._iqn_steps: dict[str, int] = {}
        if self._learner_connector is not None:
            self._learner_connector.append(TransitionRecorder(sink=self._store_transitions))

    def _store_transitions(self, module_id: str, columns: dict) -> None:
        if module_id not in self._replay:
            self._replay[module_id] = TransitionRing(self.config.get_config_for_module(module_id).iqn_replay_capacity)
        self._replay[module_id].add(columns)

    @override(PPORuleLearner)
    def configure_optimizers_for_module(self, module_id: str, config: PGRainbowConfig = None) -> None:
        module = self._module[module_id].unwrapped()
        iqn_ids = _iqn_parameter_ids(module)
        ppo_params = [p for p in module.parameters() if id(p) not in iqn_ids]
        iqn_params = list(module.iqn.parameters())
        fused = bool(getattr(config, "fused_adam", False))
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.Adam(ppo_params, fused=fused),
                                params=ppo_params, lr_or_lr_schedule=config.lr)
        self.register_optimizer(module_id=module_id, optimizer_name=IQN_OPTIMIZER,
                                optimizer=torch.optim.Adam(iqn_params, fused=fused), params=iqn_params,
                                lr_or_lr_schedule=config.iqn_lr)

    @override(PPORuleLearner)
    def compute_loss_for_module(self, *, module_id: str, config: PGRainbowConfig, batch: dict[str, Any], fwd_out):
        total = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        replay = self._replay.get(module_id)
        if replay is None or len(replay) == 0:
            return total
        module = self.module[module_id].unwrapped()
        steps = self._iqn_steps.get(module_id, 0)
        if steps % config.iqn_target_update_freq == 0:
            module.iqn_target.load_state_dict(module.iqn.state_dict())
        self._iqn_steps[module_id] = steps + 1
        loss = self._iqn_loss(module, replay.sample(config.iqn_batch_size, device=self._device), config)
        if self.log_minibatch_metrics:
            self.metrics.log_value((module_id, "iqn_loss"), loss.detach(), window=1)
        return total + loss

    def _iqn_loss(self, module: PGRainbowModule, sample: dict[str, torch.Tensor], config: PGRainbowConfig):
        batch_size, n = sample["obs"].shape[0], config.iqn_num_tau_samples
        device = sample["obs"].device
        taus = torch.rand(batch_size, n, device=device)
        z = module.iqn(sample["obs"], taus)  # [B, N, A]
        actions = sample["actions"].long().view(-1, 1, 1).expand(-1, n, 1)
        quantiles = z.gather(-1, actions).squeeze(-1)
        with torch.no_grad():
            next_taus = torch.rand(batch_size, n, device=device)
            z_next = module.iqn_target(sample["next_obs"], next_taus)
            best = z_next.mean(1).argmax(-1).view(-1, 1, 1).expand(-1, n, 1)
            next_quantiles = z_next.gather(-1, best).squeeze(-1)
        return iqn_loss(quantiles, taus, sample["rewards"], sample["terminateds"], next_quantiles,
                        gamma=config.gamma, kappa=config.iqn_kappa)


# Its own optimizers: the Polyak step (plain SGD on every optimizer) is not offered.
PG_RAINBOW_OPTIONS = tuple(o for o in PPO_OPTIONS if o.name not in POLYAK_OPTION_NAMES) + (
    Option("iqn_num_quantiles", "N: quantiles of q_phi(s) in the distilled critic", positive, ">= 1"),
    Option("iqn_num_cosines", "cosine features of the IQN quantile embedding", positive, ">= 1"),
    Option("iqn_num_tau_samples", "sampled fractions N = N' in the IQN loss", positive, ">= 1"),
    Option("iqn_kappa", "Huber threshold of the quantile loss (0 = plain quantile regression)", non_negative, ">= 0"),
    Option("iqn_lr", "IQN Adam step size", positive, "> 0"),
    Option("iqn_batch_size", "replayed transitions per IQN step", positive, ">= 1"),
    Option("iqn_replay_capacity", "transitions kept for the IQN", positive, ">= 1"),
    Option("iqn_target_update_freq", "IQN steps between target-network copies", positive, ">= 1"),
)

RULE = Rule(
    name="pg_rainbow",
    family="on-policy",
    paper_ids=("P262",),
    summary="PPO whose critic distils IQN return quantiles: V = f(V_theta * q_phi); IQN trained from replay",
    config_class=PGRainbowConfig,
    options=PG_RAINBOW_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 450.0,
                                 "PG-Rainbow claims to match or beat PPO; CleanRL/SB3 PPO reach ~500 on "
                                 "CartPole-v1 within 100k steps (the ppo rule's check)"),
    smoke_overrides={"iqn_batch_size": 32},
)
