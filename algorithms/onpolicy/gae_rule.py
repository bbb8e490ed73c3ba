"""P158 Generalized Advantage Estimation (Schulman et al. 2016), the paper's own training setup.

The estimator itself lives in `algorithms/onpolicy/gae.py` (any on-policy rule selects it with
`advantage_estimator="gae"`). This rule reproduces the paper's experiments: the policy takes a TRPO step
(P145) on the *raw* advantages

    A_t^{GAE(gamma, lambda)} = sum_{l >= 0} (gamma lambda)^l delta_t+l,   delta_t = r_t + gamma V(s_t+1) - V(s_t)

with gamma = 0.995 and lambda = 0.97 (the paper's best 3D-locomotion setting, section 6.3). The paper fits
V with a trust region as well; here the critic is fitted with Adam (see `trpo.py`).
"""

from __future__ import annotations

from algorithms.onpolicy.trpo import TRPO, TRPO_OPTIONS, TRPOConfig
from algorithms.rule import LearningCheck, Rule


class GAERuleConfig(TRPOConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or GAERule)
        self.gamma = 0.995
        self.lambda_ = 0.97
        self.standardize_advantages = False


class GAERule(TRPO):
    @classmethod
    def get_default_config(cls) -> GAERuleConfig:
        return GAERuleConfig()


RULE = Rule(
    name="gae",
    family="on-policy",
    paper_ids=("P158",),
    summary="the paper's setup: TRPO policy step on raw (unstandardised) GAE(gamma, lambda) advantages",
    config_class=GAERuleConfig,
    options=TRPO_OPTIONS,
    learning_check=LearningCheck("CartPole-v1", 100_000, 400.0,
                                 "as TRPO (the paper's policy step): ~500 on CartPole-v1 within 100k steps"),
)
