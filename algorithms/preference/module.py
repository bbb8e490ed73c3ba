"""The RLModule of a sequence policy: a Hugging Face causal LM whose forward pass scores response pairs.

Batches hold pairs (prompt + response rows padded once by `algorithms.common.sequence.pad_pairs`), stacked
as (B, 2, T) so that splitting a batch over several Learners never separates the two responses of a pair:

    input_ids, attention_mask, position_ids, response_mask   (B, 2, T)
    -> fwd_out["logp"]                                          (B, 2)   log pi(response_k | prompt)
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from algorithms.common.sequence import build_causal_lm, sequence_logprobs

PAIR_COLUMNS = ("input_ids", "attention_mask", "position_ids", "response_mask")
LOGP = "logp"


def pair_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2) sequence log-probs of a (B, 2, T) pair batch under `model`."""
    b, k, t = batch["input_ids"].shape
    flat = {c: batch[c].reshape(b * k, t) for c in PAIR_COLUMNS}
    return sequence_logprobs(model, flat).reshape(b, k)


class CausalLMModule(TorchRLModule):
    """model_config = {"lm": {...}}: the causal LM's config (see `build_causal_lm`)."""

    def setup(self) -> None:
        self.model = build_causal_lm(self.model_config["lm"])

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {LOGP: pair_logprobs(self.model, batch)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._forward(batch)
