"""f-divergences D_f(p || q) = E_q[f(p/q)] through the derivative f' of their generator, on log-ratios.

Rules that regularise a policy towards a reference with an f-divergence (f-DPO, P073) get a closed-form reward
r(x, y) = beta f'(pi(y|x) / pi_ref(y|x)) + const. Sequence ratios u = pi/pi_ref under- and overflow as plain
numbers, so every f' here takes log u and stays in log space where it can:

    divergence   f(u)                                          f'(u)                    in log u = l
    reverse_kl   u log u                                       log u + 1                l + 1
    forward_kl   -log u                                        -1/u                     -exp(-l)
    js           u log u - (u + 1) log((u + 1) / 2)            log(2u / (1 + u))        log 2 + l - softplus(l)
    alpha        (u^(1-a) - (1-a) u - a) / (a (a - 1))         (1 - u^(-a)) / a         (1 - exp(-a l)) / a

(Wang et al. 2023, "Beyond Reverse KL" (P073); alpha in (0, 1): alpha -> 0 is reverse KL, alpha -> 1 forward KL.)
"""

from __future__ import annotations

import math

import torch

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# exp(-a l) for a policy far below its reference (l very negative) overflows float32 near 88; 50 keeps the
# gradient finite while being far outside anything a sane run reaches (u = e^-50).
MAX_EXPONENT = 50.0


def f_prime(log_ratio: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = exp(log_ratio), elementwise, for the divergences of F_DIVERGENCES."""
    if divergence == "reverse_kl":
        return log_ratio + 1.0
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-log_ratio, max=MAX_EXPONENT))
    if divergence == "js":
        return math.log(2.0) + log_ratio - torch.nn.functional.softplus(log_ratio)
    if divergence == "alpha":
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"the alpha-divergence needs alpha in (0, 1), got {alpha}")
        return (1.0 - torch.exp(torch.clamp(-alpha * log_ratio, max=MAX_EXPONENT))) / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}; valid: {', '.join(F_DIVERGENCES)}")
