"""The ``sql-exec`` consensus vote, hardened against degenerate agreement (label-free).

Voting over result sets rewards the queries that agree most easily, not the ones that answer:
on a small model it drifts toward ``SELECT COUNT(*) ...``, whose one number many different queries
(and many copies of one query) return. Three rules make such agreement cheap:

**Informativeness.** A result set with ``D`` distinct cell values (over its rows x columns,
normalized as :func:`tao_plugins.scorers.sql.result_key` does) weighs::

    I = 0                          when the result is empty, or one record of only 0s and NULLs
    I = c + (1 - c) * (1 - 1/D)    otherwise, c = constant_weight (default 0.25)

A record of only 0s and NULLs is what an aggregate over no rows returns (``COUNT`` 0, ``SUM``/``MAX``
NULL): a query whose filter matched nothing, as empty as an empty result. Without this rule a group
on a small model agreed on ``SELECT COUNT(*) FROM books WHERE genre = '<an invented genre>'`` (seven
candidates, five structures, count 0) and trained toward inventing filter values.

so a column of many distinct names weighs nearly 1, while a single record (one distinct row: a
``COUNT``, ``SELECT 1 FROM t``, or a count with a literal column added) and a table dump (every
query of the cluster selects ``*``, which answers no question however wide its result) weigh ``c``
and count as constants below. Without the dump rule, ``SELECT * FROM t`` outweighed every narrow
correct answer. A failed query (an error, no query found) has no result
and casts no vote.

**Structure.** A query's structure (:func:`query_structure`) is the set of its tokens, lower-cased,
comments dropped, string and number literals replaced by ``?`` and quoted identifiers unquoted:
copies, re-spacings, re-casings, reordered select lists, changed literals and ``AS`` aliases are
one structure;
``COUNT(*)`` and ``COUNT(name)`` are two. A cluster (the candidates whose results are equal) of
``m`` candidates written in ``S`` distinct structures gets the support ``S + k * (m - S)``,
``k = copy_weight`` (default 0.25): a copy counts a quarter of an independent query.

**The vote.** A cluster weighs ``W = I * support``. It may win only when it is non-empty, holds at
least two candidates, and, when its result is a constant (a single record or a dump), was written
in at least ``constant_min_structures`` (default 2) distinct structures: an empty result or a
constant cannot win alone (on copies of one query). The winner is the eligible cluster of largest
``W``; the group has no informative consensus when no cluster is eligible, when two eligible
clusters tie for the largest ``W``, or when the winner's ``margin = W_winner / sum(W)`` (its
weighted share of all the group's votes) is below ``min_share``.

Scores keep a strict order within a group: a failed query (an error, a denied statement, no query
found) scores 0.0, below every query that ran (``valid_value``, default 0.1, for one that ran but
is not in the winning cluster, an empty result included), below the winning cluster's 1.0. A group
with no informative consensus still ranks by validity when some of its queries failed (ran:
``valid_value``, failed: 0.0); when all of them ran, it abstains: there is nothing to rank. A
query the sandbox stopped (time, memory, result budget) is an ``error`` score: its result is
unknown. Separating executable from failing queries in the reward follows SQL-R1 (Ma et al., 2025,
arXiv:2504.08600), whose execution reward penalizes a query that does not run.

Every score's ``details`` carry ``margin`` (the winner's weighted share, in [0, 1]) and ``majority``
(a stable id of the winning result set, :func:`result_id`), both None without a winner, for the
margin gate and the flip-rate monitor (``tao_core.monitors``: a group without a margin is left as
it is, so a group ranked by validity only is never gated away).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["Ballot", "Cluster", "ConsensusRules", "Verdict", "informativeness", "matched_nothing",
           "query_structure", "result_id", "vote"]

_TOKEN = re.compile(
    r"--[^\n]*|/\*.*?(?:\*/|\Z)"  # comments (dropped)
    r"|[xX]'[0-9a-fA-F]*'|'(?:[^']|'')*'"  # blob and string literals
    r"|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]"  # quoted identifiers
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"  # numbers
    r"|\w+|<=|>=|<>|!=|==|\|\||[-+*/%<>=]",  # words, operators
    re.DOTALL)


_STAR = re.compile(r"(?is)\bselect\s+(?:distinct\s+|all\s+)?(?:[\w\"`\[\]]+\s*\.\s*)?\*")


def is_dump(sql: str) -> bool:
    """Whether ``sql`` selects ``*`` (a table dumped whole, not an answer to a question)."""
    return bool(_STAR.search(sql))


def query_structure(sql: str) -> frozenset[str]:
    """The set of ``sql``'s tokens: lower-cased, literals as ``?``, quoted identifiers unquoted, no
    comments, no ``AS alias`` (a renaming changes nothing a query computes)."""
    out = set()
    alias = False
    for tok in _TOKEN.findall(sql):
        if tok.startswith(("--", "/*")):
            continue
        if alias:
            alias = False
            continue
        if tok.lower() == "as":
            alias = True
            continue
        if tok[0] in "'0123456789." or tok[:2].lower() == "x'":
            out.add("?")
        elif tok[0] in "\"`[":
            out.add(tok[1:-1].replace('""', '"').lower())
        else:
            out.add(tok.lower())
    return frozenset(out)


def _rows(key: tuple) -> list[tuple]:
    """The distinct rows of a result key (``("bag", frozenset((row, count)))`` or ``("list", rows)``)."""
    kind, body = key
    return [row for row, _ in body] if kind == "bag" else list(body)


def _distinct_values(key: tuple) -> int:
    return len({v for row in _rows(key) for v in row})


def is_single_record(key: tuple) -> bool:
    """At most one distinct row (a ``COUNT``, or a constant with literal columns added)."""
    return len(set(_rows(key))) <= 1


def matched_nothing(key: tuple) -> bool:
    """Empty, or one distinct record of only 0s and NULLs (an aggregate over no rows)."""
    rows = set(_rows(key))
    return not rows or (len(rows) == 1 and all(v is None or (type(v) in (int, float) and v == 0)
                                               for row in rows for v in row))


def informativeness(key: tuple, constant_weight: float, dump: bool = False) -> float:
    """``I`` of a result key (see the module docstring): 0 when empty or only 0s and NULLs in one
    record, ``c`` for another single record or a table dump, else ``c + (1 - c) * (1 - 1/D)``."""
    if matched_nothing(key):
        return 0.0
    if dump or is_single_record(key):
        return constant_weight
    return constant_weight + (1.0 - constant_weight) * (1.0 - 1.0 / _distinct_values(key))


def _canon(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def result_id(key: tuple) -> str:
    """A stable id of a result key: the first 16 hex digits of the SHA-256 of its canonical form
    (rows sorted for a multiset, integral floats as ints), the same in every process."""
    kind, body = key
    if kind == "bag":
        canon = sorted((repr(tuple(_canon(v) for v in row)), count) for row, count in body)
    else:
        canon = [repr(tuple(_canon(v) for v in row)) for row in body]
    return hashlib.sha256(repr((kind, canon)).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ConsensusRules:
    """The vote's options (the scorer's keyword arguments of the same names)."""

    min_share: float = 0.3  # the winner's margin (weighted share of the group's votes) must reach this
    constant_weight: float = 0.25  # I of a single-valued result; 1 - 1/D scales the rest up to 1
    copy_weight: float = 0.25  # support of a copy of a structure already in the cluster (a new one: 1)
    constant_min_structures: int = 2  # distinct structures a single-valued result needs to win
    valid_value: float = 0.1  # score of a query that ran but lost; a failed one scores 0.0, a winner 1.0

    def check(self) -> None:
        """ValueError naming the option that is out of range."""
        for name, lo, hi in (("min_share", 0.0, 1.0), ("constant_weight", 0.0, 1.0), ("copy_weight", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"sql-exec: {name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if not self.min_share > 0:
            raise ValueError(f"sql-exec: min_share must be in (0, 1], got {self.min_share!r}")
        if isinstance(self.constant_min_structures, bool) or not isinstance(self.constant_min_structures, int) \
                or self.constant_min_structures < 1:
            raise ValueError(f"sql-exec: constant_min_structures must be an integer >= 1, "
                             f"got {self.constant_min_structures!r}")
        if isinstance(self.valid_value, bool) or not isinstance(self.valid_value, int | float) \
                or not 0.0 < self.valid_value < 1.0:
            raise ValueError(f"sql-exec: valid_value must be in (0, 1) (a failed query scores 0, a winner 1), "
                             f"got {self.valid_value!r}")


@dataclasses.dataclass(frozen=True)
class Ballot:
    """A query that ran: its text and its result key."""

    sql: str
    key: tuple


@dataclasses.dataclass
class Cluster:
    """The candidates that returned one result."""

    id: int  # rank by weight (0: heaviest), ties in order of first appearance
    key: tuple
    members: int
    structures: int  # structurally distinct queries among the members
    info: float  # I of the result
    weight: float  # W = I * (structures + copy_weight * (members - structures))
    constant: bool  # a single record, or a table dump (every member selects *): needs distinct structures to win


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The vote's outcome: the winning cluster (None: no informative consensus, see ``reason``)."""

    clusters: dict[tuple, Cluster]
    winner: Cluster | None
    margin: float | None  # W_winner / sum(W); None without a winner
    majority: str | None  # result_id of the winner's result
    reason: str  # why there is no winner ("" when there is one)


