"""Nash-MP (P080): Nash Mirror Prox (Tiapkin et al. 2025, "Accelerating Nash Learning from Human Feedback via
Mirror Prox"), for the beta-regularised preference game. Each iteration k takes an extragradient pair of proximal
steps, both centred at pi_k:

    pi_{k+1/2} = argmin_pi  (1/beta) P(pi_k > pi)       + KL(pi || pi_ref) + (1/eta) KL(pi || pi_k)
    pi_{k+1}   = argmin_pi  (1/beta) P(pi_{k+1/2} > pi) + KL(pi || pi_ref) + (1/eta) KL(pi || pi_k)

A step against an opponent mu has the closed form pi ∝ pi_ref^a pi_k^(1-a) exp(c P(y > mu)) with
a = eta/(1+eta), c = eta/(beta (1+eta)). We solve each step from pairs y, y' ~ mu labelled by the judge with the
squared regression whose minimiser is that closed form:

    L = E_{y_w, y_l ~ mu}[ (h - c/2)^2 ],
    h = log pi(y_w)/pi(y_l) - a log pi_ref(y_w)/pi_ref(y_l) - (1-a) log pi_k(y_w)/pi_k(y_l)

(`algorithms.common.proximal_preference`). Schedule: `iteration_steps` updates per half step. In the first
half the generation actor samples from pi_k (mu = pi_k); at its end the actor gets the policy, pi_{k+1/2}, and
samples from it for the second half (mu = pi_{k+1/2}) while the anchor stays pi_k; after the second half the
anchor becomes pi_{k+1} and the actor gets it.

Choices, and ours: the paper's practical LLM version approximates each prox step by a few stochastic policy-
gradient steps using a preference model's win probabilities; with only a pairwise judge we use the regression
above instead (same minimiser). The second step starts its parameters from pi_{k+1/2} (the minimiser does not
depend on the start). beta = 0.1, eta = 1 (a = 0.5, c = 5: target margin 2.5 nats), 3 updates per half step
(4 iterations in the 24-step check); Adam state kept throughout; ties left out.
"""

from __future__ import annotations

import torch

from algorithms.common.proximal_preference import proximal_regression_loss
from algorithms.options import Option, positive
from algorithms.preference.base import AnchoredPreferenceLearner, pairwise_rule
from algorithms.preference.inpo import MirrorStepConfig


def prox_coefficients(beta: float, eta: float) -> tuple[float, float]:
    """(a, c) of the prox step's closed form: the reference's weight eta/(1+eta), the win-rate step
    eta/(beta (1+eta))."""
    return eta / (1.0 + eta), eta / (beta * (1.0 + eta))


def nash_mp_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, anchor_chosen: torch.Tensor, anchor_rejected: torch.Tensor, beta: float,
                 eta: float) -> dict[str, torch.Tensor]:
    """Per-pair terms of one Nash-MP proximal step (the same loss for both half steps; only the data differs)."""
    a, c = prox_coefficients(beta, eta)
    return proximal_regression_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, anchor_chosen,
                                    anchor_rejected, ref_weight=a, step=c)


class NashMPConfig(MirrorStepConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.eta = 1.0
        self.iteration_steps = 3  # per half step: an iteration (two half steps) is 6 updates

    def get_default_learner_class(self) -> type:
        return NashMPLearner

    def validate(self) -> None:
        super().validate()
        if self.pair_source != "policy":
            self._value_error("Nash-MP samples its opponents online: pair_source must be 'policy'")

    def iteration_completes(self, step: int) -> bool:
        """True after the second half step of an iteration (pi_{k+1} reached)."""
        return step % (2 * self.iteration_steps) == 0


class NashMPLearner(AnchoredPreferenceLearner):
    def pair_loss(self, config: NashMPConfig, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return nash_mp_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.anchor_logp[:, 0],
                            self.anchor_logp[:, 1], config.beta, config.eta)

    def after_update(self, config: NashMPConfig, step: int) -> None:
        if config.iteration_completes(step):
            self.set_anchor("policy")  # pi_{k+1} is the next prox centre


RULE = pairwise_rule(
    "nash_mp", "P080", "Nash-MP: mirror-prox (extragradient) steps on the regularised preference game, each solved "
    "by a squared regression on judged pairs", NashMPConfig,
    extra_options=(Option("iteration_steps", "updates per half step (the actor re-syncs after each)", positive,
                          ">= 1"),
                   Option("eta", "mirror-prox step size", positive, "> 0")),
)
