"""Papers of the on-policy-PG, trust-region and optimizer families that leave nothing to implement as a rule.

Each verdict was made from the paper's catalogue row and abstract (../shared/papers.md, ../shared/seeds/).
Papers of these families that do state an implementable update but have no rule yet are not listed here
(P152, P155, P163, P166, P167, P175, P193, P216, P283): `rlfleet algos --papers` shows them as "not yet".
"""

from __future__ import annotations

from algorithms.rule import PaperWithoutRule

PAPERS_WITHOUT_RULE: list[PaperWithoutRule] = [
    PaperWithoutRule(
        "P144",
        "survey: an overview of on-policy policy-gradient methods (PG-theorem proof, convergence results, "
        "comparison of existing algorithms); it proposes no new update",
    ),
    PaperWithoutRule(
        "P169",
        "analysis: convergence bounds for clipped (S)GD at any threshold; the clipping rule it studies is "
        "P243's, already the grad_clip option",
    ),
    PaperWithoutRule(
        "P225",
        "explanation method: COUNTERPOL searches for a minimally changed copy of an already-trained policy "
        "that reaches a chosen return; it analyses policies, it does not train agents",
    ),
    PaperWithoutRule(
        "P287",
        "no new update rule: a graph-network policy that proposes a desired next network state, mapped to "
        "actions by a convex program, trained with an existing RL algorithm; it needs network-flow envs",
    ),
    PaperWithoutRule(
        "P041",
        "outside RL: a communication scheme (shared random seeds, one scalar per step) for decentralized "
        "zeroth-order (SPSA/MeZO) language-model finetuning on a supervised loss",
    ),
    PaperWithoutRule(
        "P137",
        "outside RL, no new update: block-wise 8-bit storage of Adam/momentum optimizer states, which "
        "approximates Adam's own update to save memory on billion-parameter models",
    ),
]
