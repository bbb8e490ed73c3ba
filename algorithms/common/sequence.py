"""Sequence policies (issue 6): a causal LM as a policy over responses, with padding and masking done once.

A pair of (prompt, response) token lists becomes one row of `input_ids` = prompt + response, padded to the
batch's longest row on the left or the right. `token_logprobs` gives log pi(x_t | x_<t) per position and
`sequence_logprobs` sums it over the response positions only:

    log pi(y | x) = sum_{t in response} log softmax(logits_{t-1})[x_t]

Position ids come from the attention mask (cumsum - 1), so a row's log-probs do not depend on how much padding
it got or on which side: left- and right-padded batches give the same numbers. Padded positions are selected
out with `torch.where`, never multiplied by 0 (a fully masked row's logits may be NaN; NaN * 0 is NaN).

The policy is any Hugging Face `transformers` causal LM, built from a config dict or loaded from a local path
(`build_causal_lm`); the reference policy is a frozen copy (`frozen_copy`) that can be refreshed in place
(`copy_weights`), for rules whose reference moves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

PADDING_SIDES = ("left", "right")


def build_causal_lm(model_config: Mapping[str, Any]) -> torch.nn.Module:
    """A causal LM from {"path": <local dir>} (weights on disk, never downloaded) or from
    {"model_type": "gpt2" | "llama" | ..., **config kwargs} (random init, e.g. a tiny test model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(model_config)
    if "path" in spec:
        return AutoModelForCausalLM.from_pretrained(spec["path"], local_files_only=True)
    if "model_type" not in spec:
        raise ValueError("model_config needs 'path' (a local model directory) or 'model_type' (e.g. 'gpt2')")
    model_type = spec.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec))


def pad_pairs(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rows prompt + response padded to `length` (default: the longest row) on `side`.

    Returns int64 `input_ids`, `attention_mask` (1 on real tokens), `position_ids` (0.. along the real tokens)
    and bool `response_mask` (True on the response tokens), all of shape (B, T).
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max((len(r) for r in rows), default=0) if length is None else length
    if any(len(r) > width for r in rows):
        raise ValueError(f"a row of {max(len(r) for r in rows)} tokens does not fit length={width}")
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        start = 0 if side == "right" else width - len(row)
        input_ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, start:start + len(row)] = 1
        response[i, start + len(p):start + len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": position_ids(attention),
        "response_mask": response,
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... along each row's real tokens (padding gets 0): the same positions whatever the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T): entry t is log pi(input_ids[:, t] | input_ids[:, :t]); entry 0 (no context) is 0."""
    if positions is None:
        positions = position_ids(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,): log pi(response | prompt) of each row of a `pad_pairs` batch (sum over the response tokens)."""
    mask = batch["response_mask"].bool()
    per_token = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference policy: a deep copy in eval mode with no gradients."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def copy_weights(target: torch.nn.Module, source: torch.nn.Module, mix: float = 1.0) -> None:
    """target <- (1 - mix) * target + mix * source, once per distinct tensor (mix=1: a hard copy).

    `state_dict()` lists a tied tensor under every name (GPT-2's lm_head.weight is transformer.wte.weight); mixing
    it twice would leave (1 - mix)^2 of the old value, so each tensor is updated the first time it is seen only."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    target_state, source_state = target.state_dict(), source.state_dict()
    if target_state.keys() != source_state.keys():
        raise ValueError("target and source have different parameter names")
    seen: set[int] = set()
    for name, t in target_state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        s = source_state[name]
        if t.is_floating_point():
            t.mul_(1.0 - mix).add_(s.detach().to(t.dtype), alpha=mix)
        else:
            t.copy_(s)


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Sample one response per prompt (left-padded prompts, full recompute per token: fine for short tiny-model
    responses). A response ends after its first `eos_id` (kept) or after `max_new_tokens` tokens."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    batch = pad_pairs(prompts, [[] for _ in prompts], pad_id, side="left")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            finished = done.clone()  # rows that ended earlier get padding the model never attends to
            for i in torch.nonzero(~finished).flatten().tolist():
                out[i].append(int(nxt[i]))
            done |= nxt == eos_id
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            attention = torch.cat([attention, (~finished).long().unsqueeze(1)], dim=1)
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return out


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on shared cores: one torch thread (more only fight over the cores: 20x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
