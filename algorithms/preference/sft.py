"""Supervised fine-tuning (SFT) of a sequence policy on demonstrations: the starting point of preference learning.

Minimises the mean negative log-likelihood per response token, -sum_t log pi(y_t | x, y_<t) / |y|, with Adam
on shuffled minibatches. Not a rule: `loop.train_preference` runs it before the first preference step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from algorithms.common.sequence import pad_pairs, token_logprobs
from envs.text_tasks import PAD_ID, ReverseDigits


def sft_train(model: torch.nn.Module, task: ReverseDigits, demonstrations: Sequence[tuple[str, str]], *,
              steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Fine-tune `model` in place on (prompt, response) texts; returns the loss of every step."""
    if not demonstrations:
        raise ValueError("SFT needs at least one demonstration")
    prompts = [task.prompt_ids(p) for p, _ in demonstrations]
    responses = [task.response_ids(r) for _, r in demonstrations]
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(prompts), size=min(batch_size, len(prompts)), replace=False)
        batch = pad_pairs([prompts[i] for i in idx], [responses[i] for i in idx], PAD_ID, side="right")
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        mask = batch["response_mask"]
        loss = -logp[mask].sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
