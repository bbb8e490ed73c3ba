"""Gradient post-processing and step-size rules any gradient-based on-policy rule can select.

P243 (Pascanu et al. 2013, "On the difficulty of training RNNs", Algorithm 1), `grad_clip_by="global_norm"`:

    g <- threshold / ||g|| * g        if ||g|| >= threshold          (||.|| = 2-norm of all gradients as one vector)

P232 (Yang & Ma 2022, "Component-wise gradient norm clipping"), `grad_clip_by="norm"`: the same rule applied to
each component separately. A component is one parameter tensor (a layer's weight, its bias, ...), as the
paper's official code clips `clip_grad_norm_(param, c)` for every `model.named_parameters()` entry:

    g_k <- threshold / ||g_k|| * g_k  if ||g_k|| >= threshold         for every parameter tensor k

(the paper's code adds 1e-6 to the norm, as torch's clip_grad_norm_ does; we use the exact rule, which differs only
for norms within 1e-6 of the threshold). `grad_clip_by="value"` clamps every entry to [-threshold, threshold].
The thresholds are applied per optimizer (RLlib's convention), i.e. over the parameters one optimizer steps.

P234 (Li et al. 2024, "Enhancing Policy Gradient with the Polyak Step-Size Adaption"), `step_size_rule="polyak"`:
plain SGD whose step size is the stochastic Polyak step with an upper bound (SPS_max):

    eta_t = min( (f(theta_t) - f*) / (c * ||g_t||^2),  eta_max ),       theta_{t+1} = theta_t - eta_t * g_t

where f is the minimised objective on the current minibatch, f* its optimal value, g_t its raw gradient (before
any clipping, so clipping can only shorten the Polyak step), c > 0 and eta_max = `polyak_max_lr` (the paper's
gamma_b). eta_t = 0 when f(theta_t) <= f* (nothing left to gain). What f - f* is depends on the rule: by default
it is the module's total loss minus the config's `polyak_f_star` (SPS with a known optimal value); a rule that
knows its objective's optimum sets it itself (`ppo_polyak` does, see its docstring). Open choice, ours: the
paper's twin-model estimate of the unknown optimal return V* needs two policies sampled side by side, which the
one-policy EnvRunner/checkpoint/serving path does not have; it is not implemented.

The mechanism is two mixins, `GradientRuleConfigMixin` (config fields and range checks) and `GradientRuleMixin`
(a learner that clips and steps as above), plus `GRADIENT_RULE_OPTIONS` for `--set`. PPO's config and learner
(`algorithms/onpolicy/ppo.py`) include both, so every rule on PPO's learner offers them (`rlfleet algos` lists
each rule's options); a rule with its own optimizers drops the Polyak options (`POLYAK_OPTION_NAMES`). Plain
global-norm clipping stays on the learner's own (fused) step, the same rule up to RLlib's +1e-6 in the norm.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from ray.rllib.utils.from_config import NotProvided

from algorithms.common.config_fields import set_provided
from algorithms.options import Option, positive

GRAD_CLIP_BY = ("global_norm", "norm", "value")
STEP_SIZE_RULES = ("optimizer", "polyak")


# ----------------------------------------------------------------------------------------------------------
# The math, on plain lists of gradient tensors (modified in place).


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """2-norm of all tensors taken as one vector."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_by_global_norm_(grads: Sequence[torch.Tensor], threshold: float) -> torch.Tensor:
    """P243: rescale all gradients together to norm `threshold` when their joint norm reaches it.

    Returns the norm before clipping.
    """
    norm = global_norm(grads)
    if norm >= threshold:  # norm > 0 here, since threshold > 0
        scale = threshold / norm
        for g in grads:
            g.mul_(scale)
    return norm


def clip_by_component_norm_(grads: Sequence[torch.Tensor], threshold: float) -> torch.Tensor:
    """P232: the P243 rule on each parameter tensor separately. Returns the per-tensor norms before clipping."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads]) if grads else torch.zeros(0)
    for g, norm in zip(grads, norms):
        if norm >= threshold:
            g.mul_(threshold / norm)
    return norms


def clip_by_value_(grads: Sequence[torch.Tensor], threshold: float) -> None:
    """Clamp every gradient entry to [-threshold, threshold]."""
    for g in grads:
        g.clamp_(-threshold, threshold)


def clip_gradients_(grads: Sequence[torch.Tensor], threshold: float | None, mode: str) -> None:
    """Apply the selected clipping rule in place (threshold None = no clipping)."""
    if threshold is None or not grads:
        return
    if mode == "global_norm":
        clip_by_global_norm_(grads, threshold)
    elif mode == "norm":
        clip_by_component_norm_(grads, threshold)
    elif mode == "value":
        clip_by_value_(grads, threshold)
    else:
        raise ValueError(f"grad_clip_by={mode!r} is unknown; valid: {', '.join(GRAD_CLIP_BY)}")


def polyak_step_size(gap: float | torch.Tensor, grad_sq_norm: float | torch.Tensor, c: float, max_step: float) -> float:
    """P234's SPS_max step size: min((f - f*) / (c ||g||^2), max_step), and 0 when f - f* <= 0."""
    gap, grad_sq_norm = float(gap), float(grad_sq_norm)
    if not gap > 0.0:  # also catches nan: no step on a broken objective value
        return 0.0
    if grad_sq_norm <= 0.0:  # a positive gap with a zero gradient: the bound decides (the step is 0 anyway)
        return max_step
    return min(gap / (c * grad_sq_norm), max_step)


