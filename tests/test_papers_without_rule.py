"""The on-policy/trust-region/optimizer papers judged to have no rule: registered, catalogued, explained."""

from algorithms.onpolicy.papers_without_rule import PAPERS_WITHOUT_RULE
from algorithms.registry import PAPERS_WITHOUT_RULE as REGISTERED
from algorithms.registry import RULES
from rlfleet.papers import load_papers, paper_statuses

EXPECTED = {"P144", "P169", "P225", "P287", "P041", "P137"}
# The families these verdicts belong to (a "?" in the catalogue marks a guessed family).
FAMILIES = {"on-policy-PG", "trust-region", "optimizer"}


def test_each_verdict_is_registered_once_with_a_reason():
    ids = [entry.paper_id for entry in PAPERS_WITHOUT_RULE]
    assert sorted(ids) == sorted(EXPECTED) and len(ids) == len(set(ids))
    for entry in PAPERS_WITHOUT_RULE:
        assert REGISTERED[entry.paper_id] is entry  # the registry discovered this module
        assert len(entry.reason) > 40 and "\n" not in entry.reason


def test_verdicts_name_catalogued_papers_of_these_families():
    catalogue = {paper["id"]: paper for paper in load_papers()}
    for entry in PAPERS_WITHOUT_RULE:
        assert entry.paper_id in catalogue
        assert catalogue[entry.paper_id]["family"].rstrip("?") in FAMILIES


def test_no_paper_is_both_implemented_and_without_rule():
    implemented = {paper_id for rule in RULES.values() for paper_id in rule.paper_ids}
    assert not implemented & {entry.paper_id for entry in PAPERS_WITHOUT_RULE}


def test_papers_listing_shows_the_reason():
    rows = {row["id"]: row for row in paper_statuses()}
    for entry in PAPERS_WITHOUT_RULE:
        assert rows[entry.paper_id]["status"] == "no rule"
        assert rows[entry.paper_id]["detail"] == entry.reason
