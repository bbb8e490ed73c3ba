"""Supervised fine-tuning (SFT) of a sequence policy on demonstrations: the starting point of preference learning.

Minimises the mean negative log-likelihood per response token, -sum_t log pi(y_t | x, y_<t) / |y|, with Adam
on shuffled minibatches. Not a rule: `loop.train_preference` runs it before the first preference step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from algorithms.common.sequence import pad_pairs, token_logprobs
from envs.text_tasks import PAD_ID, ReverseDigits


def fit_on_responses(model: torch.nn.Module, task: ReverseDigits, texts: Sequence[tuple[str, str]],
                     batch_loss: Callable[[dict[str, torch.Tensor], np.ndarray], torch.Tensor], *, steps: int,
                     batch_size: int, lr: float, seed: int) -> list[float]:
    """Adam on shuffled minibatches of (prompt, response) texts, padded once; `batch_loss(batch, idx)` is the loss of
    the padded rows `idx` (the texts' indices, for per-sample data such as rewards). Returns every step's loss."""
    prompts = [task.prompt_ids(p) for p, _ in texts]
    responses = [task.response_ids(r) for _, r in texts]
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(prompts), size=min(batch_size, len(prompts)), replace=False)
        batch = pad_pairs([prompts[i] for i in idx], [responses[i] for i in idx], PAD_ID, side="right")
        loss = batch_loss(batch, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def sft_train(model: torch.nn.Module, task: ReverseDigits, demonstrations: Sequence[tuple[str, str]], *,
              steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Fine-tune `model` in place on (prompt, response) texts; returns the loss of every step."""
    if not demonstrations:
        raise ValueError("SFT needs at least one demonstration")

    def nll(batch: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        mask = batch["response_mask"]
        return -logp[mask].sum() / mask.sum()

    return fit_on_responses(model, task, demonstrations, nll, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
