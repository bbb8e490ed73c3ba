"""VPL: Variational Preference Learning (P138, Poddar et al. 2024, "Personalizing Reinforcement Learning from Human
Feedback with Variational Preference Learning").

Users with different hidden goals label pairs of segments; one Bradley-Terry reward cannot fit them all (it
averages the goals). VPL infers a latent user variable z from a user's N annotated pairs and conditions the reward
(and the policy) on it. With the context C_u = {(sigma_i^+, sigma_i^-)}_{i=1..N} of user u:

    q_psi(z | C_u)    = N(mu, diag sigma^2),  (mu, log sigma^2) = g_psi( mean_i e_psi(sigma_i^+, sigma_i^-) )
    p(y_i | z)        = sigmoid( sum_t r_phi(s_t^+, a_t^+, z) - sum_t r_phi(s_t^-, a_t^-, z) )
    ELBO(psi, phi)    = E_{z ~ q}[ sum_i log p(y_i | z) ] - beta KL( q_psi(z | C_u) || N(0, I) )       (the VPL ELBO)

maximised with the reparameterisation trick (one z sample per context); we minimise
-ELBO / N = mean_i -log p(y_i | z) + (beta / N) KL. The z-conditioned policy: for a user, z = mu(C_u) from N of
their labelled pairs, then value iteration on r_phi(., ., z) over the task's known dynamics gives Q*_z, whose
greedy policy is pi(a | s, z) (the paper trains a z-conditioned IQL policy offline; on this tabular task planning
on the z-conditioned reward is the exact counterpart, as in regret_pref.py).

Data flow: the collector actor writes uniform-random segments for each user (their own goal) to the Redis segment
table; pairs of one user's segments go through the Redis preference queue (meta.user) to that user's scripted
teacher (Bradley-Terry on the user's hidden true return); the learner reads them back by id.

Choices the paper leaves open, and ours: 2 users (goals (5, 1) and (1, 5) of the 7x7 PrefReach-v0 grid), a
2-dimensional z, N = 32 pairs per context (contexts drawn from the user's labelled pairs), beta = 1, pair
embedding e = MLP over the flattened (chosen, rejected) segments (observations and one-hot actions), reward
MLP r_phi(s, a, z). The check reports the true return averaged over users, and the same pipeline with z fixed to
0 (a single unimodal BT reward) for comparison. N matters at evaluation: with N = 16 the z of one user on seed 1
was too noisy (true return -4.12 vs -2.74 with N = 32, seed 0 passing with both).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from algorithms.common.config_fields import check_positive_ints
from algorithms.options import Option, non_negative, positive
from algorithms.preference.control_checks import reach_check
from algorithms.preference.control_collect import evaluate_true_return
from algorithms.preference.control_loop import (
    CONTROL_OPTIONS, EVAL_SEED_OFFSET, OFFLINE_OPTIONS, ControlPreferenceConfig, apply_overrides, control_session,
    run_seeds, single_threaded,
)
from algorithms.preference.regret_pref import greedy_tabular, preference_nll, value_iteration
from algorithms.rule import Rule
from envs.pref_reach import MOVES, PrefReachEnv, transition_table
from services.preferences import PreferenceQueue

NUM_ACTIONS = len(MOVES)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag exp(logvar)) || N(0, I) ) summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def vpl_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float) -> dict[str, torch.Tensor]:
    """-ELBO / N per context: scores (C, N) of each context's pairs under its sampled z, q's (mu, logvar) (C, d)."""
    nll = preference_nll(score_chosen, score_rejected).mean(-1)
    kl = gaussian_kl(mu, logvar)
    return {"loss": nll + beta * kl / score_chosen.shape[-1], "nll": nll, "kl": kl}


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VPLModel(nn.Module):
    """Pair encoder q_psi(z | context) and z-conditioned reward r_phi(s, a, z)."""

    def __init__(self, obs_dim: int, length: int, latent_dim: int, hidden: int = 64):
        super().__init__()
        segment_features = (length + 1) * obs_dim + length * NUM_ACTIONS
        self.embed = mlp([2 * segment_features, hidden, hidden])
        self.head = nn.Linear(hidden, 2 * latent_dim)
        self.reward = mlp([obs_dim + NUM_ACTIONS + latent_dim, hidden, hidden, 1])
        self.latent_dim = latent_dim

    @staticmethod
    def features(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(actions.long(), NUM_ACTIONS).float()
        return torch.cat([obs.flatten(-2), one_hot.flatten(-2)], dim=-1)

    def posterior(self, chosen: tuple[torch.Tensor, torch.Tensor],
                  rejected: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) (C, d) from contexts of N pairs: obs (C, N, L + 1, o), actions (C, N, L)."""
        pairs = torch.cat([self.features(*chosen), self.features(*rejected)], dim=-1)
        mu, logvar = self.head(self.embed(pairs).mean(-2)).chunk(2, dim=-1)
        return mu, logvar.clamp(-8.0, 4.0)

    def step_rewards(self, obs: torch.Tensor, actions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """r(s_t, a_t, z) (..., L) for obs (..., L + 1, o), actions (..., L), z broadcastable to (..., d)."""
        one_hot = nn.functional.one_hot(actions.long(), NUM_ACTIONS).float()
        steps = obs[..., :-1, :]
        z = z.unsqueeze(-2).expand(*steps.shape[:-1], self.latent_dim)
        return self.reward(torch.cat([steps, one_hot, z], dim=-1)).squeeze(-1)

    def reward_table(self, cells: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """r(s, a, z) for every cell observation (S, o) and action: (S, A)."""
        obs = cells[:, None, :].expand(-1, NUM_ACTIONS, -1)
        actions = torch.arange(NUM_ACTIONS).expand(cells.shape[0], -1)
        z = z.expand(cells.shape[0], NUM_ACTIONS, self.latent_dim)
        return self.reward(torch.cat([obs, nn.functional.one_hot(actions, NUM_ACTIONS).float(), z], -1)).squeeze(-1)


class VPLConfig(ControlPreferenceConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.users = [{"goal": [5, 1]}, {"goal": [1, 5]}]
        self.teacher = "return"
        self.latent_dim = 2
        self.kl_beta = 1.0
        self.context_pairs = 32
        self.contexts_per_step = 32
        self.dataset_episodes = 200  # per user
        self.pairs = 1000  # per user
        self.updates = 1500
        self.lr = 1e-3

    def validate(self) -> None:
        super().validate()
        check_positive_ints(self, "latent_dim", "context_pairs", "contexts_per_step", "dataset_episodes", "pairs",
                            "updates")
        if not self.kl_beta >= 0:
            self._value_error(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.env_id != "PrefReach-v0":
            self._value_error("vpl plans on the known tabular dynamics of PrefReach-v0")
        if self.context_pairs > self.pairs:
            self._value_error(f"context_pairs ({self.context_pairs}) must be <= pairs per user ({self.pairs})")


def sample_contexts(per_user: list[dict[str, torch.Tensor]], count: int, size: int,
                    rng: np.random.Generator) -> tuple[tuple, tuple]:
    """`count` contexts of `size` labelled pairs, each of one random user: ((obs, act) chosen, (obs, act) rejected)."""
    users = rng.integers(len(per_user), size=count)
    picks = [(per_user[u], torch.as_tensor(rng.integers(len(per_user[u]["win_action"]), size=size))) for u in users]
    return tuple(tuple(torch.stack([d[f"{side}_{k}"][i] for d, i in picks]) for k in ("obs", "action"))
                 for side in ("win", "lose"))


@single_threaded
def train_vpl(rule: Rule, seed: int = 0, overrides: dict[str, Any] | None = None,
              queue: PreferenceQueue | None = None, unimodal_baseline: bool = False) -> dict[str, Any]:
    """Collect per user, label through the queue, fit the ELBO, plan per inferred z, evaluate the true return."""
    config: VPLConfig = apply_overrides(rule, overrides)
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    envs = [PrefReachEnv(**{k: tuple(v) if k == "goal" else v for k, v in u.items()}) for u in config.users]
    size = envs[0].size
    next_state = torch.as_tensor(transition_table(size))
    spec = {"obs_dim": 2, "num_actions": NUM_ACTIONS, "hidden": list(config.hidden), "context_dim": 0}
    per_user: list[dict[str, torch.Tensor]] = []
    env_steps = acked = 0
    segments_cap = len(config.users) * config.dataset_episodes * 64
    with control_session(config, rule.name, seed, segments_cap, spec, queue) as session:
        batches = []
        for user in range(len(config.users)):
            data = session.offline_dataset(config.dataset_episodes, config.pairs, rng, user=user)
            env_steps += data.env_steps
            per_user.append({"win_obs": data.chosen["obs"], "win_action": data.chosen["action"],
                             "lose_obs": data.rejected["obs"], "lose_action": data.rejected["action"]})
            batches.append(data.batch)
        model = VPLModel(2, config.segment_length, config.latent_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        history = []
        for step in range(config.updates):
            chosen, rejected = sample_contexts(per_user, config.contexts_per_step, config.context_pairs, rng)
            mu, logvar = model.posterior(chosen, rejected)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            if unimodal_baseline:
                z = torch.zeros_like(z)
            zc = z[:, None, :]
            terms = vpl_loss(model.step_rewards(*chosen, zc).sum(-1), model.step_rewards(*rejected, zc).sum(-1),
                             mu, logvar, 0.0 if unimodal_baseline else config.kl_beta)
            loss = terms["loss"].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == config.updates - 1:
                history.append({k: float(v.detach().mean()) for k, v in terms.items()})
        for batch in batches:
            acked += session.channel.ack(batch)
    cells = torch.as_tensor(np.array([divmod(s, size) for s in range(size * size)], np.float32) / (size - 1))
    returns, latents = [], []
    with torch.no_grad():
        for user, env_kwargs in enumerate(config.users):
            chosen, rejected = sample_contexts([per_user[user]], 1, config.context_pairs, rng)
            mu, _ = model.posterior(chosen, rejected)
            z = torch.zeros_like(mu) if unimodal_baseline else mu
            q, _ = value_iteration(model.reward_table(cells, z).double(), next_state, config.teacher_gamma, 1000)
            returns.append(evaluate_true_return(greedy_tabular(q, size), config.env_id, env_kwargs,
                                                config.eval_episodes, seed + EVAL_SEED_OFFSET))
            latents.append(mu[0].tolist())
    return {"seed": seed, "return": float(np.mean(returns)), "per_user_return": returns, "latents": latents,
            "env_steps": env_steps, "pairs_acked": acked, "wall_s": time.monotonic() - started, "history": history}


def check_seed(rule: Rule, seed: int) -> dict[str, Any]:
    """VPL, and beside it the same pipeline with z = 0 (one unimodal Bradley-Terry reward for all users)."""
    result = train_vpl(rule, seed=seed)
    baseline = train_vpl(rule, seed=seed, unimodal_baseline=True)
    return ({k: v for k, v in result.items() if k != "history"} | {"final": result["history"][-1]}
            | {"unimodal_return": baseline["return"], "unimodal_per_user": baseline["per_user_return"]})


def run_learning_check(rule: Rule, seeds: int = 1) -> dict[str, Any]:
    return run_seeds(rule, seeds, lambda seed: check_seed(rule, seed))


RULE = Rule(
    name="vpl", family="preference", paper_ids=("P138",),
    summary="Variational Preference Learning: a latent user z inferred from the user's labelled pairs, a "
            "z-conditioned reward fitted by the ELBO, and a z-conditioned policy (planning on r(., ., z))",
    config_class=VPLConfig,
    options=CONTROL_OPTIONS + OFFLINE_OPTIONS + (
        Option("latent_dim", "dimension of the user latent z", positive, ">= 1"),
        Option("kl_beta", "weight of the KL term of the ELBO", non_negative, ">= 0"),
        Option("context_pairs", "labelled pairs per user context (N)", positive, ">= 1"),
    ),
    learning_check=reach_check("P138", env_steps=2 * 200 * 16,
                               what="2 users with different goals, 200 uniform episodes and 1000 labelled pairs each; "
                                    "score = true return averaged over the users"),
    smoke_overrides={"dataset_episodes": 4, "pairs": 8, "context_pairs": 4, "contexts_per_step": 2, "updates": 2,
                     "eval_episodes": 4},
    check_runner="algorithms.preference.vpl:run_learning_check",
)
