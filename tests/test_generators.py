"""The built-in generators: ``sample`` and ``diverse``."""

from __future__ import annotations

import json

import pytest
import torch
from tao_plugins.generators import (
    ON_POLICY,
    DiverseGenerator,
    SampleGenerator,
    apply_template,
    diversity_report,
    question_of,
)
from tao_plugins.tasks.arithmetic import ArithmeticTask

from tao_core import TaoInputError, get_component
from tao_core.types import Candidate, Prompt, SamplingParams


@pytest.fixture
def prompts() -> list[Prompt]:
    return ArithmeticTask().train_prompts(2)


def test_sample_generator_on_tiny_model(tiny_lm, prompts):
    groups = SampleGenerator(tiny_lm).generate(prompts, SamplingParams(n=3, max_new_tokens=5, seed=1))
    assert [len(g) for g in groups] == [3, 3]
    for p, g in zip(prompts, groups, strict=True):
        for j, c in enumerate(g):
            assert (c.prompt_id, c.index, c.generator) == (p.id, j, "sample")
            assert c.prompt_token_ids == tiny_lm.prompt_token_ids(p)
            assert len(c.token_ids) == len(c.logprobs) >= 1


def test_templates_wrap_the_bare_question(prompts):
    p = prompts[0]
    q = p.metadata["question"]
    assert question_of(p) == q and p.text != q
    assert apply_template(p, ON_POLICY, {}, "x").text == p.text
    steps = apply_template(p, "steps", DiverseGenerator.__init__.__globals__["TEMPLATES"], "x")
    assert steps.text.startswith(q + "\n") and "step by step" in steps.text and steps.id == "x"
    chat = Prompt(id="c", messages=[{"role": "system", "content": "Be kind."},
                                    {"role": "user", "content": "What is 2 plus 3?"}])
    wrapped = apply_template(chat, "plain", {"plain": "Q: {question}"}, "c2")
    assert wrapped.messages == [{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": "Q: What is 2 plus 3?"}]
    assert chat.messages[1]["content"] == "What is 2 plus 3?"  # the original is untouched


def test_slots_cross_templates_and_temperatures(tiny_lm):
    gen = DiverseGenerator(tiny_lm, temperatures=(0.5, 1.0), templates=(ON_POLICY, "json"))
    assert gen.slots(4, 0.8) == [(ON_POLICY, 0.5), ("json", 1.0), (ON_POLICY, 1.0), ("json", 0.5)]
    gen = DiverseGenerator(tiny_lm)
    assert len(set(gen.slots(12, 1.0))) == 12
    assert DiverseGenerator(tiny_lm, temperatures=()).slots(2, 0.3) == [(ON_POLICY, 0.3), ("steps", 0.3)]


def test_template_temperatures_pin_a_template(tiny_lm):
    gen = DiverseGenerator(tiny_lm, temperatures=(1.0,), templates=(ON_POLICY, "steps"),
                           template_temperatures={"steps": 0.4})
    assert gen.slots(4, 1.0) == [(ON_POLICY, 1.0), ("steps", 0.4), (ON_POLICY, 1.0), ("steps", 0.4)]
    with pytest.raises(TaoInputError, match="not among the templates in use"):
        DiverseGenerator(tiny_lm, templates=(ON_POLICY,), template_temperatures={"steps": 0.4})
    with pytest.raises(TaoInputError, match="must be >= 0"):
        DiverseGenerator(tiny_lm, template_temperatures={"steps": -1})


def test_diverse_on_tiny_model(tiny_lm, prompts):
    gen = DiverseGenerator(tiny_lm)
    params = SamplingParams(n=8, max_new_tokens=6, seed=7)
    groups = gen.generate(prompts, params)
    assert [len(g) for g in groups] == [8, 8]
    slots = gen.slots(8, 1.0)
    for p, g in zip(prompts, groups, strict=True):
        own = tiny_lm.prompt_token_ids(p)
        for j, c in enumerate(g):
            template, temp = slots[j]
            assert (c.prompt_id, c.index, c.generator, c.template) == (p.id, j, "diverse", template)
            assert c.temperature == temp and c.metadata["temperature"] == temp
            assert len(c.token_ids) == len(c.logprobs) >= 1
            asked = apply_template(p, template, gen.templates, "any")
            assert c.prompt_token_ids == tiny_lm.prompt_token_ids(asked)
            assert c.metadata["off_policy"] is (template != ON_POLICY)
            if template == ON_POLICY:
                assert c.prompt_token_ids == own and "policy_prompt_token_ids" not in c.metadata
            else:
                assert c.prompt_token_ids != own and c.metadata["policy_prompt_token_ids"] == own
            div = c.metadata["diversity"]
            assert div["n"] == 8 and 0.0 <= div["mean_pairwise_similarity"] <= 1.0
        json.dumps([c.to_dict() for c in g])  # candidates stay JSONL-serializable
    again = gen.generate(prompts, params)
    assert [c.text for c in again[0]] == [c.text for c in groups[0]]


class CannedSampler:
    """Returns fixed texts, to check near-duplicate marking and the diversity figure exactly."""

    name = "canned"

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)

    def sample(self, prompts, params, *, weight_set="policy"):
        out = []
        for p in prompts:
            out.append([Candidate(p.id, j, self.texts.pop(0), [1], [2], [-0.1], "stop", params.temperature)
                        for j in range(params.n)])
        return out


def test_near_duplicates_are_marked_not_dropped(tiny_lm):
    gen = DiverseGenerator(tiny_lm, temperatures=(1.0,), templates=(ON_POLICY,))
    texts = ["47 + 38 = 85.\nAnswer: 85", "47 + 38 = 85.\nAnswer: 85", "The sum is 84.", "47 + 38 = 85. Answer: 85!"]
    gen.sampler = CannedSampler(texts)
    g = gen.generate([Prompt(id="p", text="What is 47 plus 38?")], SamplingParams(n=4))[0]
    assert [c.text for c in g] == texts
    assert [c.metadata.get("near_duplicate_of") for c in g] == [None, 0, None, 0]
    div = g[0].metadata["diversity"]
    assert div == {**div, "n": 4, "answered": 4, "distinct_answers": 2, "near_duplicates": 2}
    assert [c.metadata["answer"] for c in g] == ["85", "85", "84", "85"]


class RecordingSampler:
    """Answers every prompt with its weight set's name, recording which set each prompt was asked with."""

    name = "recording"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []  # (prompt id, weight set)

    def sample(self, prompts, params, *, weight_set="policy"):
        self.asked += [(p.id, weight_set) for p in prompts]
        return [[Candidate(p.id, j, f"{weight_set} {j}", [1], [2], [-0.1], "stop", params.temperature)
                 for j in range(params.n)] for p in prompts]


def test_template_weight_sets_route_templates_to_a_teacher(tiny_lm):
    gen = DiverseGenerator(tiny_lm, temperatures=(1.0,), templates=(ON_POLICY, "steps", "json"),
                           template_weight_sets={"steps": "teacher"})
    gen.sampler = RecordingSampler()
    p = Prompt(id="p", text="What is 47 plus 38?", metadata={"question": "What is 47 plus 38?"})
    g = gen.generate([p], SamplingParams(n=6, seed=0))[0]
    assert sorted(set(gen.sampler.asked)) == [("p::default@1", "policy"), ("p::json@1", "policy"),
                                             ("p::steps@1", "teacher")]
    own = tiny_lm.prompt_token_ids(p)
    for c in g:
        routed = c.template == "steps"
        assert c.text.startswith("teacher" if routed else "policy")
        assert c.metadata.get("weight_set") == ("teacher" if routed else None)
        assert c.metadata["off_policy"] is (c.template != ON_POLICY)
        assert (c.metadata.get("policy_prompt_token_ids") == own) is (c.template != ON_POLICY)
    # the task's own prompt sampled from the teacher is off-policy too: its log-probs are not the policy's
    gen = DiverseGenerator(tiny_lm, temperatures=(1.0,), templates=(ON_POLICY,), template_weight_sets={ON_POLICY: "ema"})
    gen.sampler = RecordingSampler()
    c = gen.generate([p], SamplingParams(n=1))[0][0]
    assert c.metadata["off_policy"] is True and c.metadata["weight_set"] == "ema"
    assert c.metadata["policy_prompt_token_ids"] == own


def test_voters_sample_from_an_attached_teacher(tiny_lm, prompts):
    from tao_core.teacher import Teacher

    params = SamplingParams(n=4, temperature=0, max_new_tokens=6)
    plain = DiverseGenerator(tiny_lm, temperatures=(), templates=(ON_POLICY, "steps")).generate(prompts, params)
    gen = DiverseGenerator(tiny_lm, temperatures=(), templates=(ON_POLICY, "steps"), template_weight_sets={"steps": "teacher"})
    teacher = Teacher.frozen(tiny_lm)
    with torch.no_grad():
        for t in teacher.tensors.values():
            if t.dim() > 1:
                t.mul_(20)  # weights far from the policy's: other greedy tokens
    teacher.attach(gen.sampler)
    voted = gen.generate(prompts, params)
    for before, after in zip(plain, voted, strict=True):
        for b, a in zip(before, after, strict=True):
            assert (a.token_ids == b.token_ids) is (a.template == ON_POLICY)
            assert a.metadata.get("weight_set") == ("teacher" if a.template == "steps" else None)


def test_template_weight_sets_are_checked(tiny_lm):
    with pytest.raises(TaoInputError, match=r"template_weight_sets names template\(s\) \['tens'\]"):
        DiverseGenerator(tiny_lm, templates=(ON_POLICY, "steps"), template_weight_sets={"tens": "teacher"})
    with pytest.raises(TaoInputError, match="must be weight set names"):
        DiverseGenerator(tiny_lm, templates=(ON_POLICY, "steps"), template_weight_sets={"steps": 3})
    gen = DiverseGenerator(tiny_lm, temperatures=(1.0,), templates=(ON_POLICY, "steps"),
                           template_weight_sets={"steps": "teacher"})
    with pytest.raises(TaoInputError, match=r"unknown weight set 'teacher'.*Teacher.attach"):
        gen.generate(ArithmeticTask().train_prompts(1), SamplingParams(n=2, max_new_tokens=2))


def test_similarity():
    from tao_plugins.generators import similarity

    assert similarity("The sum is 85.", "the  sum is 85") == pytest.approx(2 * 4 / 9)
    assert similarity("47 + 38 = 85", "47 + 38 = 85") == 1.0
    assert similarity("", "") == 1.0 and similarity("a", "") == 0.0
    assert similarity("47 + 38 = 85", "47 + 38 = 84") == pytest.approx(0.8)


def test_diversity_report():
    report, dup = diversity_report(["a b c", "a b c", "x y z"], ["1", None, "2"], threshold=0.95)
    assert dup == [None, 0, None]
    assert report["answered"] == 2 and report["distinct_answers"] == 2
    assert report["mean_pairwise_similarity"] == pytest.approx((1.0 + 0.0 + 0.0) / 3, abs=1e-3)
    single, dup = diversity_report(["only"], [None], threshold=0.9)
    assert single["mean_pairwise_similarity"] is None and dup == [None]


def test_bad_options_are_named(tiny_lm):
    with pytest.raises(TaoInputError, match=r"unknown template\(s\) \['haiku'\]"):
        DiverseGenerator(tiny_lm, templates=("default", "haiku"))
    with pytest.raises(TaoInputError, match="must be a string containing"):
        DiverseGenerator(tiny_lm, extra_templates={"short": "Answer briefly."})
    with pytest.raises(TaoInputError, match="near_duplicate"):
        DiverseGenerator(tiny_lm, near_duplicate=0)
    gen = DiverseGenerator(tiny_lm, templates=("short",), extra_templates={"short": "{question} Be brief."})
    assert gen.slots(1, 1.0) == [("short", 0.7)]


def test_registered(tiny_lm):
    assert isinstance(get_component("generators", "diverse")(tiny_lm), DiverseGenerator)


@pytest.mark.real_model
def test_diverse_on_the_embedded_model():
    from tao_core.models import load_model

    lm = load_model("smollm2-135m")
    task = ArithmeticTask()
    gen = DiverseGenerator(lm)
    g = gen.generate(task.train_prompts(1), SamplingParams(n=8, max_new_tokens=48, seed=0))[0]
    assert {c.template for c in g} == {ON_POLICY, "steps", "json", "plain"}
    div = g[0].metadata["diversity"]
    assert div["answered"] >= 4 and div["distinct_answers"] >= 1
    assert all(c.finish_reason in ("stop", "length") and c.text for c in g)


def test_one_sampler_per_loaded_model(tiny_lm):
    """The pipeline's generator and its evaluations share one sampler (and one KV cache); a model
    replaced since (LoRA wrapping) gets a new one."""
    from tao_core.sampler import sampler_for

    first = sampler_for(tiny_lm)
    assert sampler_for(tiny_lm) is first
    original = tiny_lm.model
    try:
        tiny_lm.model = torch.nn.Sequential(original)  # stands in for a peft wrapper
        assert sampler_for(tiny_lm) is not first
    finally:
        tiny_lm.model = original
