"""The ``majority-vote`` and ``rules`` scorers."""

from __future__ import annotations

import pytest
from tao_plugins.scorers.majority import MajorityVoteScorer, extract_answer, numbers_in

from tao_core import TaoInputError, get_component
from tao_core.types import Candidate, Prompt

P = Prompt(id="p", text="What is 47 plus 38? Give the final answer on the last line as 'Answer: <number>'.")


def group(*texts: str) -> list[Candidate]:
    return [Candidate(prompt_id="p", index=i, text=t, prompt_token_ids=[1], token_ids=[], logprobs=[])
            for i, t in enumerate(texts)]


# ---- extraction -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "mode", "kw", "want"), [
    ("47 + 38 = 85.", "number", {}, "85"),
    ("Step 1: 40 + 30 = 70\nStep 2: 7 + 8 = 15\nAnswer: 85\nHope these 2 steps help", "number", {}, "85"),
    ("The answer is 1,250.", "number", {}, "1250"),
    ("It costs 12.50 dollars", "number", {}, "12.5"),
    ("x = -3", "number", {}, "-3"),
    ("no digits here", "number", {}, None),
    ("Let me think.\nFinal answer: Paris.", "answer-line", {}, "paris"),
    ("Answer: 7.0", "answer-line", {}, "7"),
    ("I think it is Paris.", "answer-line", {}, None),
    ('{"reasoning": "40+30+15", "answer": 85}', "json-field", {"field": "answer"}, "85"),
    ('Sure:\n```json\n{"result": {"city": "Paris"}}\n```', "json-field", {"field": "result.city"}, "paris"),
    ('{"answer": null}', "json-field", {"field": "answer"}, None),
    ("not json {", "json-field", {"field": "answer"}, None),
    ("<final>42</final> then <final>43</final>", "regex", {"pattern": r"<final>(\d+)</final>"}, "43"),
    ("nothing", "regex", {"pattern": r"<final>(\d+)</final>"}, None),
    ("line one\n\nYES  \n", "last-line", {}, "yes"),
])
def test_extract_answer(text, mode, kw, want):
    assert extract_answer(text, mode, **kw) == want


def test_numbers_in_handles_separators_and_lists():
    assert numbers_in("1,234 and 12,34 and 5.") == ["1234", "12", "34", "5"]
    assert numbers_in("63-5=58") == ["63", "5", "58"]


# ---- majority-vote ----------------------------------------------------------------------------

def test_rewards_agreement_with_the_majority():
    s = MajorityVoteScorer().score(P, group("47 + 38 = 85.", "Answer: 85", "It is 75.", "85", "The answer is 84"))
    assert [x.status for x in s] == ["ok"] * 5
    assert [x.value for x in s] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert s[0].details["majority"] == "85" and s[0].details["share"] == pytest.approx(3 / 5)
    assert s[0].scorer == "majority-vote"


def test_only_voter_templates_vote():
    """Structured-prompt voters decide the majority; the on-policy samples are scored against it
    even when they outnumber the voters with another answer."""
    cands = group("84", "84", "no idea", "Answer: 85", "85", "86", "hmm")
    for c, template in zip(cands, ["default"] * 3 + ["column"] * 4, strict=True):
        c.template = template
    s = MajorityVoteScorer(voters=["column"]).score(P, cands)
    assert [x.status for x in s] == ["ok"] * 6 + ["abstain"]  # a voter without an answer does not vote
    assert [x.value for x in s[:6]] == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # a non-voter without one scores 0
    assert s[0].details["majority"] == "85" and s[0].details["share"] == pytest.approx(2 / 4)
    assert all(x.status == "abstain" for x in MajorityVoteScorer(voters=["column"], min_share=0.6).score(P, cands))
    without = MajorityVoteScorer(voters=["steps"]).score(P, cands)  # no candidate under that template
    assert all(x.status == "abstain" and "voters (templates ['steps'])" in x.reason for x in without)


def test_candidates_without_an_answer_abstain_and_do_not_vote():
    s = MajorityVoteScorer().score(P, group("85", "I don't know", "85", "84"))
    assert [x.status for x in s] == ["ok", "abstain", "ok", "ok"]
    assert s[1].value is None and "no answer" in s[1].reason
    assert [x.value for x in s if x.is_ok] == [1.0, 1.0, 0.0]


