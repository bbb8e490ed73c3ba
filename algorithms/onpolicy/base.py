"""The on-policy engine every PG / trust-region rule shares: RLlib's PPO data flow, our advantage step.

RLlib's `PPO` algorithm already does what on-policy rules need (synchronous sampling on EnvRunner actors,
a learner update on the fresh episodes, weights back to the runners). A rule changes two things at most:

- the loss (`compute_loss_for_module` in its learner), or its whole update (`_uncompiled_update`);
- its options (an `OnPolicyConfig` subclass with its own defaults and `training()` keywords).

This module swaps RLlib's built-in GAE piece for the selectable advantage estimators of
`ADVANTAGE_ESTIMATORS` (GAE, P158, with a switch for raw advantages).
"""

from __future__ import annotations

from typing import Any, Callable

from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.utils.annotations import override
from ray.rllib.utils.from_config import NotProvided

from algorithms.onpolicy.gae import GAEConnector

# name -> factory(config) building the learner connector piece that writes ADVANTAGES and VALUE_TARGETS.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Any], ConnectorV2]] = {
    "gae": lambda config: GAEConnector(
        gamma=config.gamma, lambda_=config.lambda_, standardize_advantages=config.standardize_advantages
    ),
}


class OnPolicyConfig(PPOConfig):
    """PPOConfig plus the options every on-policy rule shares."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OnPolicyAlgorithm)
        self.advantage_estimator = "gae"
        # False = the paper's raw advantages (P158); True = per-batch standardisation (most PPO code).
        self.standardize_advantages = True
        # None = plain squared value error; a float = clip the value change around the old prediction.
        self.value_clip = None
        # RLlib's PPO defaults to the KL penalty on; the clipped rule (P147 eq. 7) does not use it.
        self.use_kl_loss = False
        # One EnvRunner actor: experience comes through the real Ray path; the learner runs in the driver.
        self.num_env_runners = 1
        # Separate 64-64 tanh MLPs for policy and value: the PPO/TRPO papers' networks.
        self._model_config = {"fcnet_hiddens": [64, 64], "fcnet_activation": "tanh", "vf_share_layers": False}

    @override(PPOConfig)
    def training(
        self,
        *,
        advantage_estimator: str = NotProvided,
        standardize_advantages: bool = NotProvided,
        value_clip: float | None = NotProvided,
        **kwargs,
    ) -> "OnPolicyConfig":
        super().training(**kwargs)
        if advantage_estimator is not NotProvided:
            self.advantage_estimator = advantage_estimator
        if standardize_advantages is not NotProvided:
            self.standardize_advantages = standardize_advantages
        if value_clip is not NotProvided:
            self.value_clip = value_clip
        return self

    @override(PPOConfig)
    def validate(self) -> None:
        super().validate()
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            self._value_error(
                f"advantage_estimator={self.advantage_estimator!r} is unknown; "
                f"valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
            )
        if self.value_clip is not None and self.value_clip <= 0:
            self._value_error(f"value_clip must be > 0 or None, got {self.value_clip}")


class OnPolicyAlgorithm(PPO):
    """RLlib's PPO training step (sample -> learner update -> sync weights), with our config class."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> OnPolicyConfig:
        return OnPolicyConfig()


class OnPolicyLearner(PPOTorchLearner):
    """PPOTorchLearner whose advantage step is the rule's selected estimator instead of RLlib's GAE."""

    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.remove("GeneralAdvantageEstimation")
            self._learner_connector.append(ADVANTAGE_ESTIMATORS[self.config.advantage_estimator](self.config))
