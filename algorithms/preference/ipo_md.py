"""IPO-MD (P021, Calandriello et al. 2024): online IPO whose pairs are sampled from the per-token geometric mixture
pi_theta^(1-beta) pi_ref^beta of the policy and the SFT reference (Nash-MD's regularised sampling):

    L = E_{y_w, y_l ~ sg[pi_mix], judge}[ (h(y_w, y_l) - 1 / (2 tau))^2 ],
    pi_mix(y_t | x, y_<t) ∝ pi_theta(y_t | x, y_<t)^(1 - beta) pi_ref(y_t | x, y_<t)^beta

The loss and sampler live in `online_ipo.py`; this rule only sets mixture_beta = 0.25 (our choice: the paper
sweeps it) so `rlfleet verify --algo ipo_md` checks the MD variant on its own.
"""

from __future__ import annotations

from algorithms.preference.base import pairwise_rule
from algorithms.preference.online_ipo import MIXTURE_OPTION, OnlineIPOConfig


class IPOMDConfig(OnlineIPOConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.mixture_beta = 0.25


RULE = pairwise_rule(
    "ipo_md", "P021", "IPO-MD: the IPO loss on pairs sampled from the geometric mixture of the policy and reference",
    IPOMDConfig, extra_options=(MIXTURE_OPTION,),
)
