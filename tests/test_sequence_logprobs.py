"""Sequence and token log-probs with padding and masking (algorithms/common/sequence.py), checked by hand on a
fixed-logit bigram model, and padding-invariance on a tiny GPT-2 and Llama built from a config."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from algorithms.common.sequence import (
    build_causal_lm,
    copy_weights,
    frozen_copy,
    pad_pairs,
    position_ids,
    sample_responses,
    sequence_logprobs,
    token_logprobs,
)

PAD = 0
# Bigram model over 4 tokens: the next-token distribution depends only on the current token.
#   after 0 (pad): uniform; after 1: [.5 .25 .125 .125]; after 2: uniform; after 3: [.125 .125 .25 .5]
PROBS = torch.tensor([
    [0.25, 0.25, 0.25, 0.25],
    [0.5, 0.25, 0.125, 0.125],
    [0.25, 0.25, 0.25, 0.25],
    [0.125, 0.125, 0.25, 0.5],
])


class Bigram(torch.nn.Module):
    """logits[b, t] = log PROBS[input_ids[b, t]]: a model whose log-probs are known exactly."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=PROBS.log()[input_ids])


def test_pad_pairs_right_and_left() -> None:
    prompts, responses = [[1], [3, 2]], [[2, 3], [1]]
    right = pad_pairs(prompts, responses, PAD, side="right")
    assert right["input_ids"].tolist() == [[1, 2, 3], [3, 2, 1]]
    assert right["response_mask"].tolist() == [[False, True, True], [False, False, True]]
    left = pad_pairs(prompts, responses, PAD, side="left", length=4)
    assert left["input_ids"].tolist() == [[0, 1, 2, 3], [0, 3, 2, 1]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]
    assert left["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 1, 2]]  # padding does not shift positions
    assert left["response_mask"].tolist() == [[False, False, True, True], [False, False, False, True]]
    short = pad_pairs([[1]], [[2]], PAD, side="right", length=4)
    assert short["input_ids"].tolist() == [[1, 2, 0, 0]]
    assert short["response_mask"].tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="padding side"):
        pad_pairs(prompts, responses, PAD, side="middle")
    with pytest.raises(ValueError, match="does not fit"):
        pad_pairs(prompts, responses, PAD, length=2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pad_pairs(prompts, responses[:1], PAD)


def test_token_and_sequence_logprobs_by_hand() -> None:
    # row 0: prompt [1], response [2, 3]: log p(2|1) + log p(3|2) = log .125 + log .25 = log(1/32)
    # row 1: prompt [3, 2], response [1]:  log p(1|2) = log .25   (p(2|3) = .25 is the prompt: not counted)
    batch = pad_pairs([[1], [3, 2]], [[2, 3], [1]], PAD, side="right")
    per_token = token_logprobs(Bigram(), batch["input_ids"], batch["attention_mask"])
    expected = torch.tensor([[0.0, math.log(0.125), math.log(0.25)], [0.0, math.log(0.25), math.log(0.25)]])
    assert torch.allclose(per_token, expected)
    seq = sequence_logprobs(Bigram(), batch)
    assert torch.allclose(seq, torch.tensor([math.log(1 / 32), math.log(0.25)]))
    # Left padding and extra width change nothing: pad tokens are never counted.
    left = pad_pairs([[1], [3, 2]], [[2, 3], [1]], PAD, side="left", length=5)
    assert torch.allclose(sequence_logprobs(Bigram(), left), seq)


def test_masked_positions_cannot_leak_nan() -> None:
    class NanOnPad(Bigram):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            logits = super().forward(input_ids).logits.clone()
            logits[input_ids == PAD] = float("nan")  # what a fully masked attention row can produce
            return SimpleNamespace(logits=logits)

    batch = pad_pairs([[1], [3, 2]], [[2, 3], [1]], PAD, side="left", length=5)
    seq = sequence_logprobs(NanOnPad(), batch)
    assert torch.allclose(seq, torch.tensor([math.log(1 / 32), math.log(0.25)]))


@pytest.mark.parametrize("lm", [
    {"model_type": "gpt2", "vocab_size": 7, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2},
    {"model_type": "llama", "vocab_size": 7, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16},
])
def test_real_causal_lm_logprobs_do_not_depend_on_padding(lm: dict) -> None:
    torch.manual_seed(0)
    model = build_causal_lm(lm).eval()
    prompts, responses = [[1, 2, 3], [4]], [[5, 6], [2, 3, 4, 5]]
    with torch.no_grad():
        right = sequence_logprobs(model, pad_pairs(prompts, responses, PAD, side="right", length=8))
        left = sequence_logprobs(model, pad_pairs(prompts, responses, PAD, side="left", length=8))
        alone = torch.cat([sequence_logprobs(model, pad_pairs([p], [r], PAD)) for p, r in zip(prompts, responses)])
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert bool((alone < 0).all())


def test_frozen_reference_and_weight_mixing() -> None:
    torch.manual_seed(0)
    policy = torch.nn.Linear(2, 2)
    reference = frozen_copy(policy)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    before = reference.weight.clone()
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert torch.equal(reference.weight, before)  # a copy, not a view
    copy_weights(reference, policy, mix=0.25)  # ref <- .75 ref + .25 policy = ref + .25
    assert torch.allclose(reference.weight, before + 0.25)
    copy_weights(reference, policy)
    assert torch.equal(reference.weight, policy.weight)
    with pytest.raises(ValueError, match="mix"):
        copy_weights(reference, policy, mix=1.5)


def test_sampling_stops_at_eos_and_respects_the_length_limit() -> None:
    eos = 3
    # Greedy from the bigram: after 1 comes 0 ... (argmax of row 1 is 0), after 3 comes 3 (eos): stop at once.
    out = sample_responses(Bigram(), [[1], [2, 3]], max_new_tokens=4, eos_id=eos, pad_id=PAD, temperature=0)
    assert out == [[0, 0, 0, 0], [3]]
    gen = torch.Generator().manual_seed(0)
    sampled = sample_responses(Bigram(), [[1]] * 50, max_new_tokens=3, eos_id=eos, pad_id=PAD, generator=gen)
    assert all(1 <= len(r) <= 3 and (r[-1] == eos or len(r) == 3) and eos not in r[:-1] for r in sampled)
    assert position_ids(torch.tensor([[0, 0, 1, 1]])).tolist() == [[0, 0, 0, 1]]
