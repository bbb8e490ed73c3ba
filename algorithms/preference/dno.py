"""DNO (P293): Direct Nash Optimization, batched on-policy (Rosset et al. 2024, "Direct Nash Optimization: Teaching
Language Models to Self-Improve with General Preferences"; its practical Algorithm "DNO-Prct").

Iterations t = 0, 1, ...: sample responses from the current iterate pi_t, have the preference oracle label pairs,
then fit pi_{t+1} with the contrastive (DPO-form) objective whose reference is pi_t itself:

    pi_{t+1} = argmin_pi  -E_{(y_w, y_l) ~ pi_t, judge}[ log sigmoid( beta log pi(y_w)/pi_t(y_w)
                                                                   - beta log pi(y_l)/pi_t(y_l) ) ]

i.e. the regression of DNO onto the soft policy iteration target pi_{t+1} ∝ pi_t exp(r_t / beta) with the
preference-based reward r_t(y) = P(y > pi_t). Here an iteration is `iteration_steps` updates: the generation
actor gets the weights only at iteration ends (every pair of an iteration comes from pi_t) and the reference is
reset to the policy at the same moments (`after_update` -> `reset_reference()`).

Choices, and ours: two samples per prompt labelled by the judge form the pair (DNO-Prct samples K per prompt,
adds a teacher's response and keeps best-vs-worst pairs above a margin; our judge gives only binary labels, so no
margin filter); beta = 0.1; 6 updates per iteration (4 iterations in the 24-step check); the optimiser state is
kept across iterations (the paper re-initialises training from pi_t, which is where the policy is).
"""

from __future__ import annotations

from algorithms.preference.base import (ITERATION_OPTION, IterativePreferenceConfig, PreferenceLearner,
                                        pairwise_rule)
from algorithms.preference.dpo import dpo_loss


class DNOConfig(IterativePreferenceConfig):
    pair_loss_fn = staticmethod(dpo_loss)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.beta = 0.1

    def get_default_learner_class(self) -> type:
        return DNOLearner


class DNOLearner(PreferenceLearner):
    def after_update(self, config: DNOConfig, step: int) -> None:
        if config.iteration_ends(step):  # pi_{t+1} becomes the next iteration's reference
            self.reset_reference(1.0)


RULE = pairwise_rule(
    "dno", "P293", "DNO: iterated on-policy contrastive (DPO-form) regression with the previous iterate as reference",
    DNOConfig, extra_options=(ITERATION_OPTION,),
)
