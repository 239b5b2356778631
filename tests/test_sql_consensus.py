"""``sql-exec`` consensus that resists degenerate agreement, on the Spider sample's ``concert_singer``.

The singer table: Joe Sharp 52, Timbaland 32, Justin Brown 29, Rose White 41, John Nizinik 43,
Tribal King 25. A ``COUNT(*)`` agrees with its copies for free; two different queries listing the
same names are evidence. The hand computations use the defaults: constant_weight c = 0.25,
copy_weight k = 0.25, constant_min_structures 2, valid_value 0.1, min_share 0.3.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from tao_plugins.scorers.majority import MajorityVoteScorer
from tao_plugins.scorers.sql import SqlExecScorer, result_key
from tao_plugins.scorers.sql_consensus import (
    Ballot,
    ConsensusRules,
    informativeness,
    query_structure,
    result_id,
    vote,
)

from tao_core.types import Candidate, Prompt

SPIDER = Path(__file__).resolve().parent / "data" / "spider-sample"
CONCERT = SPIDER / "concert_singer.sqlite"

COUNTS = ["SELECT COUNT(*) FROM singer", "select count(*) from singer", "SELECT  COUNT(*)\nFROM singer;",
          "```sql\nSELECT count(*) FROM singer\n```", "SELECT COUNT(*) FROM singer -- all of them"]
OLD_NAMES = ["SELECT Name FROM singer WHERE Age > 40",  # Joe Sharp, Rose White, John Nizinik
             "SELECT s.Name FROM singer AS s WHERE s.Age BETWEEN 41 AND 60"]
FAILED = ["SELECT Name FROM singers", "```sql\nWITH x AS (SELECT 1) DELETE FROM singer\n```", "I am not sure."]


def prompt(**meta) -> Prompt:
    return Prompt(id="q", text="Which singers are older than 40?", metadata={"db_path": str(CONCERT), **meta})


def cands(texts: list[str]) -> list[Candidate]:
    return [Candidate("q", i, t, [1], [], []) for i, t in enumerate(texts)]


def scorer(**options) -> SqlExecScorer:
    return SqlExecScorer(allowed_dirs=[SPIDER], **options)


def info(d: int, c: float = 0.25) -> float:
    """I of a non-empty result with d distinct values, by hand."""
    return c + (1 - c) * (1 - 1 / d)


def test_the_informative_cluster_beats_copies_of_a_count():
    scores = scorer().score(prompt(), cands(COUNTS + OLD_NAMES))
    assert [s.value for s in scores] == [0.1] * 5 + [1.0, 1.0]
    # by hand: the names weigh I(3) * 2 structures; the count weighs c * (1 structure + k * 4 copies)
    w_names, w_count = info(3) * 2, 0.25 * (1 + 0.25 * 4)
    assert scores[0].details["margin"] == pytest.approx(w_names / (w_names + w_count))
    assert scores[0].details["structures"] == 1 and scores[0].details["cluster_size"] == 5
    assert scores[5].details["structures"] == 2 and scores[5].details["weight"] == pytest.approx(w_names)
    # the hardening decides it: counted by raw copies, with constants at full weight, the count wins
    plain = scorer(constant_weight=1.0, copy_weight=1.0, constant_min_structures=1).score(prompt(), cands(COUNTS + OLD_NAMES))
    assert [s.value for s in plain] == [1.0] * 5 + [0.1, 0.1]


def test_structurally_different_queries_outweigh_copies():
    """Two informative clusters of the same size: the one written two ways wins."""
    copies = ["SELECT Name FROM singer WHERE Country = 'France'"] * 2
    both = ["SELECT Name FROM singer WHERE Age < 30", "SELECT Name FROM singer WHERE Age BETWEEN 20 AND 29"]
    for texts in (copies + both, both + copies):
        scores = scorer().score(prompt(), cands(texts))
        got = dict(zip(texts, (s.value for s in scores), strict=True))
        assert got[both[0]] == got[both[1]] == 1.0 and got[copies[0]] == 0.1, texts
    assert scorer(copy_weight=1.0).score(prompt(), cands(copies + both))[0].value == 1.0  # France: 4 names


def test_empty_and_constant_results_never_win_alone():
    empty = "SELECT Name FROM singer WHERE Age > 100"
    constants = COUNTS[:3] + ["SELECT 1 FROM singer"] * 3  # a count's copies; six rows of one value
    for texts in (COUNTS, ["SELECT 1 FROM singer"] * 3, [empty] * 5, constants + [empty] * 3,
                  COUNTS + ["SELECT Name FROM singer"]):
        scores = scorer().score(prompt(), cands(texts))
        assert {s.status for s in scores} == {"abstain"}, texts  # nothing failed: no informative consensus
        assert "no informative consensus" in scores[0].reason
        assert scores[0].details["majority"] is None and scores[0].details["margin"] is None
    # the informative minority wins over a larger empty and constant majority
    scores = scorer().score(prompt(), cands([empty] * 4 + COUNTS[:3] + OLD_NAMES))
    assert [s.value for s in scores] == [0.1] * 7 + [1.0, 1.0]
    assert scores[0].reason == "empty result"
    # a constant written two distinct ways may win (most questions have one number as their answer)
    scores = scorer().score(prompt(), cands(["SELECT COUNT(*) FROM singer", "SELECT COUNT(Name) FROM singer",
                                             "SELECT COUNT(*) FROM stadium"]))
    assert [s.value for s in scores] == [1.0, 1.0, 0.1]
    # one informative query alone is not a consensus either
    lone = scorer().score(prompt(), cands([OLD_NAMES[0], "SELECT Name FROM singer", "SELECT Age FROM singer"]))
    assert {s.status for s in lone} == {"abstain"} and "a single candidate" in lone[0].reason


@pytest.mark.parametrize("texts", [
    COUNTS[:2] + OLD_NAMES + FAILED,  # a winner
    COUNTS[:3] + ["SELECT Name FROM singer WHERE Age > 100"] + FAILED,  # no winner: ranked by validity only
    ["SELECT Name FROM singer", "SELECT Age FROM singer"] + FAILED,  # no winner
])
def test_errors_score_strictly_below_every_valid_candidate(texts):
    scores = scorer().score(prompt(), cands(texts))
    assert all(s.status == "ok" for s in scores)
    failed, valid = scores[-3:], scores[:-3]
    assert max(s.value for s in failed) < min(s.value for s in valid)
    assert [s.value for s in failed] == [0.0] * 3
    assert failed[0].reason.startswith("OperationalError: no such table") and "not authorized" in failed[1].reason
    assert failed[2].reason == "no SQL query found in the answer"
    winners = [s for s in valid if s.value == 1.0]
    assert all(s.value < 1.0 for s in valid if s not in winners) and (not winners or len(winners) < len(valid))


def test_margin_and_majority_in_every_score():
    texts = COUNTS[:2] + OLD_NAMES + ["SELECT Name FROM singer", "nope"]
    scores = scorer().score(prompt(), cands(texts))
    assert len({(s.details["margin"], s.details["majority"]) for s in scores}) == 1  # the group's, on every score
    names_key = result_key([("Joe Sharp",), ("Rose White",), ("John Nizinik",)], False)
    assert scores[0].details["majority"] == result_id(names_key)
    w = [info(3) * 2, 0.25 * 1.25, info(6)]  # names (2 structures), count (1 + a copy), all six names (alone)
    assert scores[0].details["margin"] == pytest.approx(w[0] / sum(w))
    shuffled = scorer().score(prompt(), cands(texts[::-1]))
    assert shuffled[0].details["majority"] == scores[0].details["majority"]
    other = scorer().score(prompt(), cands(["SELECT Name FROM singer WHERE Age < 30"] * 2))
    assert other[0].details["majority"] != scores[0].details["majority"]
    assert other[0].details["margin"] == 1.0


def test_result_id_is_stable_across_row_order_numeric_type_and_process():
    bag = result_key([(1, "a"), (2.0, None), (1, "a")], False)
    assert result_id(bag) == result_id(result_key([(2, None), (1, "a"), (1, "a")], False))
    assert result_id(bag) != result_id(result_key([(1, "a"), (2, None)], False))  # a multiset
    ordered = result_key([(1,), (2,)], True)
    assert result_id(ordered) != result_id(result_key([(2,), (1,)], True))
    code = ("from tao_plugins.scorers.sql import result_key; from tao_plugins.scorers.sql_consensus import result_id; "
            "print(result_id(result_key([(1, 'a'), (2.0, None), (1, 'a')], False)))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.strip() == result_id(bag)


def test_informativeness_weights():
    c = 0.25
    assert informativeness(result_key([], False), c) == 0.0
    assert informativeness(result_key([(6,)], False), c) == c  # a count
    assert informativeness(result_key([(1,)] * 6, False), c) == c  # one value, six rows
    assert informativeness(result_key([("a", "b")], False), c) == c  # one record, however many columns
    assert informativeness(result_key([("a", "b"), ("c", "d")], False), c) == pytest.approx(c + (1 - c) * 0.75)
    assert informativeness(result_key([("a",), ("b",)], False), c, dump=True) == c  # SELECT * dumps a table
    assert informativeness(result_key([("a",), ("b",), ("c",), ("d",)], True), c) == pytest.approx(c + (1 - c) * 0.75)
    assert informativeness(result_key([(None,), (None,)], False), 0.0) == 0.0
    # an aggregate over no rows (COUNT 0, SUM/MAX NULL, or both) is as empty as no rows
    for nothing in ([(0,)], [(0.0,)], [(None,)], [(0, None)], [(None,), (None,)]):
        assert informativeness(result_key(nothing, False), c) == 0.0, nothing
    for something in ([(1,)], [(0, 1)], [("0",)], [(0,), (1,)], [(False,), (True,)]):
        assert informativeness(result_key(something, False), c) > 0.0, something


def test_a_zero_count_cannot_win_however_many_structures_agree():
    """Seen in a run: invented filter values, many query shapes, one shared count of 0."""
    ballots = [Ballot(q, result_key([(0,)], False)) for q in (
        "SELECT COUNT(*) FROM books WHERE genre = 'x'", "SELECT COUNT(*) FROM books WHERE genre = 'y' ORDER BY title",
        "SELECT COUNT(*) FROM books WHERE title = 'z' AND author_id = 3", "SELECT COUNT(book_id) FROM books WHERE genre = 'w'")]
    ballots += [Ballot("SELECT genre, COUNT(*) FROM books GROUP BY genre", result_key([("a", 2), ("b", 3)], False))]
    verdict = vote(ballots, ConsensusRules())
    assert verdict.winner is None and "only 0/NULL" in verdict.reason
    counted = [Ballot(b.sql, result_key([(7,)], False)) for b in ballots[:4]]  # a real count of 7 still can
    assert vote(counted, ConsensusRules()).winner is not None


def test_query_structure():
    same = ["SELECT Name FROM singer WHERE Age > 40", "select name\n  from SINGER where age > 41 -- older",
            'SELECT "Name" FROM [singer] WHERE Age > 4e1', "SELECT Name FROM singer WHERE Age > 40 /* x */"]
    assert len({query_structure(q) for q in same}) == 1
    different = ["SELECT count(*) FROM singer", "SELECT count(Name) FROM singer",
                 "SELECT Name FROM singer WHERE Age < 40", "SELECT Name FROM singer WHERE Country = 'x'"]
    assert len({query_structure(q) for q in different}) == len(different)
    assert query_structure("SELECT count(*) FROM singer AS s") == query_structure("SELECT count(*) FROM singer")
    assert query_structure("SELECT 'a b c', x'00', 3.5") == {"select", "?"}


class NoGold(dict):
    """Prompt metadata that fails the test when anything reads ``gold_sql``."""

    def _check(self, key):
        if key == "gold_sql":
            raise AssertionError("the scorer read the gold query")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._check(key)
        return super().__contains__(key)

    def __iter__(self):
        raise AssertionError("the scorer iterated over the metadata")

    items = keys = values = copy = __iter__


def test_consensus_never_reads_the_gold_query():
    p = prompt()
    p.metadata = NoGold(db_path=str(CONCERT), gold_sql="SELECT Name FROM singer WHERE Age > 40")
    scores = scorer().score(p, cands(COUNTS + OLD_NAMES + FAILED))
    assert [s.value for s in scores] == [0.1] * 5 + [1.0, 1.0] + [0.0] * 3
    with pytest.raises(AssertionError, match="read the gold query"):  # the guard works: gold mode trips it
        scorer(mode="gold").score(p, cands(OLD_NAMES))


def test_options_are_keyword_arguments_with_hardening_defaults():
    params = inspect.signature(SqlExecScorer).parameters
    assert {"min_share", "constant_weight", "copy_weight", "constant_min_structures", "valid_value"} <= set(params)
    s = scorer()
    assert s.version == "4"
    assert {k: s.options[k] for k in ("constant_weight", "copy_weight", "constant_min_structures", "valid_value")} \
        == {"constant_weight": 0.25, "copy_weight": 0.25, "constant_min_structures": 2, "valid_value": 0.1}
    for bad, match in [({"valid_value": 1.0}, "valid_value"), ({"valid_value": 0.0}, "valid_value"),
                       ({"constant_weight": 1.5}, "constant_weight"), ({"copy_weight": -0.1}, "copy_weight"),
                       ({"constant_min_structures": 0}, "constant_min_structures"), ({"min_share": 0}, "min_share")]:
        with pytest.raises(ValueError, match=match):
            SqlExecScorer(**bad)


def test_gold_mode_is_unchanged_by_the_consensus_rules():
    p = prompt(gold_sql="SELECT count(*) FROM singer")
    for options in ({}, {"constant_weight": 0.0, "valid_value": 0.5, "constant_min_structures": 9}):
        got = scorer(mode="gold", **options).score(p, cands(COUNTS[:2] + OLD_NAMES[:1] + FAILED[:1]))
        assert [s.value for s in got] == [1.0, 1.0, 0.0, 0.0]


def test_majority_vote_reports_margin_and_majority_without_changing_values():
    p = Prompt(id="p", text="What is 47 plus 38?")
    group = [Candidate("p", i, t, [1], [], []) for i, t in enumerate(["85", "Answer: 85", "84", "85", "no idea"])]
    scores = MajorityVoteScorer().score(p, group)
    assert [s.value for s in scores] == [1.0, 1.0, 0.0, 1.0, None]
    assert all(s.details["majority"] == "85" and s.details["margin"] == pytest.approx(3 / 5) for s in scores)
    tie = MajorityVoteScorer().score(p, group[1:3])
    assert all(s.details["majority"] is None and s.details["margin"] is None for s in tie)
    weak = MajorityVoteScorer(min_share=0.9).score(p, group)
    assert all(s.status == "abstain" and s.details["majority"] == "85" for s in weak)
    assert weak[0].details["margin"] == pytest.approx(3 / 5)

