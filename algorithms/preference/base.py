"""What every pairwise preference rule shares: its config, its Learner, and pairs -> a learner batch.

A rule subclasses `PreferenceConfig` (defaults, `training()` keywords, `validate()`) and sets `pair_loss_fn`, the
paper's loss per pair from the four sequence log-probs; a loss that needs more than `beta` overrides
`PreferenceLearner.pair_loss` in a subclass (and `get_default_learner_class`). The Learner is an RLlib
`TorchLearner`, driven through a `LearnerGroup` (`config.learners(num_learners=N)` gives N learners, one per GPU
on a cluster, each taking a shard of the pairs; DDP all-reduces the gradients). The reference policy is a frozen
copy of the module's LM inside each Learner, set from the current weights by `reset_reference` (after SFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from algorithms.common.losses import masked_mean
from algorithms.common.sequence import copy_weights, frozen_copy, pad_pairs
from algorithms.options import Option, non_negative, positive, unit_interval
from algorithms.preference.checks import preference_check
from algorithms.preference.module import LOGP, PAIR_COLUMNS, CausalLMModule, pair_logprobs
from algorithms.rule import Rule
from envs.text_tasks import PAD_ID, VOCAB, ReverseDigits
from services.preferences import LabelledPair

PAIR_SOURCES = ("policy", "reference")
VALID = "valid"  # False for ties: they carry no preference and are left out of the loss (but still acked)

# The tiny test policy: a 2-layer GPT-2 over the task's character vocabulary, no dropout (the policy's
# log-probs at training time must be the ones of the policy that sampled the pairs).
TINY_LM: dict[str, Any] = {
    "model_type": "gpt2", "vocab_size": len(VOCAB), "n_positions": 32, "n_embd": 64, "n_layer": 2, "n_head": 4,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}


def logratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]: DPO's implicit reward margin / beta."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


class PreferenceConfig(AlgorithmConfig):
    """Options shared by the pairwise rules. `beta` is the rule's regularisation strength (DPO's beta,
    IPO's tau); the loop options say how many pairs one step generates, labels and learns from."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self._is_online = False  # no EnvRunners: data comes from the preference queue
        self.lr = 1e-3
        self.beta = 0.1
        self.lm: dict[str, Any] = dict(TINY_LM)
        self.text_task = "reverse-digits"
        self.pairs_per_step = 64
        self.temperature = 1.0
        self.judge_beta = 2.0  # the scripted Bradley-Terry judge's sharpness (per unit of hidden score)
        self.sft_steps = 300
        self.sft_noise = 0.3  # per-character corruption of the demonstrations
        self.min_idle_s = 60.0  # a learner's pending pairs idle this long go to another learner
        # Who generates the pairs: "policy" (online: the producer gets the learner's weights after every update)
        # or "reference" (offline: the producer keeps the SFT policy, so the data is a fixed off-policy dataset).
        self.pair_source = "policy"

    def training(self, *, beta: float | None = None, lm: dict | None = None, text_task: str | None = None,
                 pairs_per_step: int | None = None, temperature: float | None = None,
                 judge_beta: float | None = None, sft_steps: int | None = None, sft_noise: float | None = None,
                 min_idle_s: float | None = None, pair_source: str | None = None,
                 **kwargs: Any) -> PreferenceConfig:
        super().training(**kwargs)
        for name, value in dict(beta=beta, lm=lm, text_task=text_task, pairs_per_step=pairs_per_step,
                                temperature=temperature, judge_beta=judge_beta, sft_steps=sft_steps,
                                sft_noise=sft_noise, min_idle_s=min_idle_s, pair_source=pair_source).items():
            if value is not None:
                setattr(self, name, value)
        return self

    # The rule's per-pair loss (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> {"loss", ...}.
    pair_loss_fn: Any = None

    def get_default_learner_class(self) -> type:
        return PreferenceLearner

    # -- generation-side hooks (rules whose data is generated online in a special way) --

    def producer_weights_due(self, step: int) -> bool:
        """After update `step` (from 1): does the generation actor get the learner's current weights? Default:
        after every update when online (pair_source "policy"); never for a fixed dataset ("reference"). Iterative
        rules (batched on-policy: DNO, INPO, Nash-MP) sync only at iteration boundaries."""
        return self.pair_source == "policy"

    def producer_mixture(self) -> float:
        """beta of the per-token geometric mixture pi^(1-beta) pi_ref^beta the generation actor samples from
        (IPO-MD, P021); 0 = the policy itself (default)."""
        return 0.0

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        # Spaces for RLlib's bookkeeping: an observation is a row of token ids, an action the next token.
        vocab = int(self.lm.get("vocab_size", len(VOCAB)))
        positions = int(self.lm.get("n_positions", self.lm.get("max_position_embeddings", 32)))
        return RLModuleSpec(
            module_class=CausalLMModule,
            observation_space=gym.spaces.Box(0, vocab - 1, (positions,), np.int64),
            action_space=gym.spaces.Discrete(vocab),
            model_config={"lm": dict(self.lm)},
        )

    def validate(self) -> None:
        # Not AlgorithmConfig.validate: it checks an Algorithm class and EnvRunner settings, and this config
        # drives a LearnerGroup directly (loop.train_preference), with no Algorithm and no env.
        if not (isinstance(self.num_learners, int) and self.num_learners >= 0):
            self._value_error(f"num_learners must be an integer >= 0, got {self.num_learners}")
        if not self.lr > 0:
            self._value_error(f"lr must be > 0, got {self.lr}")
        if not self.beta > 0:
            self._value_error(f"beta must be > 0, got {self.beta}")
        if not (isinstance(self.pairs_per_step, int) and self.pairs_per_step >= 1):
            self._value_error(f"pairs_per_step must be an integer >= 1, got {self.pairs_per_step}")
        if not self.temperature > 0:
            self._value_error(f"temperature must be > 0, got {self.temperature}")
        if not self.judge_beta > 0:
            self._value_error(f"judge_beta must be > 0, got {self.judge_beta}")
        if not 0 <= self.sft_noise <= 1:
            self._value_error(f"sft_noise must be in [0, 1], got {self.sft_noise}")
        if not (isinstance(self.sft_steps, int) and self.sft_steps >= 0):
            self._value_error(f"sft_steps must be an integer >= 0, got {self.sft_steps}")
        if self.pair_source not in PAIR_SOURCES:
            self._value_error(f"pair_source must be one of {', '.join(PAIR_SOURCES)}, got {self.pair_source!r}")


