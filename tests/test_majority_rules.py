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
