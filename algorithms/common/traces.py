"""Multi-step targets on fixed-length replayed windows (torch), shared by n-step DQN, RBIS (P179) and Off-policy
DAE (P191).

A window holds L steps t = 0..L-1 of one episode chunk: rewards r_t, actions a_t, `terminated_t` (the MDP ended
after step t), and a validity `mask_t` (False for padding after the episode or the chunk ended; valid steps are
a prefix). m = sum_t mask_t is the number of real steps, s_m the observation after the last one.

    discounted sum:        G = sum_{t<m} gamma^t x_t,   discount = gamma^m
    n-step target:         y = sum_{t<m} gamma^t r_t + gamma^m (1 - d) V(s_m),  d = terminated at step m-1
    trace coefficients (Daley et al. 2023, P179; beta_0 = 1, rho_t = pi(a_t|s_t) / mu(a_t|s_t)):
        RBIS:              beta_t = min(lambda^t, rho_t beta_{t-1})
        Retrace:           beta_t = lambda min(1, rho_t) beta_{t-1}
        Truncated IS:      beta_t = lambda^t min(1, prod_{i=1..t} rho_i)
    trace target:          G = Q(s_0, a_0) + sum_{t<m} gamma^t beta_t delta_t,
                           delta_t = r_t + gamma (1 - d_t) E_pi Q(s_{t+1}, .) - Q(s_t, a_t)

Note rho_0 never enters (beta_0 = 1): the first action is the one being evaluated.
"""

from __future__ import annotations

import torch

TRACE_KINDS = ("rbis", "retrace", "truncated_is")


def discounted_window_sum(values: torch.Tensor, mask: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_{t<m} gamma^t values_t, gamma^m) per window; values and mask are [B, L]."""
    mask_f = mask.to(values.dtype)
    powers = gamma ** torch.arange(values.shape[-1], dtype=values.dtype, device=values.device)
    total = (values * mask_f * powers).sum(dim=-1)
    return total, gamma ** mask_f.sum(dim=-1)


def window_terminated(terminateds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """True where a valid step of the window ended the MDP (then nothing after it is valid)."""
    return (terminateds.bool() & mask.bool()).any(dim=-1)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """m = number of valid steps per window, i.e. the index of the bootstrap observation s_m in obs[:, 0..L]."""
    return mask.long().sum(dim=-1)


def nstep_target(rewards: torch.Tensor, terminateds: torch.Tensor, mask: torch.Tensor, gamma: float,
                 bootstrap_values: torch.Tensor) -> torch.Tensor:
    """sum_{t<m} gamma^t r_t + gamma^m (1 - d) V(s_m) with V(s_m) given per window [B] (no gradient)."""
    total, discount = discounted_window_sum(rewards, mask, gamma)
    alive = 1.0 - window_terminated(terminateds, mask).to(total.dtype)
    return (total + discount * alive * bootstrap_values).detach()


def epsilon_greedy_probs(q_values: torch.Tensor, epsilon: float) -> torch.Tensor:
    """pi(.|s) of the epsilon-greedy policy in q_values [..., A]: epsilon / A everywhere, plus 1 - epsilon on argmax."""
    num_actions = q_values.shape[-1]
    greedy = torch.nn.functional.one_hot(q_values.argmax(dim=-1), num_actions).to(q_values.dtype)
    return epsilon / num_actions + (1.0 - epsilon) * greedy


def trace_coefficients(ratios: torch.Tensor, mask: torch.Tensor, lambda_: float, kind: str = "rbis") -> torch.Tensor:
    """beta_t [B, L] of P179 from IS ratios rho_t [B, L] (rho_0 is ignored: beta_0 = 1); 0 on padding."""
    if kind not in TRACE_KINDS:
        raise ValueError(f"trace kind must be one of {TRACE_KINDS}, got {kind!r}")
    length = ratios.shape[-1]
    betas = [torch.ones_like(ratios[..., 0])]
    ratio_product = torch.ones_like(ratios[..., 0])
    for t in range(1, length):
        rho = ratios[..., t]
        if kind == "rbis":
            beta = torch.minimum(torch.full_like(rho, lambda_**t), rho * betas[-1])
        elif kind == "retrace":
            beta = lambda_ * torch.clamp(rho, max=1.0) * betas[-1]
        else:
            ratio_product = ratio_product * rho
            beta = lambda_**t * torch.clamp(ratio_product, max=1.0)
        betas.append(beta)
    return torch.stack(betas, dim=-1) * mask.to(ratios.dtype)


def trace_target(q_taken: torch.Tensor, td_errors: torch.Tensor, betas: torch.Tensor, mask: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """Q(s_0, a_0) + sum_{t<m} gamma^t beta_t delta_t: the off-policy multi-step target of P179's operator."""
    correction, _ = discounted_window_sum(betas * td_errors, mask, gamma)
    return (q_taken + correction).detach()
