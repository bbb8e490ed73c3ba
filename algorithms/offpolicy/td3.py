"""TD3: Fujimoto, van Hoof & Meger 2018, "Addressing Function Approximation Error in Actor-Critic Methods" (ICML;
not in the seed catalogue, id "TD3-2018"), Algorithm 1, trained from the Redis replay of `base.py`.

On replayed (s, a, r, s', d):

    a~'     = clip(mu_target(s') + clip(eps, -c, c), -1, 1),   eps ~ N(0, sigma~^2)      (target policy smoothing)
    y       = r + gamma (1 - d) min_{i=1,2} Q_target_i(s', a~')                          (clipped double Q)
    J_Q     = sum_{i=1,2} mean_B (Q_i(s, a) - y)^2                                        (every gradient step)
    J_mu    = -mean_B Q_1(s, mu(s))                      (every d-th gradient step: delayed policy updates)
    targets <- tau theta + (1 - tau) targets             (on the same d-th steps, actor and both critics)

Paper values: sigma~ = 0.2, c = 0.5, d = 2, tau = 0.005, exploration N(0, 0.1), 400-300 ReLU nets, Adam 1e-3,
batch 100 (we use 256), uniform-random actions for the first steps. Open choices, ours: actions normalised to
[-1, 1] (noise scales are relative to that range), RL-Baselines3-Zoo's Pendulum-v1 settings for the check (gamma
0.98, replay 200k) except the amount of compute: 1k (not 10k) uniform-random warm-up steps and one gradient step on
128 transitions every second env step (samples_per_insert 64; the zoo: one on 256 every step), to fit the shared
2-core machine; `terminated` alone stops the bootstrap.
"""

from __future__ import annotations

from algorithms.offpolicy.base import OFFPOLICY_OPTIONS
from algorithms.offpolicy.deterministic import DeterministicACAlgorithm, DeterministicACConfig
from algorithms.options import Option, non_negative, positive
from algorithms.rule import LearningCheck, Rule

DETERMINISTIC_AC_OPTIONS = tuple(o for o in OFFPOLICY_OPTIONS if o.name != "target_update_interval") + (
    Option("actor_lr", "actor Adam step size", positive, "> 0"),
    Option("critic_lr", "critic Adam step size", positive, "> 0"),
    Option("exploration_noise", "std of the Gaussian action noise while acting (actions in [-1, 1])",
           non_negative, ">= 0"),
    Option("random_warmup_steps", "env steps of uniform-random actions before the actor acts", non_negative, ">= 0"),
)


class TD3Config(DeterministicACConfig):
    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TD3)


class TD3(DeterministicACAlgorithm):
    @classmethod
    def get_default_config(cls) -> TD3Config:
        return TD3Config()


RULE = Rule(
    name="td3",
    family="off-policy",
    paper_ids=("TD3-2018",),
    summary="TD3: clipped double Q, target policy smoothing, delayed actor/target updates, Redis replay",
    config_class=TD3Config,
    options=DETERMINISTIC_AC_OPTIONS + (
        Option("policy_delay", "critic steps per actor and target step (d)", positive, ">= 1"),
        Option("target_noise", "std of the target-policy smoothing noise", non_negative, ">= 0"),
        Option("target_noise_clip", "clip of the target-policy smoothing noise (c)", non_negative, ">= 0"),
    ),
    learning_check=LearningCheck(
        env="Pendulum-v1", steps=40_000, threshold=-250.0,
        source="RL-Baselines3-Zoo TD3 Pendulum-v1 (n_timesteps 2e4, benchmark mean about -150)"
               "; budget 40k = the zoo's 20k to learn + 20k for the window of the score (the mean of the "
               "last 100 training episodes, 200 steps each on Pendulum)",
    ),
    smoke_overrides={"learning_starts": 64, "random_warmup_steps": 32, "rollout_fragment_length": 128,
                     "samples_per_insert": 2.0, "train_batch_size": 64},
)
