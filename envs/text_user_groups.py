"""A population of judges with different hidden preferences over `ReverseDigits` responses (MaxMin-RLHF, P044).

Each user belongs to one group; a group has its own hidden score of a response, and a user labels a pair like
`BradleyTerryJudge` does, by Bradley-Terry over the group's score: P(first) = sigmoid(beta (s_g(y_0) - s_g(y_1))).

    "reverse" (the majority): the task's score, matching positions of the reversed digits minus extra characters
    "even"    (a minority):   even digits among the first `length` characters, minus extra characters

Both scores run from 0 to `length`, so "the worst-off group's expected score" compares like with like. The
groups partly agree (a right answer made of even digits pleases both) and partly conflict (a right odd digit
pleases only the majority), so a policy tuned to the pooled preferences serves the majority and a max-min policy
must trade some majority score for minority score. Users are ids ("user-3") that label through the preference
queue as judges, so a learner sees who labelled each pair (`Label.judge_id`) but never the group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from envs.text_tasks import ReverseDigits


def reverse_score(task: ReverseDigits, prompt: str, response: str) -> int:
    return task.score(prompt, response)


def even_score(task: ReverseDigits, prompt: str, response: str) -> int:
    evens = sum(c in "02468" for c in response[: task.length])
    return evens - max(0, len(response) - task.length)


GROUP_SCORES: dict[str, Callable[[ReverseDigits, str, str], int]] = {"reverse": reverse_score, "even": even_score}


@dataclass(frozen=True)
class UserGroup:
    name: str  # a key of GROUP_SCORES
    users: int

    def __post_init__(self) -> None:
        if self.name not in GROUP_SCORES:
            raise ValueError(f"unknown user group {self.name!r}; known: {', '.join(sorted(GROUP_SCORES))}")
        if self.users < 1:
            raise ValueError(f"a group needs at least one user, got {self.users}")


class UserPopulation:
    """Users `user-0 .. user-(N-1)`, the first `groups[0].users` in group 0, and so on. Seeded, so reproducible."""

    def __init__(self, task: ReverseDigits, groups: Sequence[UserGroup], beta: float = 2.0, seed: int = 0) -> None:
        if not groups:
            raise ValueError("a population needs at least one group")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.task, self.groups, self.beta = task, tuple(groups), beta
        self.group_of = {}
        for g, group in enumerate(self.groups):
            for _ in range(group.users):
                self.group_of[f"user-{len(self.group_of)}"] = g
        self.users = list(self.group_of)
        self._rng = np.random.default_rng(seed)

    def score(self, group: int, prompt: str, response: str) -> int:
        return GROUP_SCORES[self.groups[group].name](self.task, prompt, response)

    def prob_first(self, user: str, prompt: str, first: str, second: str) -> float:
        g = self.group_of[user]
        return 1.0 / (1.0 + math.exp(-self.beta * (self.score(g, prompt, first) - self.score(g, prompt, second))))

    def label(self, user: str, prompt: str, first: str, second: str) -> int:
        """0 if `user` prefers the first response, else 1 (Bradley-Terry over the user's group score)."""
        return 0 if self._rng.random() < self.prob_first(user, prompt, first, second) else 1

    def pick_user(self) -> str:
        """A user uniformly at random (so groups label in proportion to their size)."""
        return self.users[int(self._rng.integers(len(self.users)))]


def majority_minority(task: ReverseDigits, majority: int = 16, minority: int = 4, beta: float = 2.0,
                      seed: int = 0) -> UserPopulation:
    """The check's population: `majority` users who want the reversed digits, `minority` who want even digits."""
    return UserPopulation(task, (UserGroup("reverse", majority), UserGroup("even", minority)), beta, seed)
