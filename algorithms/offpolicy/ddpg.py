"""DDPG: P171, Lillicrap et al. 2015, "Continuous control with deep reinforcement learning", Algorithm 1, trained
from the Redis replay of `base.py`.

On replayed (s_i, a_i, r_i, s_{i+1}, d_i):

    y_i   = r_i + gamma (1 - d_i) Q'(s_{i+1}, mu'(s_{i+1}))                  (target actor and target critic)
    L     = mean_i (y_i - Q(s_i, a_i))^2                                      (critic)
    grad_theta_mu J ~= mean_i grad_a Q(s_i, a)|_{a = mu(s_i)} grad_theta_mu mu(s_i)   (actor: minimise -mean Q(s, mu(s)))
    theta' <- tau theta + (1 - tau) theta'                                    (both targets, every step)

The paper's own settings (Adam 1e-4 actor / 1e-3 critic, critic L2 1e-2, tau 0.001, batch 64, 400-300 ReLU,
Ornstein-Uhlenbeck noise theta 0.15 sigma 0.2, batch norm) were tuned for 2.5M-step MuJoCo runs. Open choices,
ours, for the 20k-step Pendulum check (RL-Baselines3-Zoo's DDPG Pendulum-v1 settings): Adam 1e-3 for both, no
weight decay or batch norm, tau 0.005, Gaussian exploration N(0, 0.1) instead of OU (Fujimoto et al. 2018 found
no benefit from OU), gamma 0.98; less compute than the zoo (1k instead of 10k uniform-random warm-up steps, one
gradient step on 128 transitions every second env step instead of one on 256 every step), actions normalised to
[-1, 1], `terminated` alone stops the bootstrap. Shares TD3's machinery with one critic,
no target smoothing and no delay (algorithms/offpolicy/deterministic.py).
"""

from __future__ import annotations

from algorithms.offpolicy.deterministic import DeterministicACAlgorithm, DeterministicACConfig
from algorithms.offpolicy.td3 import DETERMINISTIC_AC_OPTIONS
from algorithms.rule import LearningCheck, Rule


class DDPGConfig(DeterministicACConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DDPG)
        self.twin_q = False
        self.policy_delay = 1
        self.target_noise = 0.0

    def validate(self) -> None:
        super().validate()
        if self.twin_q or self.policy_delay != 1 or self.target_noise != 0:
            self._value_error("ddpg has one critic, no delay and no target smoothing (that is td3)")


class DDPG(DeterministicACAlgorithm):
    @classmethod
    def get_default_config(cls) -> DDPGConfig:
        return DDPGConfig()


RULE = Rule(
    name="ddpg",
    family="off-policy",
    paper_ids=("P171",),
    summary="DDPG: deterministic actor, critic TD target through target actor and critic, Redis replay",
    config_class=DDPGConfig,
    options=DETERMINISTIC_AC_OPTIONS,
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-250.0,
        source="RL-Baselines3-Zoo DDPG Pendulum-v1 (n_timesteps 2e4, benchmark mean about -150); P171 reports "
               "Pendulum solved from low-dimensional state"
               "; budget 40k = the zoo's 20k to learn + 20k for the window of the score (the mean of the "
               "last 100 training episodes, 200 steps each on Pendulum)",
    ),
    smoke_overrides={"learning_starts": 64, "random_warmup_steps": 32, "rollout_fragment_length": 128,
                     "samples_per_insert": 2.0, "train_batch_size": 64},
)
