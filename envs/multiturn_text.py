"""A small multi-turn text task for language agents (issue 6, P251 DMPO), learnable by a tiny causal LM on a CPU.

`MultiTurnDigits`: the prompt is `length` digits and ">" (e.g. "307>"); the agent must say the digits reversed,
ONE digit per turn, and after every turn the environment answers "+" (right: go on to the next position) or "-"
(wrong: try this position again). The episode ends when every position is done or after `max_turns` turns
(`length + extra_turns`). A transcript alternates agent and environment tokens:

    prompt "307>"   transcript "7+4-0+3+"   (turn 1 right, turn 2 wrong, then right twice: 3 done, 1 wrong)

Ground truth is known, so the hidden score of a trajectory is `done - wrong_penalty * wrong` (positions completed
minus a penalty per wrong turn; `length` for a perfect episode). Trajectories differ in length (3 to 5 turns by
default), which is what DMPO's length normalisation is for. The vocabulary is the single-turn task's plus the
feedback tokens "+" and "-" (`MT_VOCAB`); the agent's turn is any one token (anything but the right digit is
wrong). `demonstrations` are noisy expert episodes: each turn says the right digit with prob 1 - noise, else a
random digit, so the SFT policy is good but not perfect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.text_tasks import BOS, SEP, VOCAB

RIGHT, WRONG = "+", "-"
MT_VOCAB = (*VOCAB, RIGHT, WRONG)
MT_TOKEN_ID = {c: i for i, c in enumerate(MT_VOCAB)}


def mt_encode(text: str) -> list[int]:
    unknown = sorted(set(text) - MT_TOKEN_ID.keys())
    if unknown:
        raise ValueError(f"characters {unknown} are not in the multi-turn vocabulary {''.join(MT_VOCAB)!r}")
    return [MT_TOKEN_ID[c] for c in text]


def mt_decode(ids: Sequence[int]) -> str:
    return "".join(MT_VOCAB[i] for i in ids)


@dataclass(frozen=True)
class MultiTurnDigits:
    length: int = 3
    extra_turns: int = 2
    wrong_penalty: float = 0.5

    @property
    def max_turns(self) -> int:
        return self.length + self.extra_turns

    @property
    def max_new_tokens(self) -> int:
        """Longest transcript in tokens: an agent token and a feedback token per turn."""
        return 2 * self.max_turns

    def prompt(self, digits: str) -> str:
        return digits + SEP

    def answer(self, prompt: str) -> str:
        return prompt[: self.length][::-1]

    def prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        return ["".join(str(d) for d in rng.integers(0, 10, self.length)) + SEP for _ in range(n)]

    # -- the environment ---------------------------------------------------------------------------------------

    @staticmethod
    def done_and_wrong(transcript: str) -> tuple[int, int]:
        """(positions completed, wrong turns) of a transcript."""
        feedback = transcript[1::2]
        return feedback.count(RIGHT), feedback.count(WRONG)

    def turns(self, transcript: str) -> int:
        return len(transcript) // 2

    def feedback(self, prompt: str, transcript: str, action: str) -> str:
        """The environment's answer to the agent's `action` (one character) after `transcript`."""
        if len(action) != 1:
            raise ValueError(f"an action is one token, got {action!r}")
        if self.finished(transcript):
            raise ValueError(f"the episode of {prompt!r} is over after {transcript!r}")
        position, _ = self.done_and_wrong(transcript)
        return RIGHT if action == self.answer(prompt)[position] else WRONG

    def finished(self, transcript: str) -> bool:
        done, _ = self.done_and_wrong(transcript)
        return done == self.length or self.turns(transcript) >= self.max_turns

    def score(self, prompt: str, transcript: str) -> float:
        """The hidden score: positions completed minus `wrong_penalty` per wrong turn."""
        done, wrong = self.done_and_wrong(transcript)
        return done - self.wrong_penalty * wrong

    def correct(self, prompt: str, transcript: str) -> bool:
        """A perfect episode: every position right at the first try."""
        return self.done_and_wrong(transcript) == (self.length, 0)

    def demonstrations(self, n: int, noise: float, rng: np.random.Generator) -> list[tuple[str, str]]:
        """Noisy expert episodes: each turn is the right digit with prob 1 - noise, else a random digit."""
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        out = []
        for prompt in self.prompts(n, rng):
            transcript = ""
            while not self.finished(transcript):
                position, _ = self.done_and_wrong(transcript)
                action = str(rng.integers(0, 10)) if rng.random() < noise else self.answer(prompt)[position]
                transcript += action + self.feedback(prompt, transcript, action)
            out.append((prompt, transcript))
        return out

    # -- tokens: the prompt starts with bos; a transcript has no eos (the environment ends the episode) -----------

    def prompt_ids(self, prompt: str) -> list[int]:
        return mt_encode(BOS + prompt)

    def response_ids(self, transcript: str) -> list[int]:
        return mt_encode(transcript)

    def response_text(self, ids: Sequence[int]) -> str:
        return mt_decode(ids)

    @staticmethod
    def agent_offsets(transcript: str) -> list[int]:
        """Offsets of the agent's tokens in a transcript (the environment's are the others)."""
        return list(range(0, len(transcript), 2))
