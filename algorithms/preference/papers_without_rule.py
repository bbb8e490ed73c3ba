"""Papers of the preference-LLM, preference-LLM? and preference-RL families that leave nothing to implement as a rule.

Each verdict comes from the paper's catalogue row (its `rule` column says "no") and its abstract
(../shared/papers.md, ../shared/seeds/); the reason quotes the abstract's own finding. Papers of these families
that do state an update but have no rule yet (GRPO-style ones among them) are not listed: `rlfleet algos
--papers` shows them as "not yet".
"""

from __future__ import annotations

from algorithms.rule import PaperWithoutRule

PAPERS_WITHOUT_RULE: list[PaperWithoutRule] = [
    PaperWithoutRule(
        "P104",
        "analysis of existing objectives: \"approaches that use on-policy sampling or attempt to push down the "
        "likelihood on certain responses (i.e., employ a 'negative gradient') outperform offline and maximum "
        "likelihood objectives\"; it proposes no new loss",
    ),
    PaperWithoutRule(
        "P120",
        "analysis of training dynamics: \"the SFT phase generally establishes a model's values, and subsequent "
        "preference optimization rarely re-aligns these values\"; no new update rule",
    ),
    PaperWithoutRule(
        "P252",
        "application: \"We explore three training strategies: Supervised Fine-Tuning (SFT), Direct Preference "
        "Optimization (DPO), and Group Relative Policy Optimization (GRPO)\" for code-efficiency refinement, all "
        "existing rules",
    ),
]
