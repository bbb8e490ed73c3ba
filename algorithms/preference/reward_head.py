"""A reward model on a causal LM: the last response token's final hidden state -> a linear head -> a scalar.

    r(x, y) = w^T h_L(x, y)[t_last] + b        t_last = the last real (non-padding) token of prompt + response

Public API (kept small on purpose; guided decoding and the reward-model rules use it):

    model = RewardModel(lm_config)                  # or RewardModel.from_lm(sft_policy): backbone = a copy of it
    r = reward_scores(model, batch)                 # (B,) for a `pad_pairs` batch (input_ids, attention_mask, ...)
    h = final_hidden_states(model, batch)           # (B, T, H): the representations r reads (goal-conditioned RMs)

Either padding side works: the last real token is found from the attention mask. The backbone is the LM's base
model (`lm.base_model`, e.g. GPT-2's transformer) so the head reads the same final hidden state the LM head does.
`RewardModule` is the same model as an RLlib RLModule for (B, K, T) batches (K responses of one prompt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from algorithms.common.sequence import build_causal_lm, position_ids
from algorithms.preference.module import PAIR_COLUMNS

REWARD = "reward"  # fwd_out: (B, K) rewards
HIDDEN = "hidden"  # fwd_out (training only): (B, K, T, H) final hidden states


class RewardModel(torch.nn.Module):
    """A causal LM's transformer with a scalar head on its final hidden state."""

    def __init__(self, lm_config: Mapping[str, Any] | None = None, lm: torch.nn.Module | None = None) -> None:
        super().__init__()
        if (lm_config is None) == (lm is None):
            raise ValueError("RewardModel needs exactly one of lm_config (build a new LM) or lm (use this one)")
        self.lm = lm if lm is not None else build_causal_lm(lm_config)
        self.head = torch.nn.Linear(self.lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # r = 0 at the start: the first BT loss is log 2 on every pair
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: torch.nn.Module) -> RewardModel:
        """A reward model whose backbone starts as a copy of `lm` (e.g. the SFT policy, as in RLHF)."""
        import copy

        return cls(lm=copy.deepcopy(lm))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = position_ids(attention_mask)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        return out.last_hidden_state

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return reward_scores(self, batch)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,): the position of each row's last real token, for left or right padding."""
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values.clamp(min=0)


def final_hidden_states(model: RewardModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) final hidden states of a `pad_pairs` batch."""
    return model.hidden(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))


def rewards_from_hidden(model: RewardModel, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) head(h[t_last]) from hidden states already computed (saves a second forward pass)."""
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.head(picked).squeeze(-1)


def reward_scores(model: RewardModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) r(x, y) of each row of a `pad_pairs` batch (prompt + response rows, any padding side)."""
    return rewards_from_hidden(model, final_hidden_states(model, batch), batch["attention_mask"])


class RewardModule(TorchRLModule):
    """model_config = {"lm": {...}}. Batches are (B, K, T) columns (K responses per prompt, e.g. a pair):
    forward gives fwd_out[REWARD] (B, K); forward_train also the hidden states fwd_out[HIDDEN] (B, K, T, H)."""

    def setup(self) -> None:
        self.model = RewardModel(self.model_config["lm"])

    def _flat(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
        b, k, t = batch["input_ids"].shape
        return {c: batch[c].reshape(b * k, t) for c in PAIR_COLUMNS}, (b, k, t)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        flat, (b, k, _) = self._flat(batch)
        return {REWARD: reward_scores(self.model, flat).reshape(b, k)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        flat, (b, k, t) = self._flat(batch)
        hidden = final_hidden_states(self.model, flat)
        rewards = rewards_from_hidden(self.model, hidden, flat["attention_mask"])
        return {REWARD: rewards.reshape(b, k), HIDDEN: hidden.reshape(b, k, t, -1)}
