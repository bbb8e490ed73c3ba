"""Rows of a (prompt + response) batch back to token lists, new responses for the same prompts scored in one pass.

Some preference rules learn from responses that are not in the labelled pair: the policy's own samples for the
pair's prompt (SPAC's self-play), or copies of a response with part of its key content removed (SPO's preference
degrees). They take the rows apart here, build the new responses, and score them with `score_responses`, which
pads them once (`pad_pairs`) and sums the response token log-probs (`sequence_logprobs`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from algorithms.common.sequence import pad_pairs, sequence_logprobs


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """(N, T) rows -> N prompts (real tokens outside the response) and N responses (the response tokens)."""
    ids = input_ids.tolist()
    real = attention_mask.bool().tolist()
    resp = response_mask.bool().tolist()
    prompts = [[t for t, a, r in zip(row, ar, rr) if a and not r] for row, ar, rr in zip(ids, real, resp)]
    responses = [[t for t, r in zip(row, rr) if r] for row, rr in zip(ids, resp)]
    return prompts, responses


def score_responses(model: torch.nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N,) log model(response | prompt), differentiable when the model is (call under no_grad for a reference)."""
    batch = {k: v.to(device) for k, v in pad_pairs(prompts, responses, pad_id, side="right").items()}
    return sequence_logprobs(model, batch)


def removal_degrees(response: Sequence[int], key_ids: Collection[int], degrees: int,
                    generator: torch.Generator) -> list[list[int]]:
    """[response, response minus 1 key token, minus 2, ...]: each copy drops one more randomly chosen key token
    of the previous one (nested), up to `degrees` removals or until no key token is left."""
    variants = [list(response)]
    for _ in range(degrees):
        current = variants[-1]
        keys = [i for i, t in enumerate(current) if t in key_ids]
        if not keys:
            break
        drop = keys[int(torch.randint(len(keys), (1,), generator=generator))]
        variants.append(current[:drop] + current[drop + 1:])
    return variants
