"""The scorer runtime: guarded calls, timeouts, budgets, concurrency, cache and ensembles."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

import tao_core
from tao_core.ensemble import Ensemble, normalize
from tao_core.errors import TaoInputError
from tao_core.score_cache import ScoreCache
from tao_core.score_guard import score_group
from tao_core.scorer import ScorerLimits, load_scorer, scorer_options
from tao_core.scoring import score_groups
from tao_core.types import Candidate, Prompt, Score


def cand(pid: str, i: int, text: str) -> Candidate:
    return Candidate(prompt_id=pid, index=i, text=text, prompt_token_ids=[1], token_ids=[], logprobs=[])


def make(n_groups: int = 3, texts: tuple[str, ...] = ("a", "bb", "ccc")) -> tuple[list[Prompt], list[list[Candidate]]]:
    prompts = [Prompt(id=f"p{g}", text=f"question {g}") for g in range(n_groups)]
    groups = [[cand(p.id, i, t) for i, t in enumerate(texts)] for p in prompts]
    return prompts, groups


class LengthScorer:
    """Pointwise: the text length. Counts calls and candidates seen."""

    name = "length"
    version = "1"
    pointwise = True

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[int] = []

    def score(self, prompt, candidates):
        self.calls += 1
        self.seen.append(len(candidates))
        return [Score.ok(len(c.text)) for c in candidates]


class GroupScorer(LengthScorer):
    """Group-dependent: 1 for the longest text of the group, else 0."""

    name = "longest"
    pointwise = False

    def score(self, prompt, candidates):
        self.calls += 1
        self.seen.append(len(candidates))
        top = max(len(c.text) for c in candidates)
        return [Score.ok(float(len(c.text) == top)) for c in candidates]


class FailOn:
    """Raises on one prompt, scores 1 elsewhere."""

    name = "flaky"
    version = "2"

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def score(self, prompt, candidates):
        if prompt.id == self.bad:
            raise ValueError("boom")
        return [Score.ok(1.0) for _ in candidates]


class Garbage:
    name = "garbage"
    version = "1"

    def __init__(self, result) -> None:
        self.result = result

    def score(self, prompt, candidates):
        return self.result(candidates)


class HangOn:
    """Blocks on one prompt until released (a hang the test can end)."""

    name = "hang"
    version = "1"

    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.release = threading.Event()

    def score(self, prompt, candidates):
        if prompt.id == self.bad:
            self.release.wait(60)
        return [Score.ok(0.5) for _ in candidates]


class Spin:
    """Never returns on one prompt: a CPU loop that only a killed process stops."""

    name = "spin"
    version = "1"

    def score(self, prompt, candidates):
        if prompt.id == "p1":
            while True:
                pass
        return [Score.ok(2.0) for _ in candidates]


class Abstainer:
    name = "abstainer"
    version = "1"

    def score(self, prompt, candidates):
        return [Score.abstain("no opinion") for _ in candidates]


def test_scores_are_aligned_and_labelled():
    prompts, groups = make()
    out = score_groups(LengthScorer(), prompts, groups)
    assert [[s.value for s in g] for g in out] == [[1.0, 2.0, 3.0]] * 3
    for p, g in zip(prompts, out, strict=True):
        assert [s.index for s in g] == [0, 1, 2]
        assert {s.prompt_id for s in g} == {p.id}
        assert {(s.scorer, s.version) for s in g} == {("length", "1")}


def test_raising_scorer_gives_errors_for_its_group_and_the_run_goes_on():
    prompts, groups = make()
    out = score_groups(FailOn("p1"), prompts, groups)
    assert all(s.status == "ok" for s in out[0] + out[2])
    assert [s.status for s in out[1]] == ["error"] * 3
    assert "'flaky'" in out[1][0].reason and "ValueError: boom" in out[1][0].reason
    assert "Traceback" in out[1][0].details["traceback"]
    assert [s.index for s in out[1]] == [0, 1, 2] and out[1][0].prompt_id == "p1"


@pytest.mark.parametrize("result, words", [
    (lambda cs: [Score.ok(1.0)] * (len(cs) - 1), "returned 2 scores for 3 candidates"),
    (lambda cs: [0.0] * len(cs), "returned a float at position 0"),
    (lambda cs: None, "returned NoneType"),
    (lambda cs: {"a": 1}, "returned dict"),
])
def test_garbage_results_become_errors_naming_the_scorer(result, words):
    prompts, groups = make(1)
    out = score_groups(Garbage(result), prompts, groups)
    assert [s.status for s in out[0]] == ["error"] * 3
    assert "scorer 'garbage'" in out[0][0].reason and words in out[0][0].reason


def test_shared_score_objects_are_copied():
    prompts, groups = make(1)
    shared = Score.ok(1.0)
    out = score_groups(Garbage(lambda cs: [shared] * len(cs)), prompts, groups)
    assert [s.index for s in out[0]] == [0, 1, 2] and shared.index == -1


def test_hanging_scorer_is_abandoned_after_its_timeout_and_the_run_goes_on():
    prompts, groups = make()
    scorer = HangOn("p0")
    try:
        out = score_groups(scorer, prompts, groups, limits=ScorerLimits(timeout_s=0.2))
    finally:
        scorer.release.set()
    assert [s.status for s in out[0]] == ["error"] * 3
    assert "timed out after 0.2 s" in out[0][0].reason and "abandoned" in out[0][0].reason
    assert [s.value for s in out[1] + out[2]] == [0.5] * 6


def test_process_isolation_kills_a_spinning_scorer():
    prompts, groups = make()
    out = score_groups(Spin(), prompts, groups, limits=ScorerLimits(timeout_s=0.5, isolation="process"))
    assert [s.status for s in out[1]] == ["error"] * 3 and "killed" in out[1][0].reason
    assert [s.value for s in out[0] + out[2]] == [2.0] * 6
    assert multiprocessing.active_children() == []


def test_process_isolation_reports_exceptions():
    prompts, groups = make(2)
    out = score_groups(FailOn("p0"), prompts, groups, limits=ScorerLimits(isolation="process"))
    assert out[0][0].status == "error" and "ValueError: boom" in out[0][0].reason
    assert [s.value for s in out[1]] == [1.0] * 3


def test_call_budget():
    prompts, groups = make(4)
    scorer = LengthScorer()
    out = score_groups(scorer, prompts, groups, limits=ScorerLimits(max_calls=2))
    assert scorer.calls == 2
    assert [g[0].status for g in out] == ["ok", "ok", "error", "error"]
    assert "call budget of 2" in out[3][0].reason and out[3][0].prompt_id == "p3"


def test_limits_per_scorer_name_and_validation():
    prompts, groups = make(2)
    scorer = LengthScorer()
    score_groups(scorer, prompts, groups, limits={"length": ScorerLimits(max_calls=1)})
    assert scorer.calls == 1
    with pytest.raises(TaoInputError, match="workers"):
        ScorerLimits(workers=0)
    with pytest.raises(TaoInputError, match="isolation"):
        ScorerLimits(isolation="gpu")


def test_workers_score_groups_concurrently():
    n = 4
    barrier = threading.Barrier(n, timeout=10)

    class Waits:
        name = "waits"
        version = "1"

        def score(self, prompt, candidates):
            barrier.wait()  # only returns once n calls are in flight at the same time
            return [Score.ok(1.0) for _ in candidates]

    prompts, groups = make(n)
    out = score_groups(Waits(), prompts, groups, limits=ScorerLimits(workers=n))
    assert all(s.status == "ok" for g in out for s in g)


def test_prompt_group_count_mismatch():
    prompts, groups = make(2)
    with pytest.raises(TaoInputError, match="2 prompts but 1 candidate groups"):
        score_groups(LengthScorer(), prompts, groups[:1])


def test_empty_group():
    assert score_group(LengthScorer(), Prompt(id="x", text="q"), []) == []


def test_cache_hit_persists_on_disk(tmp_path):
    prompts, groups = make()
    scorer = LengthScorer()
    first = score_groups(scorer, prompts, groups, cache=tmp_path)
    again = ScoreCache(tmp_path)
    second = score_groups(scorer, prompts, groups, cache=again)
    assert scorer.calls == 3 and again.hits == 9 and again.misses == 0
    assert [[s.to_dict() for s in g] for g in first] == [[s.to_dict() for s in g] for g in second]


def test_cache_pointwise_scores_only_missing_candidates(tmp_path):
    cache = ScoreCache(tmp_path)
    prompts, groups = make(1)
    scorer = LengthScorer()
    score_groups(scorer, prompts, groups, cache=cache)
    groups2 = [[*groups[0], cand("p0", 3, "dddd")]]
    out = score_groups(scorer, prompts, groups2, cache=cache)
    assert scorer.seen == [3, 1]
    assert [s.value for s in out[0]] == [1.0, 2.0, 3.0, 4.0] and [s.index for s in out[0]] == [0, 1, 2, 3]


def test_cache_group_scorer_is_keyed_by_its_group(tmp_path):
    cache = ScoreCache(tmp_path)
    prompts, groups = make(1)
    scorer = GroupScorer()
    score_groups(scorer, prompts, groups, cache=cache)
    out = score_groups(scorer, prompts, [[*groups[0], cand("p0", 3, "dddd")]], cache=cache)
    assert scorer.seen == [3, 4]  # a new member changes everyone's score: the whole group is rescored
    assert [s.value for s in out[0]] == [0.0, 0.0, 0.0, 1.0]


def test_cache_keys_version_prompt_and_skips_errors(tmp_path):
    cache = ScoreCache(tmp_path)
    prompts, groups = make(2)
    scorer = LengthScorer()
    score_groups(scorer, prompts, groups, cache=cache)
    scorer.version = "2"
    score_groups(scorer, prompts, groups, cache=cache)
    assert scorer.calls == 4
    other = [Prompt(id="p0", text="another question")]
    score_groups(scorer, other, groups[:1], cache=cache)
    assert scorer.calls == 5
    flaky = FailOn("p0")
    score_groups(flaky, prompts, groups, cache=cache)
    hits = cache.hits
    out = score_groups(flaky, prompts, groups, cache=cache)
    assert out[0][0].status == "error" and cache.hits == hits + 3  # p1 served, p0's errors retried


def test_normalize():
    assert normalize([1.0, None, 3.0], "zscore") == [-1.0, None, 1.0]
    assert normalize([2.0, 4.0, 3.0], "minmax") == [0.0, 1.0, 0.5]
    assert normalize([5.0, 5.0], "zscore") == [0.0, 0.0]
    assert normalize([5.0, 5.0], "minmax") == [0.5, 0.5]
    assert normalize([7.0, None], "none") == [7.0, None]
    with pytest.raises(TaoInputError, match="unknown normalization"):
        normalize([1.0], "rank")


def test_ensemble_weights_normalization_and_parts():
    prompts, groups = make(1, ("a", "bbb", "cc"))
    ens = Ensemble([(LengthScorer(), 1.0), (GroupScorer(), 3.0)], "minmax")
    out = score_groups(ens, prompts, groups)[0]
    # length minmax: 0, 1, 0.5; longest minmax: 0, 1, 0 -> (1*x + 3*y) / 4
    assert [s.value for s in out] == [0.0, 1.0, 0.125]
    assert [s.index for s in out] == [0, 1, 2] and out[0].prompt_id == "p0" and out[0].scorer == "ensemble"
    parts = out[2].details["parts"]
    assert parts["length"] == {"status": "ok", "value": 2.0, "normalized": 0.5, "weight": 1.0, "reason": ""}
    assert parts["longest"]["normalized"] == 0.0
    assert "length: ok 2" in out[2].reason and "longest: ok 0" in out[2].reason
    assert "length@1*1" in ens.version and ens.version.endswith("minmax")


def test_ensemble_is_ok_where_any_part_is_and_keeps_the_reasons():
    prompts, groups = make(2)
    ens = Ensemble([(FailOn("p0"), 1.0), (Abstainer(), 1.0)])
    out = score_groups(ens, prompts, groups)
    assert [s.status for s in out[0]] == ["error"] * 3
    assert "flaky: error" in out[0][0].reason and "abstainer: abstain (no opinion)" in out[0][0].reason
    assert [s.status for s in out[1]] == ["ok"] * 3 and out[1][0].value == 0.0  # z-score of a constant part
    only_abstain = score_groups(Ensemble([(Abstainer(), 1.0)]), prompts, groups)
    assert only_abstain[0][0].status == "abstain"


def test_ensemble_score_method_guards_parts():
    prompts, groups = make(1)
    ens = Ensemble([(FailOn("p0"), 1.0), (LengthScorer(), 1.0)], "none")
    out = score_group(ens, prompts[0], groups[0])
    assert [s.value for s in out] == [1.0, 2.0, 3.0]
    assert out[0].details["parts"]["flaky"]["status"] == "error"


def test_ensemble_caches_each_part(tmp_path):
    prompts, groups = make(2)
    length = LengthScorer()
    ens = Ensemble([(length, 1.0), (GroupScorer(), 1.0)])
    score_groups(ens, prompts, groups, cache=tmp_path)
    score_groups(ens, prompts, groups, cache=tmp_path)
    assert length.calls == 2


def test_ensemble_validation():
    with pytest.raises(TaoInputError, match="at least one"):
        Ensemble([])
    with pytest.raises(TaoInputError, match="distinct"):
        Ensemble([(LengthScorer(), 1.0), (LengthScorer(), 1.0)])
    with pytest.raises(TaoInputError, match="weight of scorer 'length'"):
        Ensemble([(LengthScorer(), -1.0)])
    with pytest.raises(TaoInputError, match="normalization"):
        Ensemble([(LengthScorer(), 1.0)], "rank")
    with pytest.raises(TaoInputError, match="name"):
        score_groups(object(), *make(1))


def test_builtin_registrations():
    reg = tao_core.get_registry()
    assert {"sql-exec", "ensemble"} <= set(reg.names("scorers"))
    assert "sql" in reg.names("tasks")
    ens = tao_core.get_component("scorers", "ensemble")(scorers="sql-exec:2", options={"sql-exec": {"mode": "gold"}})
    assert isinstance(ens, Ensemble) and ens.parts[0][1] == 2.0 and ens.parts[0][0].mode == "gold"
    with pytest.raises(TaoInputError, match="bad weight"):
        Ensemble.from_names("sql-exec:heavy")


def test_builtin_loader_registers_present_modules_only():
    import types

    from tao_plugins.scorers import present_modules, register_tables

    mods = present_modules("tao_plugins.scorers", ("sql", "no_such_scorer_module"))
    assert [m.__name__ for m in mods] == ["tao_plugins.scorers.sql"]
    fake = types.ModuleType("fake")
    fake.SCORERS = {"plain": LengthScorer, "aliased": (GroupScorer, ["alias-a"])}
    seen = []
    register_tables(lambda name, obj, aliases=(): seen.append((name, obj, aliases)), [fake, types.ModuleType("empty")],
                    "SCORERS")
    assert seen == [("plain", LengthScorer, ()), ("aliased", GroupScorer, ("alias-a",))]


class Scaled(LengthScorer):
    """Pointwise: the text length times ``factor``, an option that changes every score."""

    name = "scaled"

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.options = {"factor": factor}

    def score(self, prompt, candidates):
        self.calls += 1
        return [Score.ok(len(c.text) * self.factor) for c in candidates]


def test_cache_keys_include_the_scorer_options(tmp_path):
    cache = ScoreCache(tmp_path)
    prompts, groups = make(1)
    one, two, two_again = Scaled(1.0), Scaled(2.0), Scaled(2.0)
    assert [s.value for s in score_groups(one, prompts, groups, cache=cache)[0]] == [1.0, 2.0, 3.0]
    assert [s.value for s in score_groups(two, prompts, groups, cache=cache)[0]] == [2.0, 4.0, 6.0]
    assert two.calls == 1  # other options: not served the first scorer's entries
    assert [s.value for s in score_groups(two_again, prompts, groups, cache=cache)[0]] == [2.0, 4.0, 6.0]
    assert two_again.calls == 0  # the same options: served from the cache
    p, g = prompts[0], groups[0]
    assert ScoreCache.keys("n", "1", p, g, True) == ScoreCache.keys("n", "1", p, g, True, scorer_options(LengthScorer()))


def test_load_scorer_records_the_options_it_was_given():
    plain, lines = load_scorer("majority"), load_scorer("majority", extract="last-line")
    assert scorer_options(plain) == "" and json.loads(scorer_options(lines)) == {"extract": "last-line"}
    sql = load_scorer("sql-exec", timeout_s=2)  # a scorer that sets its own options keeps them
    assert json.loads(scorer_options(sql))["timeout_s"] == 2 and "max_rows" in json.loads(scorer_options(sql))
