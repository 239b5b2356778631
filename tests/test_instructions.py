"""The ``instructions`` task: prompts with verifiable constraints, scored by ``rules``."""

from __future__ import annotations

import re

import pytest
from tao_plugins.scorers.rules import RulesScorer, compile_rules
from tao_plugins.tasks.instructions import CONSTRAINTS, TOPICS, InstructionsTask, topic_split

from tao_core import TaoInputError, get_component
from tao_core.tasks import EvalExample, Task
from tao_core.types import Candidate, Prompt


def cand(text: str, index: int = 0) -> Candidate:
    return Candidate(prompt_id="p", index=index, text=text, prompt_token_ids=[1], token_ids=[], logprobs=[])


def comply(prompt_text: str) -> str:
    """A response written from the prompt's words alone that meets its single constraint."""
    rules = [
        (r"at most (\d+) words", lambda m: "Short and fine."),
        (r"at least (\d+) words", lambda m: " ".join(["word"] * int(m[1]))),
        (r"Include the word '(\w+)'", lambda m: f"Here it is: {m[1]}."),
        (r"Do not use the word '(\w+)'", lambda m: "Okay fine."),
        (r"Do not use any commas", lambda m: "No commas here."),
        (r"exactly (\d+) bullet points", lambda m: "\n".join(f"- point {i}" for i in range(int(m[1])))),
        (r"JSON object", lambda m: 'Sure:\n```json\n{"title": "Bees", "summary": "They make honey."}\n```'),
        (r"double angular brackets", lambda m: "<<On bees>>\nBees make honey."),
        (r"lowercase letters", lambda m: "bees make honey."),
        (r"Start your answer with the word '(\w+)'", lambda m: f"{m[1]}, this is my answer."),
        (r"End your answer with the exact words '(.+)'$", lambda m: f"Bees make honey. {m[1]}"),
    ]
    for pattern, make in rules:
        m = re.search(pattern, prompt_text)
        if m:
            return make(m)
    raise AssertionError(f"no constraint recognized in {prompt_text!r}")


def test_is_a_task_with_rules_as_default_scorer():
    task = InstructionsTask()
    assert isinstance(task, Task) and task.default_scorer == "rules" and task.metric == "strict_accuracy"
    ex = task.eval_examples()
    assert len(ex) == 128 and len({e.prompt.text for e in ex}) == 128
    assert all(1 <= len(e.prompt.metadata["rules"]) <= 2 for e in ex)
    assert {n for e in ex for n in e.prompt.metadata["constraints"]} == set(CONSTRAINTS)


def test_train_and_eval_topics_are_disjoint():
    eval_topics = {e.prompt.metadata["topic"] for e in InstructionsTask().eval_examples()}
    assert eval_topics and all(topic_split(t) == "eval" for t in eval_topics)
    for seed in (0, 1):
        train = InstructionsTask(seed=seed).train_prompts()
        assert len(train) == 1024 and len({p.text for p in train}) == 1024
        assert not {p.metadata["topic"] for p in train} & eval_topics
        assert not any(t in p.text for p in train for t in eval_topics)
    assert len(eval_topics) < len(TOPICS)


def test_deterministic_per_seed():
    a = [p.text for p in InstructionsTask(seed=3).train_prompts(20)]
    assert a == [p.text for p in InstructionsTask(seed=3).train_prompts(20)]
    assert a != [p.text for p in InstructionsTask(seed=4).train_prompts(20)]
    assert [e.prompt.text for e in InstructionsTask(seed=9).eval_examples(5)] == [
        e.prompt.text for e in InstructionsTask().eval_examples(5)]


def test_prompt_wording_and_rules_agree():
    """A response written from the prompt's words passes its rules; an empty one fails."""
    task = InstructionsTask(max_constraints=1)
    for e in task.eval_examples():
        text = comply(e.prompt.text)
        assert task.check(e, text) == 1.0, (e.prompt.text, text, e.reference)
    failures = sum(task.check(e, "") == 0.0 for e in task.eval_examples())
    assert failures >= 64


@pytest.mark.parametrize(("rules", "good", "bad"), [
    ([{"type": "length", "max_words": 20}], "A short answer.", " ".join(["word"] * 21)),
    ([{"type": "contains", "all": ["because"]}], "It works because of physics.", "Because-less"),
    ([{"type": "forbidden", "texts": [","]}], "No commas here.", "Well, no."),
])
def test_check_is_all_or_nothing(rules, good, bad):
    task = InstructionsTask()
    both = EvalExample(Prompt(id="x", text="Write."), rules + [{"type": "length", "min_words": 2}])
    assert task.check(both, good) == 1.0
    assert task.check(both, bad) == 0.0
    assert task.check(both, "Hi") == 0.0  # meets the first rule, not the second


# Real greedy outputs of the embedded SmolLM2-135M-Instruct on this task's eval prompts (tao eval).
REAL = [
    ('Describe what makes museums interesting. Include a title wrapped in double angular brackets, like <<my title>>.',
     '<<my title>>\n\nMuseums are not just collections of artifacts, they are immersive experiences that transport us to different eras and cultures. Each museum is a window into the past, a reflection of the present and a chance to explore the future.',
     1.0),
    ("Explain umbrellas to a child. End your answer with the exact words 'Thank you.' Use at most 20 words.",
     "A umbrella is a big umbrella that you put on your head to protect you from the rain. It's like a big umbrella that you can wear to the beach. Thank you for helping me out.",
     0.0),
    ('Describe what makes soap interesting. Answer only with a JSON object with the string keys "title" and "summary".',
     '```json\n{\n    "title": "Soy Based Soap",\n    "summary": "Soy based soap is a popular and versatile soap that is made from soy lecithin, a natural emulsifier, and has been used for centuries. It is a natural and biodegradable soap that is made from soy lecithin, which is a key ingredient in the production of soap."\n}\n```',
     1.0),
    ('Write a short description of umbrellas. Include a title wrapped in double angular brackets, like <<my title>>. Do not use any commas.',
     '<<my title>>\n\nA humble umbrella, a symbol of freedom and protection, it is a versatile and versatile piece of clothing that can be worn in various ways, from the outdoors to the home.',
     0.0),
]


@pytest.mark.parametrize(("prompt_text", "output", "want"), REAL)
def test_real_model_outputs(prompt_text, output, want):
    task = InstructionsTask()
    ex = next(e for e in task.eval_examples() if e.prompt.text == prompt_text)
    assert task.check(ex, output) == want
    scores = RulesScorer().score(ex.prompt, [cand(output)])
    assert scores[0].status == "ok" and scores[0].value == want


def test_default_scorer_reads_each_prompts_rules():
    task = get_component("tasks", "instructions")()
    scorer = get_component("scorers", task.default_scorer)()
    for p in task.train_prompts(30):
        compile_rules(p.metadata["rules"])
        s = scorer.score(p, [cand(""), cand("x", 1)])
        assert all(x.status == "ok" for x in s)


def test_bad_options():
    with pytest.raises(TaoInputError, match="max_constraints"):
        InstructionsTask(max_constraints=3)
    with pytest.raises(TaoInputError, match="n_train"):
        InstructionsTask(n_train=0)
