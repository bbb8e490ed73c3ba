"""A tanh-squashed Gaussian-mixture policy over a Box action in [-1, 1]^d, and the mixture-of-experts routing loss
of PMOE (P045, Ren et al., "Probabilistic Mixture-of-Experts for Efficient Deep Reinforcement Learning") (torch).

With K experts (primitives), routing weights w(s) = softmax(logits(s)) and experts N(mu_k(s), diag sigma_k(s)^2)
over the pre-squash action u, a = tanh(u):

    pi(a|s)    = sum_k w_k(s) N(u; mu_k, sigma_k) / prod_i (1 - tanh(u_i)^2)
    log pi     = logsumexp_k (log w_k + log N(u; mu_k, sigma_k)) - sum_i log(1 - tanh(u_i)^2 + eps)
    routing (frequency) loss:  L_w = mean_B sum_k (w_k(s) - 1[k = k*(s)])^2,   k* = argmax_k Q(s, a_k)
"""

from __future__ import annotations

import math

import torch

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
_SQUASH_EPS = 1e-6
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def mixture_inputs_dim(num_experts: int, action_dim: int) -> int:
    """Size of the policy head's output: K routing logits, then K means and K log-stds of size d."""
    return num_experts * (1 + 2 * action_dim)


def split_mixture_inputs(raw: torch.Tensor, num_experts: int, action_dim: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, K (1 + 2d)] -> logits [B, K], mean [B, K, d], log_std [B, K, d] (clamped to [-5, 2])."""
    logits = raw[..., :num_experts]
    params = raw[..., num_experts:].reshape(*raw.shape[:-1], num_experts, 2 * action_dim)
    mean, log_std = params[..., :action_dim], params[..., action_dim:]
    return logits, mean, torch.clamp(log_std, LOG_STD_MIN, LOG_STD_MAX)


def expert_samples(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One reparameterised pre-squash sample u_k = mu_k + sigma_k eps from every expert: [B, K, d]."""
    if noise is None:
        noise = torch.randn_like(mean)
    return mean + log_std.exp() * noise


def mixture_log_prob(u: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
                     ) -> torch.Tensor:
    """log pi(tanh(u)|s) for pre-squash actions u of shape [B, d] or [B, M, d] (M candidate actions per state)."""
    extra = u.dim() - 2  # 0 for [B, d], 1 for [B, M, d]
    u_k = u.unsqueeze(-2)  # [..., 1, d] against the experts' [B, (1,) K, d]
    mean_k, log_std_k = (mean.unsqueeze(1), log_std.unsqueeze(1)) if extra else (mean, log_std)
    log_w = torch.log_softmax(logits, dim=-1)
    if extra:
        log_w = log_w.unsqueeze(1)
    z = (u_k - mean_k) * torch.exp(-log_std_k)
    log_normal = (-0.5 * z.pow(2) - log_std_k - _HALF_LOG_2PI).sum(dim=-1)  # [..., K]
    squash = torch.log(1.0 - torch.tanh(u).pow(2) + _SQUASH_EPS).sum(dim=-1)
    return torch.logsumexp(log_w + log_normal, dim=-1) - squash


def sample_mixture(logits: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Pre-squash samples u ~ sum_k w_k N(mu_k, sigma_k) [B, d]: an expert k ~ w(s), then its Gaussian."""
    k = torch.distributions.Categorical(logits=logits).sample()  # [B]
    index = k.view(-1, 1, 1).expand(-1, 1, mean.shape[-1])
    chosen_mean = mean.gather(1, index).squeeze(1)
    chosen_log_std = log_std.gather(1, index).squeeze(1)
    return chosen_mean + chosen_log_std.exp() * torch.randn_like(chosen_mean)


def routing_frequency_loss(logits: torch.Tensor, best_expert: torch.Tensor) -> torch.Tensor:
    """mean_B sum_k (w_k - onehot(k*)_k)^2: its expected gradient moves w towards how often each expert is best."""
    weights = torch.softmax(logits, dim=-1)
    target = torch.nn.functional.one_hot(best_expert, logits.shape[-1]).to(weights.dtype)
    return (weights - target).pow(2).sum(dim=-1).mean()
