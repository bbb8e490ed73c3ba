"""Small verifiable text tasks for sequence policies (issue 6), learnable by a tiny causal LM on a CPU.

`ReverseDigits`: the prompt is `length` digits and ">" (e.g. "307>"), the right response the digits reversed
("703"). Text is one character per token over a fixed vocabulary (`VOCAB`: pad "_", bos "^", eos "$", ">", 0-9),
so no tokenizer is needed. The hidden score of a response is the number of positions where it matches the
right answer, minus one per character beyond the answer's length (0 .. `length`).

`BradleyTerryJudge` labels a pair the way a noisy person would: response 0 is preferred with probability
sigmoid(beta * (score_0 - score_1)) (Bradley-Terry over the hidden score); equal scores are a coin flip.

`demonstrations` are imperfect SFT data: each character of the right answer is replaced by a random digit
with probability `noise`, so the SFT policy is good but not perfect and preference learning has room to improve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS, SEP = "_", "^", "$", ">"
VOCAB = (PAD, BOS, EOS, SEP, *"0123456789")
TOKEN_ID = {c: i for i, c in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS]


def encode(text: str) -> list[int]:
    """One token per character; a character outside VOCAB is a ValueError naming it."""
    try:
        return [TOKEN_ID[c] for c in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the task vocabulary {''.join(VOCAB)!r}") from None


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


@dataclass(frozen=True)
class ReverseDigits:
    """Reverse a string of `length` digits. Responses are at most `max_new_tokens` tokens, eos included."""

    length: int = 3

    @property
    def max_new_tokens(self) -> int:
        return self.length + 2  # room for one wrong extra character and the eos

    def prompt(self, digits: str) -> str:
        return digits + SEP

    def answer(self, prompt: str) -> str:
        return prompt[: self.length][::-1]

    def prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        return ["".join(str(d) for d in rng.integers(0, 10, self.length)) + SEP for _ in range(n)]

    def score(self, prompt: str, response: str) -> int:
        """The hidden score: matching positions minus extra characters (an empty response scores 0)."""
        answer = self.answer(prompt)
        matches = sum(a == b for a, b in zip(response, answer))
        return matches - max(0, len(response) - len(answer))

    def correct(self, prompt: str, response: str) -> bool:
        return response == self.answer(prompt)

    def demonstrations(self, n: int, noise: float, rng: np.random.Generator) -> list[tuple[str, str]]:
        """(prompt, response) pairs whose characters are each replaced by a random digit with prob `noise`."""
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        out = []
        for prompt in self.prompts(n, rng):
            chars = [str(rng.integers(0, 10)) if rng.random() < noise else c for c in self.answer(prompt)]
            out.append((prompt, "".join(chars)))
        return out

    # -- tokens: the prompt starts with bos; a response carries its eos unless it was cut at max_new_tokens --

    def prompt_ids(self, prompt: str) -> list[int]:
        return [BOS_ID, *encode(prompt)]

    def response_ids(self, response: str) -> list[int]:
        """A response text back to the tokens the policy produced: texts shorter than max_new_tokens ended
        with eos (sampling stops there); one of exactly max_new_tokens characters was cut off."""
        ids = encode(response)
        return ids if len(ids) >= self.max_new_tokens else [*ids, EOS_ID]

    def response_text(self, ids: Sequence[int]) -> str:
        return decode([i for i in ids if i != EOS_ID][: self.max_new_tokens])


@dataclass
class BradleyTerryJudge:
    """Prefers response 0 with probability sigmoid(beta * (score_0 - score_1)); seeded, so reproducible."""

    task: ReverseDigits
    beta: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def prob_first(self, prompt: str, first: str, second: str) -> float:
        delta = self.task.score(prompt, first) - self.task.score(prompt, second)
        return 1.0 / (1.0 + math.exp(-self.beta * delta))

    def __call__(self, prompt: str, first: str, second: str) -> int:
        """0 if the first response is preferred, else 1."""
        return 0 if self._rng.random() < self.prob_first(prompt, first, second) else 1


TASKS = {"reverse-digits": ReverseDigits}


def make_task(name: str, **kwargs: int) -> ReverseDigits:
    try:
        return TASKS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown text task {name!r}; known: {', '.join(sorted(TASKS))}") from None