class IterativePreferenceConfig(PreferenceConfig):
    """Iterations of `iteration_steps` updates (iterative / batched on-policy rules: DNO, INPO, APO, Nash-MP).
    Online, the generation actor gets the policy only at iteration ends, so every pair of an iteration comes
    from the same iterate pi_t (the paper's "sample a batch from pi_t, label, then fit pi_{t+1}")."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        self.iteration_steps = 6  # 4 iterations in the 24-step learning check

    def training(self, *, iteration_steps: int | None = None, **kwargs: Any) -> IterativePreferenceConfig:
        super().training(**kwargs)
        if iteration_steps is not None:
            self.iteration_steps = iteration_steps
        return self

    def iteration_ends(self, step: int) -> bool:
        return step % self.iteration_steps == 0

    def producer_weights_due(self, step: int) -> bool:
        return self.pair_source == "policy" and self.iteration_ends(step)

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.iteration_steps, int) and self.iteration_steps >= 1):
            self._value_error(f"iteration_steps must be an integer >= 1, got {self.iteration_steps}")


def make_config(rule: Rule, overrides: dict[str, Any] | None, seed: int, text_task: str | None = None) -> Any:
    """The rule's config with typed `overrides` (a typo is refused, never a silently ignored new attribute),
    its text task, seeded and validated."""
    config = rule.config_class()
    for name, value in (overrides or {}).items():
        if not hasattr(config, name):
            raise ValueError(f"unknown option {name!r} for rule {rule.name}; valid: {', '.join(rule.option_names())}")
        setattr(config, name, value)
    if text_task is not None:
        config.text_task = text_task
    config.debugging(seed=seed)
    config.validate()
    return config


class PreferenceLearner(TorchLearner):
    """Scores each pair under the policy (forward_train) and the frozen reference, then applies `pair_loss`."""

    def build(self) -> None:
        super().build()
        self._references = {mid: frozen_copy(self.policy_lm(mid)) for mid in self.module.keys()}

    def policy_lm(self, module_id: str = DEFAULT_MODULE_ID) -> torch.nn.Module:
        module = self.module[module_id]
        return (module.unwrapped() if hasattr(module, "unwrapped") else module).model  # DDP-wrapped with N learners

    def reset_reference(self, mix: float = 1.0) -> None:
        """reference <- (1 - mix) reference + mix policy (1: a hard copy, e.g. right after SFT)."""
        for mid, reference in self._references.items():
            copy_weights(reference, self.policy_lm(mid), mix)

    def reference_weights(self, module_id: str = DEFAULT_MODULE_ID) -> dict[str, np.ndarray]:
        """The reference LM's state dict as numpy arrays (checks, checkpoints of rules whose reference moves)."""
        return {k: v.detach().cpu().numpy() for k, v in self._references[module_id].state_dict().items()}

    def start_training(self, config: PreferenceConfig) -> None:
        """Called by the loop once, right after the reference was set from the SFT policy and before the first
        update. Rules with more frozen copies (an anchor iterate) set them here; default: nothing."""

    def after_update(self, config: PreferenceConfig, step: int) -> None:
        """Called by the loop after every update (step = updates done so far, from 1). Rules whose reference
        moves during training (e.g. soft or periodic reference updates) override it; default: nothing."""

    def pair_loss(self, config: PreferenceConfig, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                  ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair terms; "loss" is minimised (mean over non-tied pairs). Default: the config's `pair_loss_fn`
        with strength `beta`; a rule whose loss needs more than that overrides this method."""
        return type(config).pair_loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta)

    def compute_loss_for_module(self, *, module_id: str, config: PreferenceConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        logp = fwd_out[LOGP]
        with torch.no_grad():
            ref = pair_logprobs(self._references[module_id], batch)
        terms = self.pair_loss(config, logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1])
        valid = batch[VALID].bool()
        loss = masked_mean(terms["loss"], valid)
        margin = logratio_margin(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1]).detach()  # implicit reward / beta
        self.metrics.log_dict(
            {"preference_loss": loss.detach(), "logratio_margin": masked_mean(margin, valid),
             "margin_accuracy": masked_mean((margin > 0).float(), valid), "pairs": valid.sum().float()},
            key=module_id, window=1,
        )
        return loss


class AnchoredPreferenceLearner(PreferenceLearner):
    """A PreferenceLearner with a second frozen copy, the anchor (e.g. the last iterate pi_t of an iterative rule),
    beside the reference. The anchor starts as the SFT policy (`start_training`) and moves with `set_anchor`."""

    def build(self) -> None:
        super().build()
        self._anchors = {mid: frozen_copy(self.policy_lm(mid)) for mid in self.module.keys()}

    def start_training(self, config: PreferenceConfig) -> None:
        super().start_training(config)
        self.set_anchor("policy")

    def set_anchor(self, source: str = "policy") -> None:
        """anchor <- a copy of the current policy ("policy") or of the reference ("reference")."""
        if source not in ("policy", "reference"):
            raise ValueError(f"anchor source must be 'policy' or 'reference', got {source!r}")
        for mid, anchor in self._anchors.items():
            copy_weights(anchor, self.policy_lm(mid) if source == "policy" else self._references[mid])

    def anchor_logprobs(self, module_id: str, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return pair_logprobs(self._anchors[module_id], batch)

    def compute_loss_for_module(self, *, module_id: str, config: PreferenceConfig, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        # (B, 2) anchor log-probs of this batch, read by the subclass's `pair_loss` (whose signature is shared).
        self.anchor_logp = self.anchor_logprobs(module_id, batch)
        return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    def anchor_weights(self, module_id: str = DEFAULT_MODULE_ID) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self._anchors[module_id].state_dict().items()}


def pair_width(task: ReverseDigits) -> int:
    """Tokens in a row of a pair batch: bos + prompt + the longest response. Fixed by the task, so every shard over
    several learners has the same shape."""
    return 1 + len(task.prompt("0" * task.length)) + task.max_new_tokens


def pair_columns(task: ReverseDigits, pairs: Sequence[LabelledPair]) -> dict[str, np.ndarray]:
    """(B, 2, T) columns of labelled text pairs, chosen response first (ties keep their order, VALID False).
    T is fixed by the task, so every shard over several learners has the same shape."""
    prompts, responses, valid = [], [], []
    for p in pairs:
        tie = p.label.preferred == "tie"
        first, second = p.pair.responses if tie else (p.chosen, p.rejected)
        prompt = task.prompt_ids(p.pair.prompt)
        prompts += [prompt, prompt]
        responses += [task.response_ids(first), task.response_ids(second)]
        valid.append(not tie)
    width = pair_width(task)
    padded = pad_pairs(prompts, responses, PAD_ID, side="right", length=width)
    cols = {c: padded[c].numpy().reshape(len(pairs), 2, width) for c in PAIR_COLUMNS}
    cols[VALID] = np.asarray(valid, dtype=bool)
    return cols


def learner_batch(task: ReverseDigits, pairs: Sequence[LabelledPair]) -> MultiAgentBatch:
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(pair_columns(task, pairs))}, env_steps=len(pairs))


# What `--set` may change on every pairwise rule (a rule adds its own).
PREFERENCE_OPTIONS: tuple[Option, ...] = (
    Option("lr", "Adam step size of the learner", positive, "> 0"),
    Option("beta", "regularisation strength towards the reference policy", positive, "> 0"),
    Option("pairs_per_step", "pairs generated, labelled and learned from per step", positive, ">= 1"),
    Option("temperature", "sampling temperature of the generation actor", positive, "> 0"),
    Option("judge_beta", "sharpness of the scripted Bradley-Terry judge", positive, "> 0"),
    Option("sft_steps", "supervised fine-tuning steps on the demonstrations first", non_negative, ">= 0"),
    Option("sft_noise", "per-character corruption of the demonstrations", unit_interval, "in [0, 1]"),
    Option("pair_source", "who generates the pairs: policy (online) or reference (a fixed SFT-policy dataset)",
           lambda x: x in PAIR_SOURCES, " or ".join(PAIR_SOURCES)),
    Option("num_learners", "Learner actors (0 = learn in the driver; one per GPU on a cluster)", non_negative, ">= 0"),
)


ITERATION_OPTION = Option("iteration_steps", "updates per iteration; the generation actor gets the policy only at "
                          "iteration ends (batched on-policy)", positive, ">= 1")


def pairwise_rule(name: str, paper_id: str, summary: str, config_class: type,
                  extra_options: tuple[Option, ...] = ()) -> Rule:
    """The Rule of a pairwise preference rule: shared options (plus the rule's `extra_options`), the win-rate
    check, a cheap smoke run."""
    return Rule(name=name, family="preference", paper_ids=(paper_id,), summary=summary, config_class=config_class,
                options=PREFERENCE_OPTIONS + tuple(extra_options), learning_check=preference_check(paper_id),
                smoke_overrides={"pairs_per_step": 8, "sft_steps": 5},
                check_runner="algorithms.preference.loop:run_learning_check")
