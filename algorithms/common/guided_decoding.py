"""Guided decoding: next-token scores of a frozen base LM re-weighted by a guide model (issue 6, P065, P208).

Both guides change only how the next token is drawn; the base LM's weights never move.

    GenARM (P065):  score(a) = log pi_base(a | x, y_<t) + strength * log pi_r(a | x, y_<t)
                    (strength = 1 / beta of the paper: pi_decode ∝ pi_base * pi_r^(1/beta))
    VAS    (P208):  score(a) = log pi_base(a | x, y_<t) + strength * Q(x, y_<t, a)   for a in top-k of pi_base,
                    -inf for every other token (strength = the paper's beta: pi ∝ pi_base * exp(beta V(s∘a)))

`GuidedLM` wraps base + guide as a module whose forward returns these scores as `.logits`, so every sampler
written for a causal LM (`algorithms.common.sequence.sample_responses`) decodes with the guide unchanged.
The value model of VAS is a causal LM whose output head reads as Q-values: its "logit" for token a at position
t is Q(x, y_<=t, a), the expected final reward after appending a (one forward pass scores all candidates).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from algorithms.common.sequence import position_ids

GUIDES = ("genarm", "vas")


def genarm_scores(base_logits: torch.Tensor, arm_logits: torch.Tensor, strength: float) -> torch.Tensor:
    """log_softmax(base) + strength * log_softmax(arm), over the last dim (P065's decoding rule)."""
    return torch.log_softmax(base_logits.float(), -1) + strength * torch.log_softmax(arm_logits.float(), -1)


def vas_scores(base_logits: torch.Tensor, q_values: torch.Tensor, strength: float, top_k: int) -> torch.Tensor:
    """log_softmax(base) + strength * Q on the base's top-k tokens, -inf elsewhere (P208's decoding rule)."""
    logp = torch.log_softmax(base_logits.float(), -1)
    k = min(int(top_k), logp.shape[-1])
    kth = logp.topk(k, dim=-1).values[..., -1:]
    scores = logp + strength * q_values.float()
    # Ties at the k-th value may let a few more than k through: harmless, and deterministic.
    return torch.where(logp >= kth, scores, torch.full_like(scores, float("-inf")))


def token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T): entry t is Q(input_ids[:, :t], input_ids[:, t]) read from the value model's head (entry 0: 0),
    aligned like `sequence.token_logprobs` so the same `response_mask` selects the response tokens."""
    if positions is None:
        positions = position_ids(attention_mask)
    q = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1].float()
    picked = q.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def td_lambda_targets(q: torch.Tensor, response_mask: torch.Tensor, reward: torch.Tensor,
                      lam: float) -> torch.Tensor:
    """TD(lambda) targets of the per-token Q-values of right-padded responses with one final reward, no discount:

        G_last = r,    G_t = (1 - lam) * Q_{t+1} + lam * G_{t+1}

    (lam = 1: Monte-Carlo, every target is r; lam = 0: one-step TD). Zero off the response. `q` is detached here."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    q = q.detach().float()
    mask = response_mask.bool()
    targets = torch.zeros_like(q)
    # Past the last response token the "next" value and target are the reward itself, so G_last = r.
    q_next = reward.float().clone()
    g_next = reward.float().clone()
    for t in range(q.shape[1] - 1, -1, -1):
        g = (1.0 - lam) * q_next + lam * g_next
        targets[:, t] = torch.where(mask[:, t], g, torch.zeros_like(g))
        q_next = torch.where(mask[:, t], q[:, t], q_next)
        g_next = torch.where(mask[:, t], g, g_next)
    return targets


class GuidedLM(torch.nn.Module):
    """A frozen base LM decoded with a guide: `forward(...).logits` are the guided next-token scores.

    kind "genarm": `guide` is the autoregressive reward model pi_r; kind "vas": `guide` is the value model.
    strength 0 gives back the base (GenARM exactly; VAS restricted to the base's top-k)."""

    def __init__(self, base: torch.nn.Module, guide: torch.nn.Module, kind: str, strength: float,
                 top_k: int | None = None) -> None:
        super().__init__()
        if kind not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}, got {kind!r}")
        if not strength >= 0:
            raise ValueError(f"guide strength must be >= 0, got {strength}")
        if kind == "vas" and not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"VAS needs top_k, an integer >= 1, got {top_k!r}")
        self.base, self.guide = base, guide
        self.kind, self.strength, self.top_k = kind, float(strength), top_k

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, **_: object) -> SimpleNamespace:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        base = self.base(**inputs).logits
        guide = self.guide(**inputs).logits
        if self.kind == "genarm":
            return SimpleNamespace(logits=genarm_scores(base, guide, self.strength))
        return SimpleNamespace(logits=vas_scores(base, guide, self.strength, self.top_k))
