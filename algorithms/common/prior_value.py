"""A frozen value estimate read from an earlier run's checkpoint (P272's "prior computation").

`PriorValue(path)` loads the RLModule of an rlfleet run directory (or checkpoint) with the observation filter it
was trained with, and maps a batch of raw observations to one value per row:

    V_prior(s) = V_old(s)              when the checkpoint has a critic (ValueFunctionAPI: ppo, trpo, ...)
    V_prior(s) = max_a Q_old(s, a)     when it has a Q-network (dqn): the greedy policy's value under Q_old

No gradient flows into it and it is not part of the new module's weights (it is reloaded from `path`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from ray.rllib.algorithms.dqn.dqn_learner import QF_PREDS
from ray.rllib.core.columns import Columns

from rlfleet.errors import UserError


class PriorValue:
    """Frozen V_prior(s) from a checkpoint; call it on a float tensor of raw observations [B, *obs_shape]."""

    def __init__(self, path: str | Path) -> None:
        from services.policy import LoadedPolicy  # serving's loader: checkpoint layout, filters, validation

        self.policy = LoadedPolicy.from_checkpoint(path)
        module = self.policy.module
        if self.policy.has_value_function:
            self.kind = "critic"
        elif hasattr(module, "compute_q_values"):
            self.kind = "q_max"
        else:
            raise UserError(f"{self.policy.checkpoint}: its RLModule has neither a critic (compute_values) nor a "
                            "Q-network (compute_q_values), so it gives no value estimate")
        module.requires_grad_(False)
        self.observation_shape = tuple(self.policy.observation_space.shape)

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.detach().cpu().numpy()
        if self.policy.obs_filter is not None:
            x = self.policy.obs_filter(x)
        batch = {Columns.OBS: torch.as_tensor(x, dtype=torch.float32)}
        module = self.policy.module
        if self.kind == "critic":
            values = module.compute_values(batch)
        else:
            q = module.compute_q_values(batch)[QF_PREDS]
            values = q.max(dim=-1).values
        return values.reshape(-1).to(device=obs.device, dtype=torch.float32)
