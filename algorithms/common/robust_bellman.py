"""P157 Patterson, Liao & White 2022, "Robust Losses for Learning Value Functions": a Bellman error under a robust
loss l, minimised through its saddle-point (conjugate) form with a second estimator h of the expected TD error.

For a convex loss l with conjugate l*, l(x) = max_h (h x - l*(h)), so for the TD error
delta = r + gamma (1 - d) Q(s', a') - Q(s, a):

    E[ l(E[delta | s, a]) ] = max_h E[ h(s, a) delta - l*(h(s, a)) ]                           (saddle point)

    squared  l(x) = x^2 / 2                 l*(h) = h^2 / 2,                 h* = E[delta | s, a]
    Huber    l(x) = Huber_tau(x)            l*(h) = h^2 / 2 on |h| <= tau,    h* = clip(E[delta | s, a], -tau, tau)
    absolute l(x) = |x|                     l*(h) = 0 on |h| <= 1,            h* = sign(E[delta | s, a])

i.e. h* = psi(E[delta | s, a]) with psi = l' (identity, clip to [-tau, tau], sign). The minimising player moves
theta along the saddle's gradient at h:

    saddle      Delta theta ∝ E[ h (grad Q(s, a) - gamma (1 - d) grad Q(s', a')) ]            (GTD2-like)
    correction  Delta theta ∝ E[ psi(delta) grad Q(s, a) - gamma (1 - d) h grad Q(s', a') ]   (TDC/QRC-like)

The correction form replaces E[h* grad Q(s, a)] by its one-sample estimate E[psi(delta) grad Q(s, a)] (exact for
the squared loss, where it is QC/TDC, and for any loss when delta is a deterministic function of (s, a)); its first
term is the familiar clipped (Huber) semi-gradient TD update and the second corrects it into a gradient.

The estimator: a function g(s, a) regressed on the TD error (least squares, so g -> E[delta | s, a]) with TDRC's
regulariser beta (applied by the rule as weight decay), and h = psi(g), which is the conjugate's maximiser h* in the
tabular limit. As losses for autograd (a detached factor is a constant):

    L_theta = mean_B [ -psi(delta) Q(s, a) + gamma (1 - d) [h] Q(s', a') ]                   (correction)
    L_theta = mean_B [ [h] (-Q(s, a) + gamma (1 - d) Q(s', a')) ]                             (saddle)
    L_g     = mean_B [ (delta - g(s, a))^2 / 2 ]
"""

from __future__ import annotations

import torch

BELLMAN_LOSSES = ("huber", "absolute", "squared")
GRADIENT_FORMS = ("correction", "saddle")


def dual_link(x: torch.Tensor, loss: str, tau: float = 1.0) -> torch.Tensor:
    """psi = l': the conjugate's maximiser h* for a conditional mean TD error x."""
    if loss == "squared":
        return x
    if loss == "huber":
        return x.clamp(-tau, tau)
    if loss == "absolute":
        return torch.sign(x)
    raise ValueError(f"unknown bellman_loss {loss!r}; valid: {', '.join(BELLMAN_LOSSES)}")


def robust_bellman_losses(q_taken: torch.Tensor, next_q_online: torch.Tensor, td_error: torch.Tensor,
                          h_estimate: torch.Tensor, terminateds: torch.Tensor, gamma: float | torch.Tensor,
                          loss: str = "huber", tau: float = 1.0, form: str = "correction",
                          weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The value and estimator losses of one minibatch (all [B]).

    q_taken: Q(s, a; theta); next_q_online: Q(s', a'; theta) at the bootstrap action (the gradient's second
    path); td_error: delta (its bootstrap may come from a target copy; treated as a constant); h_estimate:
    g(s, a), the estimator's unconstrained output; gamma: a float or [B] bootstrap discounts (n-step records);
    weights: [B] per-sample weights of the means (prioritised replay), or None.
    """
    if form not in GRADIENT_FORMS:
        raise ValueError(f"unknown gradient form {form!r}; valid: {', '.join(GRADIENT_FORMS)}")
    delta = td_error.detach()
    h = dual_link(h_estimate.detach(), loss, tau)
    discount = gamma * (1.0 - terminateds.float())
    first = h if form == "saddle" else dual_link(delta, loss, tau)
    weights = torch.ones_like(delta) if weights is None else weights
    value_loss = (weights * (-first * q_taken + discount * h * next_q_online)).mean()
    h_loss = 0.5 * (weights * (delta - h_estimate) ** 2).mean()
    return {"value_loss": value_loss, "h_loss": h_loss, "h": h}
