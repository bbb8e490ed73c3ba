"""A separate Adam optimizer for the policy's parameters, next to a critic optimizer a learner already registered.

Rules that step the policy and fit the critic separately (TRPO-style critic fit, with a first-order policy step:
SubPO P032, and MDPO P010 could use it too) register the critic's optimizer as TRPOLearner does and the policy's
with this helper, so each step only touches its own parameters.
"""

from __future__ import annotations

from typing import Callable

import torch

POLICY_OPTIMIZER = "policy"


def register_policy_optimizer(learner, module_id: str, lr: float, is_value_param: Callable[[str], bool]) -> None:
    """Register Adam at `lr` over the module's parameters for which `is_value_param(name)` is False."""
    module = learner._module[module_id]
    policy_params = [p for n, p in module.named_parameters() if not is_value_param(n)]
    learner.register_optimizer(
        module_id=module_id,
        optimizer_name=POLICY_OPTIMIZER,
        optimizer=torch.optim.Adam(policy_params),
        params=policy_params,
        lr_or_lr_schedule=lr,
    )