# ----------------------------------------------------------------------------------------------------------
# Config side.


class GradientRuleConfigMixin:
    """Config fields of the gradient rules. Put it before the rule's config class in the bases.

    `grad_clip` and `grad_clip_by` are RLlib's own fields (same names and values); this mixin makes each value
    mean exactly the paper rule above and adds the step-size rule.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.step_size_rule = "optimizer"  # the optimizer's own step (Adam at lr); "polyak" = P234's SPS_max
        self.polyak_c = 0.5  # SPS's c; 0.5 is the value of the SPS analysis (Loizou et al. 2021)
        self.polyak_max_lr = 1.0  # eta_max, the paper's gamma_b
        self.polyak_f_star = 0.0  # the objective's optimal value for the default gap f - f*

    def training(
        self,
        *,
        step_size_rule: str = NotProvided,
        polyak_c: float = NotProvided,
        polyak_max_lr: float = NotProvided,
        polyak_f_star: float = NotProvided,
        **kwargs,
    ):
        super().training(**kwargs)
        set_provided(self, step_size_rule=step_size_rule, polyak_c=polyak_c, polyak_max_lr=polyak_max_lr,
                     polyak_f_star=polyak_f_star)
        return self

    def validate(self) -> None:
        super().validate()
        if self.grad_clip is not None and not self.grad_clip > 0:
            self._value_error(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.grad_clip_by not in GRAD_CLIP_BY:
            self._value_error(f"grad_clip_by={self.grad_clip_by!r} is unknown; valid: {', '.join(GRAD_CLIP_BY)}")
        if self.step_size_rule not in STEP_SIZE_RULES:
            self._value_error(
                f"step_size_rule={self.step_size_rule!r} is unknown; valid: {', '.join(STEP_SIZE_RULES)}"
            )
        if not self.polyak_c > 0:
            self._value_error(f"polyak_c must be > 0, got {self.polyak_c}")
        if not self.polyak_max_lr > 0:
            self._value_error(f"polyak_max_lr must be > 0, got {self.polyak_max_lr}")


GRADIENT_RULE_OPTIONS: tuple[Option, ...] = (
    Option("grad_clip_by", "what grad_clip bounds: global_norm (P243), norm = each parameter tensor (P232), value",
           lambda x: x in GRAD_CLIP_BY, "one of " + ", ".join(GRAD_CLIP_BY)),
    Option("step_size_rule", "optimizer (Adam at lr) or polyak (P234's SPS_max step with plain SGD)",
           lambda x: x in STEP_SIZE_RULES, "one of " + ", ".join(STEP_SIZE_RULES)),
    Option("polyak_c", "c in the Polyak step (f - f*) / (c ||g||^2)", positive, "> 0"),
    Option("polyak_max_lr", "upper bound eta_max of the Polyak step", positive, "> 0"),
    Option("polyak_f_star", "optimal loss value f* for rules that do not supply their own gap"),
)


# ----------------------------------------------------------------------------------------------------------
# Learner side.


class GradientRuleMixin:
    """Learner mixin: the config's clipping rule and step-size rule in place of RLlib's.

    Put it before the rule's learner class in the bases (e.g. `class L(GradientRuleMixin, PPORuleLearner)`). It
    hooks RLlib's own update path: `compute_losses` (remember each module's loss), `postprocess_gradients_for_module`
    (raw norms, then clipping) and `apply_gradients` (the Polyak step size, then the optimizers' steps). On
    OnPolicyLearner it turns the lean fused step off whenever it has work to do, since that step clips on its own.

    A rule supplies a better f - f* than "total loss - polyak_f_star" by calling `set_polyak_gap` from its
    `compute_loss_for_module`, and chooses which of its optimizers take the Polyak step with
    `polyak_optimizer_names` (default: all of the module's optimizers, each of which must then be plain SGD).
    """

    def build(self) -> None:
        self._polyak_gaps: dict[tuple[str, str], torch.Tensor] = {}
        self._module_losses: dict[str, torch.Tensor] = {}
        self._raw_grad_sq_norms: dict[tuple[str, str], torch.Tensor] = {}
        super().build()

    # -- what the rule may override or call --------------------------------------------------------------

    def polyak_optimizer_names(self, module_id: str) -> Iterable[str]:
        return [name for name, _ in self.get_optimizers_for_module(module_id)]

    def set_polyak_gap(self, module_id: str, gap: torch.Tensor | float, optimizer_name: str | None = None) -> None:
        """f(theta_t) - f* of this minibatch for the optimizer `optimizer_name` (None: all of the module's)."""
        names = [optimizer_name] if optimizer_name else list(self.polyak_optimizer_names(module_id))
        for name in names:
            self._polyak_gaps[(module_id, name)] = torch.as_tensor(gap).detach()

    def _uses_gradient_rules(self, config) -> bool:
        # Global-norm clipping alone is left to the learner's own step (RLlib's, or OnPolicyLearner's fused one):
        # both compute P243 as threshold / max(||g|| + 1e-6, threshold), which differs from the exact rule only
        # for norms within 1e-6 of the threshold, and the fused step is what makes PPO fast (docs/bench-*.md).
        if getattr(config, "step_size_rule", "optimizer") != "optimizer":
            return True
        return config.grad_clip is not None and config.grad_clip_by != "global_norm"

    # -- RLlib hooks ---------------------------------------------------------------------------------------

    def configure_optimizers_for_module(self, module_id: str, config=None) -> None:
        if getattr(config, "step_size_rule", "optimizer") != "polyak":
            return super().configure_optimizers_for_module(module_id, config)
        params = self.get_parameters(self._module[module_id])
        # The step size is set before every step; lr here is only the starting value.
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.SGD(params, lr=config.polyak_max_lr),
                                params=params, lr_or_lr_schedule=config.polyak_max_lr)

    def _lean_step_supported(self) -> bool:
        if any(self._uses_gradient_rules(self.config.get_config_for_module(m)) for m in self.module.keys()):
            return False
        parent = getattr(super(), "_lean_step_supported", None)
        return parent() if parent is not None else False

    def compute_losses(self, *, fwd_out, batch) -> dict[str, Any]:
        self._polyak_gaps = {}
        losses = super().compute_losses(fwd_out=fwd_out, batch=batch)
        self._module_losses = {module_id: loss.detach() for module_id, loss in losses.items()}
        return losses

    def postprocess_gradients_for_module(self, *, module_id: str, config=None, module_gradients_dict):
        if not self._uses_gradient_rules(config):
            return super().postprocess_gradients_for_module(
                module_id=module_id, config=config, module_gradients_dict=module_gradients_dict
            )
        log = getattr(self, "log_minibatch_metrics", True)
        out = {}
        for name, optimizer in self.get_optimizers_for_module(module_id):
            grads = self.filter_param_dict_for_optimizer(module_gradients_dict, optimizer)
            tensors = [g for g in grads.values() if g is not None]
            norm = global_norm(tensors)
            self._raw_grad_sq_norms[(module_id, name)] = norm**2
            clip_gradients_(tensors, config.grad_clip, config.grad_clip_by)
            if log:
                self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), norm, window=1)
            out.update(grads)
        return out

    def apply_gradients(self, gradients_dict) -> None:
        log = getattr(self, "log_minibatch_metrics", True)
        for module_id in self.module.keys():
            config = self.config.get_config_for_module(module_id)
            if getattr(config, "step_size_rule", "optimizer") != "polyak":
                continue
            for name in self.polyak_optimizer_names(module_id):
                optimizer = self.get_optimizer(module_id, name)
                if type(optimizer) is not torch.optim.SGD or any(g["momentum"] for g in optimizer.param_groups):
                    raise ValueError(f"step_size_rule=polyak needs plain SGD; optimizer {name!r} of module "
                                     f"{module_id!r} is {type(optimizer).__name__}")
                gap = self._polyak_gaps.get((module_id, name))
                if gap is None:
                    gap = self._module_losses[module_id] - config.polyak_f_star
                step = polyak_step_size(gap, self._raw_grad_sq_norms[(module_id, name)], config.polyak_c,
                                        config.polyak_max_lr)
                for group in optimizer.param_groups:
                    group["lr"] = step
                if log:
                    self.metrics.log_dict({f"{name}_polyak_step_size": step, f"{name}_polyak_gap": float(gap)},
                                          key=module_id, window=1)
        super().apply_gradients(gradients_dict)
