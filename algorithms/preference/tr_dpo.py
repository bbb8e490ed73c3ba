"""TR-DPO (P236): Trust-Region DPO, from Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment". The DPO loss, with a reference policy that follows the policy during training:

    L = -E[ log sigmoid(beta * h) ],  h = log pi_theta(y_w)/pi_ref(y_w) - log pi_theta(y_l)/pi_ref(y_l)   (DPO)
    soft update (TR-DPO^alpha), every tau updates:  theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    hard update (TR-DPO^tau),   every tau updates:  theta_ref <- theta

Options: `reference_update` ("soft" | "hard"), `reference_alpha` (alpha, soft only), `reference_period` (tau).
The reference moves in each Learner in `after_update`, the same way on every Learner, so N learners keep identical
references (`reset_reference(mix)`, which mixes GPT-2's tied embedding / output matrix once).

Choices the paper leaves open for this setting, and ours: alpha = 0.6 (the paper's best soft value) applied every
tau = 8 updates (the paper counts tau in its own, much longer, training runs; 8 of our 24 check steps gives three
reference moves); pairs online from the current policy (as our DPO); log pi(y|x) the sum over response tokens.
"""

from __future__ import annotations

from typing import Any

from algorithms.options import Option, positive
from algorithms.preference.base import PreferenceConfig, PreferenceLearner, pairwise_rule
from algorithms.preference.dpo import dpo_loss

REFERENCE_UPDATES = ("soft", "hard")


def reference_mix(step: int, update: str, alpha: float, period: int) -> float | None:
    """The mix of `reset_reference` after update `step` (from 1): alpha (soft) or 1 (hard) every `period`
    updates, else None (the reference stays)."""
    if step % period != 0:
        return None
    return alpha if update == "soft" else 1.0


class TRDPOConfig(PreferenceConfig):
    pair_loss_fn = staticmethod(dpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1
        self.reference_update = "soft"
        self.reference_alpha = 0.6
        self.reference_period = 8

    def training(self, *, reference_update: str | None = None, reference_alpha: float | None = None,
                 reference_period: int | None = None, **kwargs: Any) -> TRDPOConfig:
        super().training(**kwargs)
        for name, value in dict(reference_update=reference_update, reference_alpha=reference_alpha,
                                reference_period=reference_period).items():
            if value is not None:
                setattr(self, name, value)
        return self

    def get_default_learner_class(self) -> type:
        return TRDPOLearner

    def validate(self) -> None:
        super().validate()
        if self.reference_update not in REFERENCE_UPDATES:
            self._value_error(f"reference_update must be one of {', '.join(REFERENCE_UPDATES)}, "
                              f"got {self.reference_update!r}")
        if not 0.0 < self.reference_alpha <= 1.0:
            self._value_error(f"reference_alpha must be in (0, 1], got {self.reference_alpha}")
        if not (isinstance(self.reference_period, int) and self.reference_period >= 1):
            self._value_error(f"reference_period must be an integer >= 1, got {self.reference_period}")


class TRDPOLearner(PreferenceLearner):
    def after_update(self, config: TRDPOConfig, step: int) -> None:
        mix = reference_mix(step, config.reference_update, config.reference_alpha, config.reference_period)
        if mix is not None:
            self.reset_reference(mix)


RULE = pairwise_rule(
    "tr_dpo", "P236", "TR-DPO: DPO whose reference follows the policy (soft mixing or a hard copy every tau updates)",
    TRDPOConfig,
    extra_options=(
        Option("reference_update", "soft (theta_ref <- alpha theta + (1-alpha) theta_ref) or hard (copy)",
               lambda x: x in REFERENCE_UPDATES, " or ".join(REFERENCE_UPDATES)),
        Option("reference_alpha", "alpha of the soft reference update", lambda x: x is not None and 0 < x <= 1,
               "in (0, 1]"),
        Option("reference_period", "updates between reference updates (tau)", positive, ">= 1"),
    ),
)
