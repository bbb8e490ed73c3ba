"""Shared math of P009's momentum policy-gradient methods, N-PG-IGT and (N)-HARPG (Fatkhullin, Barakat, Kireeva,
He 2023, "Stochastic Policy Gradient Methods: Improved Sample Complexity for Fisher-non-degenerate Policies").

Both ascend J(theta) = E[sum_h gamma^h r_h] with trajectory estimators (no importance sampling):

    gradient (GPOMDP):  g(tau, theta)   = sum_h gamma^h Psi_h grad log pi(a_h|s_h)
    Hessian:            B(tau, theta) v = grad Phi(tau) (grad log p(tau) . v) + grad (grad Phi(tau) . v)
    with                Phi(tau)        = sum_h gamma^h Psi_h log pi(a_h|s_h),  log p(tau) = sum_h log pi(a_h|s_h)

where Psi_h = sum_{k >= h} gamma^(k-h) r_k - b(s_h) (the paper's reward-to-go, here minus a learned baseline b,
which leaves both estimators unbiased and is what the paper's experiments use) and the Psi_h are held constant.
E[B(tau, theta)] = Hessian of J (the policy-Hessian estimator the paper takes from Shen et al. 2019). A batch of
M trajectories averages both: J_hat = (1/M) sum_i Phi(tau_i).

Momentum and steps (ascent form, d_t estimates grad J):

    N-PG-IGT: theta~_t = theta_t + (1 - eta_t)/eta_t (theta_t - theta_{t-1});  tau_t ~ pi(theta~_t)
              d_t = (1 - eta_t) d_{t-1} + eta_t g(tau_t, theta~_t);  theta_{t+1} = theta_t + gamma_t d_t / ||d_t||
    HARPG:    q_t ~ U(0, 1); theta^_t = q_t theta_t + (1 - q_t) theta_{t-1};  tau_t ~ pi(theta_t), tau^_t ~ pi(theta^_t)
              v_t = B(tau^_t, theta^_t)(theta_t - theta_{t-1})
              d_t = (1 - eta_t)(d_{t-1} + v_t) + eta_t g(tau_t, theta_t)
              theta_{t+1} = theta_t + gamma_t d_t / ||d_t||  (N-HARPG)   or   theta_t + gamma_t d_t  (HARPG)

Schedules (t = 0, 1, ...; eta_0 = 1 makes d_0 = g_0), those of the authors' experiment code:
    N-PG-IGT: gamma_t = gamma_0 * 2/(t+2),  eta_t = eta_0 * (2/(t+2))^(4/5)
    N-HARPG:  gamma_t = gamma_0 * 2/(t+2),  eta_t = eta_0 * 2/(t+2);   HARPG: gamma_t = gamma_0 * (2/(t+2))^(1/2)
"""

from __future__ import annotations

import torch


def npg_igt_schedule(t: int, gamma_0: float, eta_0: float) -> tuple[float, float]:
    """(gamma_t, eta_t) of N-PG-IGT."""
    decay = 2.0 / (t + 2.0)
    return gamma_0 * decay, min(1.0, eta_0 * decay ** 0.8)


def harpg_schedule(t: int, gamma_0: float, eta_0: float, normalized: bool) -> tuple[float, float]:
    """(gamma_t, eta_t) of N-HARPG (normalized) or HARPG."""
    decay = 2.0 / (t + 2.0)
    return gamma_0 * (decay if normalized else decay ** 0.5), min(1.0, eta_0 * decay)


def igt_extrapolation(theta: torch.Tensor, theta_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """theta + (1 - eta)/eta (theta - theta_prev): where IGT evaluates the next gradient."""
    return theta + (1.0 - eta) / eta * (theta - theta_prev)


def momentum_direction(d_prev: torch.Tensor | None, g: torch.Tensor, eta: float,
                       correction: torch.Tensor | None = None) -> torch.Tensor:
    """d_t = (1 - eta)(d_{t-1} + correction) + eta g; the first direction (no d_{t-1}) is g itself."""
    if d_prev is None:
        return g.clone()
    carried = d_prev if correction is None else d_prev + correction
    return (1.0 - eta) * carried + eta * g


def ascent_step(theta: torch.Tensor, d: torch.Tensor, gamma: float, normalized: bool) -> torch.Tensor:
    """theta + gamma d/||d|| (normalized; no move when d = 0) or theta + gamma d."""
    if not normalized:
        return theta + gamma * d
    norm = torch.linalg.vector_norm(d)
    return theta + gamma * d / norm if norm > 0 else theta.clone()


def trajectory_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a batch of whole episodes, each followed by one phantom row (mask False, see gae.py):
    (trajectory id of every real row, step index h of every real row, number of trajectories)."""
    mask = mask.bool()
    phantom = ~mask
    ids = torch.cumsum(phantom.long(), 0) - phantom.long()  # phantom row k closes trajectory k
    real_ids = ids[mask]
    num = int(real_ids.max()) + 1 if real_ids.numel() else 0
    starts = torch.zeros(num, dtype=torch.long, device=mask.device)
    real_positions = torch.arange(mask.numel(), device=mask.device)[mask]
    starts.scatter_reduce_(0, real_ids, real_positions, reduce="amin", include_self=False)
    steps = real_positions - starts[real_ids]
    return real_ids, steps, num


def trajectory_terms(logp: torch.Tensor, psi: torch.Tensor, steps: torch.Tensor, traj: torch.Tensor,
                     num_traj: int, discount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per trajectory: Phi(tau_i) = sum_h gamma^h Psi_h log pi_h and log p(tau_i) = sum_h log pi_h."""
    weights = (discount ** steps.to(logp.dtype)) * psi.detach()
    phi = torch.zeros(num_traj, dtype=logp.dtype, device=logp.device).index_add(0, traj, weights * logp)
    log_p = torch.zeros(num_traj, dtype=logp.dtype, device=logp.device).index_add(0, traj, logp)
    return phi, log_p


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """d output / d params as one vector; parameters the output does not depend on get zeros."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1) for p, g in zip(params, grads)])


def policy_hessian_vector_product(phi: torch.Tensor, log_p: torch.Tensor, params: list[torch.Tensor],
                                  v: torch.Tensor) -> torch.Tensor:
    """(1/M) sum_i B(tau_i) v from per-trajectory Phi and log p (both with graph to `params`)."""
    num = phi.numel()
    grad_j = flat_grad(phi.sum() / num, params, create_graph=True)
    curvature = flat_grad(grad_j @ v, params, retain_graph=True)  # grad(grad J_hat . v)
    # s_i = grad log p(tau_i) . v for every trajectory at once: differentiate sum_i w_i grad log p_i . v in w.
    w = torch.ones(num, dtype=log_p.dtype, device=log_p.device, requires_grad=True)
    weighted = flat_grad((w * log_p).sum(), params, create_graph=True, retain_graph=True)
    (s,) = torch.autograd.grad(weighted @ v, w, retain_graph=True)
    score_term = flat_grad((s.detach() * phi).sum() / num, params, retain_graph=True)
    return score_term + curvature
