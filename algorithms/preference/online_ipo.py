"""Online IPO and IPO-MD (P021): Calandriello et al. 2024, "Human Alignment of Large Language Models through Online
Preference Optimisation".

The IPO loss on a stream of pairs generated online and labelled by a preference oracle (here the scripted
Bradley-Terry judge), with h the log-ratio margin of DPO/IPO:

    L = E_{(y_w, y_l) ~ sampler, judge}[ (h(y_w, y_l) - 1 / (2 tau))^2 ],
    h = log pi_theta(y_w)/pi_ref(y_w) - log pi_theta(y_l)/pi_ref(y_l)          (pi_ref: the SFT policy, fixed)

    online IPO: both responses ~ sg[pi_theta]      (the paper shows this is Nash-MD's self-play)
    IPO-MD:     both responses ~ sg[pi_mix],  pi_mix(y_t | x, y_<t) ∝ pi_theta(y_t|.)^(1-beta) pi_ref(y_t|.)^beta
                                                  per token (Nash-MD's regularised sampling)

`mixture_beta` = beta of the mixture: 0 is online IPO, > 0 IPO-MD (the rule `ipo_md` sets it). The generation
actor samples from the mixture (`PairProducer.set_mixture`, `algorithms/common/geometric_mixture.py`) with the
current weights after every update; the loss is IPO's (`ipo.ipo_loss`), gradients only through the loss (the
sampler is a stop-gradient, as in the paper).

Choices left open, and ours: tau = 0.1 (target margin 5 nats, as our IPO); IPO-MD's beta = 0.25 (ours: the paper
sweeps it); the mixture's reference part is the SFT policy; ties are left out of the loss.
"""

from __future__ import annotations

from typing import Any

from algorithms.options import Option, unit_interval
from algorithms.preference.base import PreferenceConfig, pairwise_rule
from algorithms.preference.ipo import ipo_loss

MIXTURE_OPTION = Option("mixture_beta", "beta of the sampling mixture pi^(1-beta) pi_ref^beta (0 = online IPO, "
                        "> 0 = IPO-MD)", unit_interval, "in [0, 1]")


class OnlineIPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(ipo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1  # tau: target margin 1/(2 tau) = 5 nats
        self.mixture_beta = 0.0

    def training(self, *, mixture_beta: float | None = None, **kwargs: Any) -> OnlineIPOConfig:
        super().training(**kwargs)
        if mixture_beta is not None:
            self.mixture_beta = mixture_beta
        return self

    def producer_mixture(self) -> float:
        return float(self.mixture_beta)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.mixture_beta <= 1.0:
            self._value_error(f"mixture_beta must be in [0, 1], got {self.mixture_beta}")
        if self.pair_source != "policy":
            self._value_error("online IPO / IPO-MD generate their pairs online: pair_source must be 'policy'")


RULE = pairwise_rule(
    "online_ipo", "P021", "Online IPO: the IPO loss on pairs sampled online from the policy (mixture_beta > 0: IPO-MD)",
    OnlineIPOConfig, extra_options=(MIXTURE_OPTION,),
)
