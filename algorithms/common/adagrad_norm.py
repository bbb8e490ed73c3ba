"""AdaGrad-Norm: SGD whose one scalar step size shrinks with the accumulated squared gradient norms.

    b_k^2        = b_0^2 + sum_{i <= k} ||g_i||^2           (||.|| over all parameters of the group as one vector)
    theta_k+1    = theta_k - (lr / b_k) g_k

(Ward, Wu & Bottou 2019; the actor step size of the Multi-level Actor-Critic, P069, which needs no knowledge of
the gradient noise or of the chain's mixing time.) The accumulator lives in the optimizer state, so it is
checkpointed with the learner.
"""

from __future__ import annotations

import torch


class AdaGradNorm(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, initial_accumulator: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if initial_accumulator <= 0:
            raise ValueError(f"initial_accumulator (b_0^2) must be > 0, got {initial_accumulator}")
        super().__init__(params, {"lr": lr, "initial_accumulator": initial_accumulator})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            state = self.state[params[0]]  # one accumulator per group, kept with its first parameter
            if "sum_squared_norms" not in state:
                state["sum_squared_norms"] = torch.tensor(group["initial_accumulator"], dtype=torch.float64)
            squared = sum(float(p.grad.pow(2).sum()) for p in params)
            state["sum_squared_norms"] += squared
            scale = group["lr"] / float(state["sum_squared_norms"].sqrt())
            for p in params:
                p.add_(p.grad, alpha=-scale)
        return loss
