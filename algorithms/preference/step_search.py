"""Monte Carlo tree search over the steps of a response, with outcome validation, for P130 (mcts_dpo).

A node is a partial response (its `prefix`); its children are next steps (here one character each: a digit, or the
eos "$" that ends the response). One simulation per prompt, all prompts batched:

    select:   from the root, follow argmax_a Q(a) + c_puct P(a) sqrt(N) / (1 + N(a)) to a leaf  (PUCT)
    expand:   the leaf's `width` most likely next steps under the policy become its children, prior P = their
              renormalised probabilities
    evaluate: each new child is completed once by sampling from the policy (a rollout); its value is the task's
              outcome check, score(prompt, response) / length (1 = exactly right)
    back up:  every new child's value is added to the child and to each node on the path (one visit each)

A terminal leaf (eos, or the response at full length) is re-evaluated by its own outcome instead. After the
search, `step_pairs` takes, at every node with two or more visited children, the child with the highest Q and the
one with the lowest as a step-level preference (prompt + prefix, better step, worse step), when their Q differ by
at least `margin`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from algorithms.common.sequence import pad_pairs, position_ids, sample_responses
from envs.text_tasks import EOS, EOS_ID, PAD_ID, VOCAB, ReverseDigits, encode


@dataclass
class Node:
    prefix: str  # the response so far (no eos)
    prior: float = 1.0
    terminal: bool = False
    visits: int = 0
    value_sum: float = 0.0
    children: dict[str, Node] = field(default_factory=dict)

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def select(self, c_puct: float) -> Node:
        """The child maximising Q + c P sqrt(N) / (1 + n) (PUCT)."""
        root_n = math.sqrt(max(self.visits, 1))
        return max(self.children.values(), key=lambda c: c.q + c_puct * c.prior * root_n / (1 + c.visits))


@torch.no_grad()
def next_step_probs(model: torch.nn.Module, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) next-token probabilities after each context (left-padded, positions from the mask)."""
    batch = pad_pairs(contexts, [[] for _ in contexts], PAD_ID, side="left")
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
    probs = torch.softmax(logits.float(), dim=-1)
    probs[:, PAD_ID] = 0.0  # padding is never a step
    return probs / probs.sum(-1, keepdim=True)


def outcome(task: ReverseDigits, prompt: str, response: str) -> float:
    """Outcome validation: the hidden score scaled to [.., 1] (1 = exactly right)."""
    return task.score(prompt, response) / task.length


def search(model: torch.nn.Module, task: ReverseDigits, prompts: Sequence[str], *, simulations: int, width: int,
           c_puct: float, temperature: float, generator: torch.Generator) -> list[Node]:
    """One tree per prompt after `simulations` batched simulations; returns the roots."""
    was_training = model.training
    model.eval()
    roots = [Node("") for _ in prompts]
    try:
        for _ in range(simulations):
            paths = []
            for root in roots:
                path = [root]
                while path[-1].children and not path[-1].terminal:
                    path.append(path[-1].select(c_puct))
                paths.append(path)
            _expand_and_evaluate(model, task, prompts, paths, width, temperature, generator)
    finally:
        model.train(was_training)
    return roots


def _expand_and_evaluate(model, task, prompts, paths, width, temperature, generator) -> None:
    open_ = [i for i, path in enumerate(paths) if not path[-1].terminal]
    for i, path in enumerate(paths):  # terminal leaves: their outcome once more
        if path[-1].terminal:
            _back_up(path, outcome(task, prompts[i], path[-1].prefix))
    if not open_:
        return
    contexts = [task.prompt_ids(prompts[i]) + encode(paths[i][-1].prefix) for i in open_]
    probs = next_step_probs(model, contexts)
    top = torch.topk(probs, k=min(width, probs.shape[1]), dim=-1)
    children = []  # (prompt index, path, child)
    for row, i in enumerate(open_):
        leaf = paths[i][-1]
        mass = float(top.values[row].sum())
        for p, token in zip(top.values[row].tolist(), top.indices[row].tolist()):
            step = VOCAB[token]
            prefix = leaf.prefix if step == EOS else leaf.prefix + step
            done = step == EOS or len(prefix) >= task.max_new_tokens
            leaf.children[step] = child = Node(prefix, prior=p / mass, terminal=done)
            children.append((i, paths[i], child))
    # Rollouts from every non-terminal new child, batched; each row is cut to the room its response has left.
    rolling = [(i, c) for i, _, c in children if not c.terminal]
    rollouts = {}
    if rolling:
        ids = sample_responses(model, [task.prompt_ids(prompts[i]) + encode(c.prefix) for i, c in rolling],
                               max_new_tokens=task.max_new_tokens - min(len(c.prefix) for _, c in rolling),
                               eos_id=EOS_ID, pad_id=PAD_ID, temperature=temperature, generator=generator)
        for (i, c), r in zip(rolling, ids):
            tail = "".join(VOCAB[t] for t in r).split(EOS)[0]
            rollouts[id(c)] = (c.prefix + tail)[: task.max_new_tokens]
    for i, path, child in children:
        response = child.prefix if child.terminal else rollouts[id(child)]
        _back_up([*path, child], outcome(task, prompts[i], response))


def _back_up(path: Sequence[Node], value: float) -> None:
    for node in path:
        node.visits += 1
        node.value_sum += value


def step_pairs(prompt: str, root: Node, margin: float) -> list[dict]:
    """Step-level preferences of one tree: at each node with >= 2 visited children, best-Q vs worst-Q child.
    Records are pair-queue records: prompt = the task prompt + the node's prefix, responses = [better, worse]
    steps ("$" is the eos step), meta = both Q values and the node's depth."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        visited = [(s, c) for s, c in node.children.items() if c.visits > 0]
        stack.extend(c for _, c in visited if not c.terminal)
        if len(visited) < 2:
            continue
        (best_step, best), (worst_step, worst) = max(visited, key=lambda sc: sc[1].q), min(visited, key=lambda sc: sc[1].q)
        if best.q - worst.q >= margin:
            out.append({"prompt": prompt + node.prefix, "responses": [best_step, worst_step],
                        "meta": {"q0": best.q, "q1": worst.q, "depth": len(node.prefix)}})
    return out