def test_share_reward():
    s = MajorityVoteScorer(reward="share").score(P, group("85", "85", "84", "85"))
    assert [x.value for x in s] == [0.75, 0.75, 0.25, 0.75]


def test_collapse_guard_min_share_abstains_the_whole_group():
    texts = ("85", "85", "84", "83", "82", "81")
    assert all(x.is_ok for x in MajorityVoteScorer().score(P, group(*texts)))
    s = MajorityVoteScorer(min_share=0.5).score(P, group(*texts))
    assert {x.status for x in s} == {"abstain"}
    assert "below min_share=0.5" in s[0].reason
    # the share counts every candidate, those without an answer too
    s = MajorityVoteScorer(min_share=0.5).score(P, group("85", "85", "?", "?", "?"))
    assert {x.status for x in s} == {"abstain"}


def test_ties_and_too_few_answers():
    s = MajorityVoteScorer().score(P, group("85", "84", "85", "84"))
    assert {x.status for x in s} == {"abstain"} and "tie" in s[0].reason
    s = MajorityVoteScorer(ties="first").score(P, group("85", "84", "85", "84"))
    assert [x.value for x in s] == [1.0, 0.0, 1.0, 0.0]
    s = MajorityVoteScorer().score(P, group("85", "no", "none"))
    assert {x.status for x in s} == {"abstain"} and "only 1 of 3" in s[0].reason


def test_json_field_mode():
    scorer = MajorityVoteScorer(extract="json-field", field="answer")
    s = scorer.score(P, group('{"answer": 85}', '{"answer": "85"}', '{"answer": 80}', "85"))
    assert [x.status for x in s] == ["ok", "ok", "ok", "abstain"]
    assert [x.value for x in s[:3]] == [1.0, 1.0, 0.0]


def test_bad_voters_are_named():
    for bad in ("column", [], [1]):
        with pytest.raises(TaoInputError, match="voters must be a non-empty list"):
            MajorityVoteScorer(voters=bad)


def test_bad_options_are_named():
    with pytest.raises(TaoInputError, match="majority-vote.*extract mode 'vote'"):
        MajorityVoteScorer(extract="vote")
    with pytest.raises(TaoInputError, match="needs pattern"):
        MajorityVoteScorer(extract="regex")
    with pytest.raises(TaoInputError, match="invalid regex"):
        MajorityVoteScorer(extract="regex", pattern="(")
    with pytest.raises(TaoInputError, match="min_share"):
        MajorityVoteScorer(min_share=1.5)


def test_majority_registered():
    scorer = get_component("scorers", "majority-vote")(min_share=0.3)
    assert scorer.min_share == 0.3 and scorer.pointwise is False


# ---- rules ------------------------------------------------------------------------------------

def rules_scores(rules, texts, **kw):
    from tao_plugins.scorers.rules import RulesScorer

    return RulesScorer(rules, **kw).score(P, group(*texts))


def test_regex_count_and_length_rules():
    s = rules_scores([{"type": "regex", "pattern": r"^Answer: \d+$", "flags": "m"}],
                     ["47+38\nAnswer: 85", "Answer: eighty-five"])
    assert [x.value for x in s] == [1.0, 0.0] and "no match" in s[1].reason
    s = rules_scores([{"type": "regex", "pattern": "[A-Z]", "negate": True, "name": "lowercase"}],
                     ["all lower here", "Not lower"])
    assert [x.value for x in s] == [1.0, 0.0] and s[1].reason.startswith("lowercase:")
    bullets = {"type": "count", "pattern": r"^\s*[-*] ", "flags": "m", "min": 3, "max": 3}
    s = rules_scores([bullets], ["- a\n- b\n- c", "- a\n- b", "- a\n- b\n- c\n- d"])
    assert [x.value for x in s] == [1.0, 0.0, 0.0]
    s = rules_scores([{"type": "length", "min_words": 3, "max_words": 5}],
                     ["one two", "one two three", "one two three four five six"])
    assert [x.value for x in s] == [0.0, 1.0, 0.0] and "2 words" in s[0].reason