def _clusters(ballots: Sequence[Ballot], rules: ConsensusRules) -> dict[tuple, Cluster]:
    members: dict[tuple, list[frozenset[str]]] = {}
    dumps: dict[tuple, bool] = {}
    for b in ballots:
        members.setdefault(b.key, []).append(query_structure(b.sql))
        dumps[b.key] = dumps.get(b.key, True) and is_dump(b.sql)  # every member selects *
    out = []
    for key, structs in members.items():
        s, m = len(set(structs)), len(structs)
        info = informativeness(key, rules.constant_weight, dumps[key])
        out.append(Cluster(-1, key, m, s, info, info * (s + rules.copy_weight * (m - s)),
                           dumps[key] or is_single_record(key)))
    out.sort(key=lambda c: -c.weight)  # stable: ties keep their order of first appearance
    for i, c in enumerate(out):
        c.id = i
    return {c.key: c for c in out}


def _ineligible(c: Cluster, rules: ConsensusRules) -> str:
    """Why cluster ``c`` may not win ("" when it may)."""
    if c.info == 0:
        return "empty result" if not _rows(c.key) else "a result of only 0/NULL (an aggregate over no rows)"
    if c.members < 2:
        return "a single candidate"
    if c.constant and c.structures < rules.constant_min_structures:
        return (f"a single-valued result from {c.structures} distinct quer{'y' if c.structures == 1 else 'ies'} "
                f"(needs {rules.constant_min_structures})")
    return ""


def vote(ballots: Sequence[Ballot], rules: ConsensusRules) -> Verdict:
    """The weighted vote of the queries that ran (see the module docstring)."""
    clusters = _clusters(ballots, rules)
    total = sum(c.weight for c in clusters.values())
    eligible = [c for c in clusters.values() if not _ineligible(c, rules)]
    if not eligible:
        why = "; ".join(f"cluster {c.id}: {_ineligible(c, rules)}" for c in list(clusters.values())[:4])
        reason = "no query returned a result" if not clusters else f"no cluster may win ({why})"
        return Verdict(clusters, None, None, None, reason)
    best = eligible[0]
    if len(eligible) > 1 and math.isclose(eligible[1].weight, best.weight, rel_tol=1e-9):
        return Verdict(clusters, None, None, None, f"tie: clusters {best.id} and {eligible[1].id} both weigh "
                                                   f"{best.weight:.3g}")
    margin = best.weight / total
    if margin < rules.min_share:
        return Verdict(clusters, None, None, None, f"the heaviest eligible cluster's margin {margin:.3f} < "
                                                   f"min_share {rules.min_share:g}")
    return Verdict(clusters, best, margin, result_id(best.key), "")
