"""The ``llm-judge`` scorer: verdict parsing, dedupe, abstain reasons, and one run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tao_plugins.scorers.judge import (
    SCORERS,
    LLMJudgeScorer,
    parse_listwise,
    parse_pointwise,
    representatives,
)

import tao_core.sampler
from tao_core.errors import TaoInputError
from tao_core.models import LoadedModel
from tao_core.types import Candidate, Prompt, SamplingParams, Score

FAKE_MODEL = LoadedModel(model=None, tokenizer=None, name="fake-judge", path=Path("fake-judge"))


def cand(index: int, text: str, **metadata) -> Candidate:
    return Candidate(prompt_id="q", index=index, text=text, prompt_token_ids=[], token_ids=[], logprobs=[],
                     metadata=metadata)


@pytest.mark.parametrize("verdict, n, expected", [
    ('{"scores": {"1": 7, "2": 3}}', 2, {1: 7.0, 2: 3.0}),
    ('```json\n{"scores": {"1": 8, "2": 0, "3": 10}}\n```', 3, {1: 8.0, 2: 0.0, 3: 10.0}),
    ('Sure! {"scores": [4, 9]} hope this helps', 2, {1: 4.0, 2: 9.0}),
    ('{"scores": [{"id": 2, "score": 6}, {"id": 1, "score": "5/10"}]}', 2, {1: 5.0, 2: 6.0}),
    ('{"candidate 1": 2, "candidate 2": 7.5}', 2, {1: 2.0, 2: 7.5}),
    ("Candidate 1: 7/10\nCandidate 2: 3/10", 2, {1: 7.0, 2: 3.0}),
    ("1: 9\n2 - 4\n[3] = 1", 3, {1: 9.0, 2: 4.0, 3: 1.0}),
    ('{"scores": {"1": 7, "2": 11, "3": -1, "4": "great"}}', 4, {1: 7.0}),  # out of range / not numbers
    ('{"scores": {"1": 7, "5": 3}}', 2, {1: 7.0}),  # no candidate 5
    ('{"scores": {"1": true}}', 1, {}),
    ("All of them are pretty good, I would say.", 3, {}),
    ('{"scores": {"1": 7, "2"', 2, {}),  # cut off mid-JSON, no line fallback either
    ("", 2, {}),
])
def test_parse_listwise(verdict, n, expected):
    assert parse_listwise(verdict, n) == expected


@pytest.mark.parametrize("verdict, expected", [
    ('{"score": 7}', 7.0),
    ('```json\n{"score": 3.5}\n```', 3.5),
    ('{"reasoning": "fine", "score": "8"}', 8.0),
    ("Score: 6", 6.0),
    ("I'd give it 9/10.", 9.0),
    ("  4 ", 4.0),
    ('{"score": 12}', None),
    ("Score: 42", None),
    ("This response is excellent.", None),
    ('{"verdict": "good"}', None),
    ("", None),
])
def test_parse_pointwise(verdict, expected):
    assert parse_pointwise(verdict) == expected


def test_representatives_merge_case_whitespace_and_marked_duplicates():
    cands = [cand(0, "The answer is 5."), cand(1, "7"), cand(2, "the  answer is 5. "),
             cand(3, "five", near_duplicate_of=0), cand(4, "8", near_duplicate_of=9), cand(5, "7")]
    assert representatives(cands) == [0, 1, 0, 0, 4, 1]


class FakeSampler:
    """Returns canned verdicts and records the judge prompts it was given."""

    def __init__(self, verdicts: list[str], finish: str = "stop") -> None:
        self.verdicts, self.finish, self.calls = list(verdicts), finish, []

    def sample(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        self.calls.append((prompts, params))
        out = []
        for p in prompts:
            text = self.verdicts.pop(0)
            out.append([Candidate(prompt_id=p.id, index=0, text=text, prompt_token_ids=[], token_ids=[],
                                  logprobs=[], finish_reason=self.finish)])
        return out


@pytest.fixture
def fake_sampler(monkeypatch):
    def install(verdicts: list[str], finish: str = "stop") -> FakeSampler:
        sampler = FakeSampler(verdicts, finish)
        monkeypatch.setattr(tao_core.sampler, "sampler_for", lambda model: sampler)
        return sampler

    return install


def test_listwise_dedupes_numbers_and_copies_scores(fake_sampler):
    sampler = fake_sampler(['{"scores": {"1": 9, "2": 2}}'])
    judge = LLMJudgeScorer(FAKE_MODEL, rubric="Correct sums score high.")
    prompt = Prompt(id="q", text="What is 2 + 3?")
    scores = judge.score(prompt, [cand(0, "5"), cand(1, "7"), cand(2, " 5 "), cand(3, "five", near_duplicate_of=1)])
    assert [s.value for s in scores] == [9.0, 2.0, 9.0, 2.0]
    assert [s.details.get("copied_from") for s in scores] == [None, None, 0, 1]
    assert all(s.scorer == "llm-judge" and s.version == judge.version for s in scores)
    (prompts, params), = sampler.calls
    assert params.greedy and params.max_new_tokens == 256
    shown = prompts[0].messages[-1]["content"]
    assert "What is 2 + 3?" in shown and "Correct sums score high." in shown
    assert "## Candidate 1\n5" in shown and "## Candidate 2\n7" in shown and "Candidate 3" not in shown


def test_listwise_missing_candidate_abstains_with_verdict(fake_sampler):
    fake_sampler(['{"scores": {"2": 6}}'])
    scores = LLMJudgeScorer(FAKE_MODEL).score(Prompt(id="q", text="hi"), [cand(0, "a"), cand(1, "b")])
    assert scores[0].status == "abstain" and "candidate 1" in scores[0].reason
    assert '{"scores": {"2": 6}}' in scores[0].reason
    assert scores[1] == Score.ok(6.0, scorer="llm-judge", version=scores[1].version,
                                 details={"mode": "listwise", "verdict": '{"scores": {"2": 6}}'})


def test_unparseable_verdict_abstains_for_all_and_notes_truncation(fake_sampler):
    fake_sampler(["I think both responses are " + "really " * 100], finish="length")
    scores = LLMJudgeScorer(FAKE_MODEL, max_new_tokens=40).score(Prompt(id="q", text="hi"), [cand(0, "a"), cand(1, "a")])
    assert [s.status for s in scores] == ["abstain", "abstain"]
    assert "verdict cut at max_new_tokens=40" in scores[0].reason
    assert "I think both responses are really" in scores[0].reason and len(scores[0].reason) < 400
    assert scores[1].details["copied_from"] == 0


def test_pointwise_one_call_per_unique_candidate(fake_sampler):
    sampler = fake_sampler(['{"score": 8}', "no idea", "Score: 3"])
    judge = LLMJudgeScorer(FAKE_MODEL, mode="pointwise", dedupe=True)
    scores = judge.score(Prompt(id="q", messages=[{"role": "user", "content": "Name a fruit."}]),
                         [cand(0, "apple"), cand(1, "Apple"), cand(2, "rock"), cand(3, "pear")])
    assert [s.status for s in scores] == ["ok", "ok", "abstain", "ok"]
    assert [s.value for s in scores] == [8.0, 8.0, None, 3.0]
    assert "no idea" in scores[2].reason
    (prompts, _), = sampler.calls
    assert len(prompts) == 3 and "## Response\nrock" in prompts[1].messages[-1]["content"]


def test_dedupe_off_judges_every_candidate(fake_sampler):
    sampler = fake_sampler(['{"scores": [1, 2]}'])
    scores = LLMJudgeScorer(FAKE_MODEL, dedupe=False).score(Prompt(id="q", text="x"), [cand(0, "a"), cand(1, "a")])
    assert [s.value for s in scores] == [1.0, 2.0]
    assert "## Candidate 2\na" in sampler.calls[0][0][0].messages[-1]["content"]


def test_long_candidates_are_cut_in_the_judge_prompt(fake_sampler):
    sampler = fake_sampler(['{"scores": [5]}'])
    LLMJudgeScorer(FAKE_MODEL, max_chars=10).score(Prompt(id="q", text="x"), [cand(0, "z" * 500)])
    shown = sampler.calls[0][0][0].messages[-1]["content"]
    assert "z" * 10 + " [...]" in shown and "z" * 11 not in shown


def test_version_changes_with_rubric_and_mode():
    a = LLMJudgeScorer(FAKE_MODEL)
    assert a.version == LLMJudgeScorer(FAKE_MODEL).version
    assert a.version != LLMJudgeScorer(FAKE_MODEL, rubric="Be short.").version
    assert a.version != LLMJudgeScorer(FAKE_MODEL, mode="pointwise").version


def test_bad_options_are_named():
    with pytest.raises(TaoInputError, match="mode must be one of"):
        LLMJudgeScorer(FAKE_MODEL, mode="pairwise")
    with pytest.raises(TaoInputError, match="rubric"):
        LLMJudgeScorer(FAKE_MODEL, rubric="  ")
    with pytest.raises(TaoInputError, match="max_new_tokens"):
        LLMJudgeScorer(FAKE_MODEL, max_new_tokens=0)
    assert SCORERS == {"llm-judge": LLMJudgeScorer}


def test_registered_through_the_entry_point():
    from tao_core.plugins import PluginManager

    assert PluginManager().registry.get("scorers", "llm-judge") is LLMJudgeScorer


@pytest.mark.real_model
def test_judge_end_to_end_on_embedded_model():
    from tao_core.models import load_model

    lm = load_model("smollm2-135m")
    judge = LLMJudgeScorer(lm, mode="listwise", max_new_tokens=32)
    cands = [cand(0, "2 + 3 = 5"), cand(1, "7"), cand(2, "2 + 3 = 5 ")]
    scores = judge.score(Prompt(id="q", text="What is 2 + 3?"), cands)
    assert len(scores) == 3
    for s in scores:
        assert s.status in ("ok", "abstain"), s
        assert s.details["verdict"], "the verdict text is kept with every judged score"
        if s.status == "ok":
            assert 0 <= s.value <= 10
        else:
            assert "judge verdict gave no 0-10 score" in s.reason
    assert scores[2].details["copied_from"] == 0
    assert (scores[2].status, scores[2].value) == (scores[0].status, scores[0].value)