def test_json_schema_rule():
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}
    texts = ['{"name": "Ada", "age": 36}',
             'Here you go:\n```json\n{"name": "Ada", "age": 36}\n```',
             '{"name": "Ada", "age": -1}',
             '{"name": "Ada"}',
             "Ada is 36."]
    s = rules_scores([{"type": "json_schema", "schema": schema}], texts)
    assert [x.value for x in s] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert "age" in s[2].reason and "required" in s[3].reason and "no JSON" in s[4].reason
    s = rules_scores([{"type": "json_schema", "schema": schema, "strict": True}], texts[:2])
    assert [x.value for x in s] == [1.0, 0.0]


def test_contains_and_forbidden_rules():
    rules = [{"type": "contains", "all": ["ocean"], "any": ["blue", "green"]},
             {"type": "forbidden", "texts": ["cat", "!"]}]
    s = rules_scores(rules, ["The Ocean is blue.", "The ocean is red.", "oceanic blue", "A blue ocean cat.",
                             "Blue ocean!", "concatenate the blue ocean"])
    assert [x.value for x in s] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    s = rules_scores([{"type": "contains", "all": ["Ocean"], "case_sensitive": True}], ["ocean", "Ocean"])
    assert [x.value for x in s] == [0.0, 1.0]


def test_composition_all_any_weighted_and_nested():
    a = {"type": "contains", "all": ["alpha"], "name": "a", "weight": 3}
    b = {"type": "contains", "all": ["beta"], "name": "b", "weight": 1}
    texts = ["alpha beta", "alpha", "beta", "gamma"]
    assert [x.value for x in rules_scores([a, b], texts)] == [1.0, 0.0, 0.0, 0.0]
    assert [x.value for x in rules_scores([a, b], texts, combine="any")] == [1.0, 1.0, 1.0, 0.0]
    assert [x.value for x in rules_scores([a, b], texts, combine="weighted")] == [1.0, 0.75, 0.25, 0.0]
    nested = [{"type": "any", "rules": [a, b]}, {"type": "length", "max_words": 1}]
    assert [x.value for x in rules_scores(nested, texts)] == [0.0, 1.0, 1.0, 0.0]
    s = rules_scores([a, b], ["alpha"], combine="weighted")[0]
    assert s.details["rules"] == [{"name": "a", "value": 1.0}, {"name": "b", "value": 0.0, "why": "missing ['beta']"}]


def test_rules_from_prompt_metadata_abstain_and_error():
    from tao_plugins.scorers.rules import RulesScorer

    scorer = RulesScorer()
    p = Prompt(id="m", text="Say hi in lowercase.", metadata={"rules": [{"type": "regex", "pattern": "hi"}]})
    assert [x.value for x in scorer.score(p, group("hi there", "hello"))] == [1.0, 0.0]
    s = scorer.score(Prompt(id="n", text="Anything."), group("x"))
    assert s[0].status == "abstain" and "no metadata['rules']" in s[0].reason
    bad = Prompt(id="b", text="x", metadata={"rules": [{"type": "regex", "pattern": "("}]})
    s = scorer.score(bad, group("x", "y"))
    assert [x.status for x in s] == ["error", "error"] and "prompt 'b'" in s[0].reason and "rules[0]" in s[0].reason


@pytest.mark.parametrize(("rules", "message"), [
    ([{"type": "regexp", "pattern": "x"}], "unknown rule type 'regexp'"),
    ([{"type": "regex", "pattern": "x", "ignorecase": True}], r"unknown option\(s\) \['ignorecase'\]"),
    ([{"type": "length"}], "needs at least one of"),
    ([{"type": "length", "max_words": -1}], "max_words"),
    ([{"type": "json_schema", "schema": {"type": "objekt"}}], "invalid JSON schema"),
    ([{"type": "all", "rules": [{"type": "count", "pattern": "x"}]}], r"rules\[0\]\.rules\[0\]: a count rule"),
    ([{"type": "contains"}], "contains rule needs"),
    ([], "non-empty list"),
])
def test_bad_rules_are_named(rules, message):
    from tao_plugins.scorers.rules import RulesScorer

    with pytest.raises(TaoInputError, match=message):
        RulesScorer(rules)


def test_rules_registered():
    scorer = get_component("scorers", "rules")(rules=[{"type": "length", "max_chars": 3}])
    assert [x.value for x in scorer.score(P, group("abc", "abcd"))] == [1.0, 0.0]
