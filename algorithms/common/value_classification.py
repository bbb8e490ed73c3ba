"""P127 Farebrother et al. 2024, "Stop Regressing: Training Value Functions via Classification for Scalable
Deep RL": a value is a categorical distribution over fixed bins, trained by cross-entropy against a categorical
projection of the scalar (bootstrapped) target.

Support: m bins of width w = (v_max - v_min) / m over [v_min, v_max]; edges e_i = v_min + i w (i = 0..m),
centres z_i = (e_i + e_{i+1}) / 2. A prediction is logits l in R^m, p = softmax(l), and its value is

    V = sum_i p_i z_i                                                                    (expected value)

The scalar target y (clipped into [v_min, v_max]) becomes a distribution q(y) over the bins:

    HL-Gauss:  q_i = (Phi((e_{i+1} - y) / sigma) - Phi((e_i - y) / sigma)) / Z,
               Z   = Phi((e_m - y) / sigma) - Phi((e_0 - y) / sigma)          (sigma = 0.75 w, the paper's choice)
    two-hot:   the two centres around y share its mass linearly: q_k = (z_{k+1} - y) / w, q_{k+1} = (y - z_k) / w
               (y below z_0 or above z_{m-1}: all of it on the outermost bin)

    loss = - sum_i q_i log softmax(l)_i                                                   (cross-entropy)

Phi is the standard normal CDF; the normalisation Z puts the Gaussian mass that falls outside the support back
into it (the paper's "histogram loss" with a truncated Gaussian).
"""

from __future__ import annotations

import math

import torch

from algorithms.options import Option, positive

VALUE_LOSSES = ("hl_gauss", "two_hot")
SIGMA_RATIO = 0.75  # sigma / bin width: the paper's recommended smoothing (section 3.1, figure 4)

# What `--set` may change in a rule with a classification value head (checked again by `validate_support`).
SUPPORT_OPTIONS: tuple[Option, ...] = (
    Option("value_loss", "hl_gauss (Gaussian-smoothed histogram) or two_hot", lambda x: x in VALUE_LOSSES,
           " or ".join(VALUE_LOSSES)),
    Option("num_bins", "value bins m", lambda x: isinstance(x, int) and x >= 2, "an integer >= 2"),
    Option("value_min", "lower end of the value support"),
    Option("value_max", "upper end of the value support (> value_min)"),
    Option("sigma_ratio", "HL-Gauss sigma / bin width (0.75 in P127)", positive, "> 0"),
)


def bin_edges(v_min: float, v_max: float, num_bins: int) -> torch.Tensor:
    """The m + 1 edges of m equal bins over [v_min, v_max]."""
    if not v_max > v_min:
        raise ValueError(f"v_max ({v_max}) must be > v_min ({v_min})")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    return torch.linspace(v_min, v_max, num_bins + 1)


def bin_centers(v_min: float, v_max: float, num_bins: int) -> torch.Tensor:
    edges = bin_edges(v_min, v_max, num_bins)
    return 0.5 * (edges[:-1] + edges[1:])


def hl_gauss_probs(targets: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """HL-Gauss target distribution of each scalar target: shape targets.shape + (m,)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    edges = edges.to(targets.device, targets.dtype)
    y = targets.clamp(float(edges[0]), float(edges[-1])).unsqueeze(-1)
    cdf = 0.5 * (1.0 + torch.erf((edges - y) / (sigma * math.sqrt(2.0))))
    mass = cdf[..., 1:] - cdf[..., :-1]
    return mass / (cdf[..., -1:] - cdf[..., :1])


def two_hot_probs(targets: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Two-hot target distribution of each scalar target on equally spaced centres: shape targets.shape + (m,)."""
    centers = centers.to(targets.device, targets.dtype)
    m = centers.shape[0]
    width = centers[1] - centers[0]
    y = targets.clamp(float(centers[0]), float(centers[-1]))
    position = (y - centers[0]) / width  # fractional bin index in [0, m - 1]
    lower = position.floor().clamp(max=m - 2)
    upper_weight = position - lower  # 1 exactly at the last centre
    probs = torch.zeros(*targets.shape, m, dtype=targets.dtype, device=targets.device)
    index = lower.long().unsqueeze(-1)
    probs.scatter_(-1, index, (1.0 - upper_weight).unsqueeze(-1))
    probs.scatter_add_(-1, index + 1, upper_weight.unsqueeze(-1))
    return probs


def target_probs(targets: torch.Tensor, v_min: float, v_max: float, num_bins: int, kind: str = "hl_gauss",
                 sigma_ratio: float = SIGMA_RATIO) -> torch.Tensor:
    """The categorical target of `kind` ("hl_gauss" or "two_hot") for scalar targets (no gradient)."""
    targets = targets.detach()
    if kind == "hl_gauss":
        width = (v_max - v_min) / num_bins
        return hl_gauss_probs(targets, bin_edges(v_min, v_max, num_bins), sigma_ratio * width)
    if kind == "two_hot":
        return two_hot_probs(targets, bin_centers(v_min, v_max, num_bins))
    raise ValueError(f"unknown value loss {kind!r}; valid: {', '.join(VALUE_LOSSES)}")


def cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """- sum_i q_i log softmax(l)_i over the last axis (per sample)."""
    return -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)


def expected_value(logits: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """sum_i softmax(l)_i z_i over the last axis."""
    return (torch.softmax(logits, dim=-1) * centers.to(logits.device, logits.dtype)).sum(-1)


def classification_value_loss(logits: torch.Tensor, targets: torch.Tensor, v_min: float, v_max: float,
                              kind: str = "hl_gauss", sigma_ratio: float = SIGMA_RATIO) -> torch.Tensor:
    """Per-sample cross-entropy of bin logits [..., m] against the categorical projection of scalar targets [...]."""
    probs = target_probs(targets, v_min, v_max, logits.shape[-1], kind, sigma_ratio)
    return cross_entropy(logits, probs)


class ValueSupportConfigMixin:
    """The value-support fields of a rule config (mix in before its AlgorithmConfig): defaults, `training()`
    keywords, range checks. Defaults cover returns in [0, 100] (CartPole, gamma 0.99) with a margin: 120 bins of
    width 1 on [-10, 110]."""

    SUPPORT_FIELDS = ("value_loss", "num_bins", "value_min", "value_max", "sigma_ratio")

    def _init_value_support(self) -> None:
        self.value_loss = "hl_gauss"
        self.num_bins = 120
        self.value_min = -10.0
        self.value_max = 110.0
        self.sigma_ratio = SIGMA_RATIO

    def training(self, **kwargs):
        support = {name: kwargs.pop(name) for name in self.SUPPORT_FIELDS if name in kwargs}
        super().training(**kwargs)
        for name, value in support.items():
            setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        validate_support(self)


def validate_support(config) -> None:
    """Range checks of a rule config's value_loss / num_bins / value_min / value_max / sigma_ratio fields."""
    if config.value_loss not in VALUE_LOSSES:
        config._value_error(f"value_loss={config.value_loss!r} is unknown; valid: {', '.join(VALUE_LOSSES)}")
    if not isinstance(config.num_bins, int) or isinstance(config.num_bins, bool) or config.num_bins < 2:
        config._value_error(f"num_bins must be an integer >= 2, got {config.num_bins!r}")
    if not config.value_max > config.value_min:
        config._value_error(f"value_max ({config.value_max}) must be > value_min ({config.value_min})")
    if not config.sigma_ratio > 0:
        config._value_error(f"sigma_ratio must be > 0, got {config.sigma_ratio}")
