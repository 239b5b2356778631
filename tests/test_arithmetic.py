"""The ``arithmetic`` task and the ``arithmetic-check`` verifier."""

from __future__ import annotations

import pytest
from tao_plugins.scorers.arithmetic import ArithmeticCheckScorer
from tao_plugins.tasks.arithmetic import (
    LEVELS,
    ArithmeticTask,
    evaluate_expression,
    extract_final_number,
    parse_problem,
    split_of,
)

from tao_core import TaoInputError, get_component
from tao_core.tasks import EvalExample, Task
from tao_core.types import Candidate, Prompt


def cand(text: str, index: int = 0, pid: str = "p") -> Candidate:
    return Candidate(prompt_id=pid, index=index, text=text, prompt_token_ids=[1], token_ids=[], logprobs=[])


def test_default_level_is_two_digit_addition_in_words():
    task = ArithmeticTask()
    assert isinstance(task, Task)
    ex = task.eval_examples()
    assert len(ex) == 128
    for e in ex:
        q = e.prompt.metadata["question"]
        a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" plus "))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert e.reference == a + b
        assert e.prompt.text.startswith(q) and e.prompt.text.endswith("'Answer: <number>'.")


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_train_and_eval_are_disjoint_and_deterministic(level):
    task = ArithmeticTask(level=level)
    eval_keys = {parse_problem(e.prompt.text) for e in task.eval_examples()}
    assert len(eval_keys) == 128
    for seed in (0, 1, 2):
        train = ArithmeticTask(level=level, seed=seed).train_prompts(300)
        assert len({p.metadata["expression"] for p in train}) == 300
        for p in train:
            expr = p.metadata["expression"]
            assert expr not in eval_keys
            if " + " in expr and expr.count(" ") == 2:  # commuted twin of an eval problem
                a, b = expr.split(" + ")
                assert f"{b} + {a}" not in eval_keys
    again = ArithmeticTask(level=level).train_prompts(300)
    assert [p.text for p in again] == [p.text for p in ArithmeticTask(level=level, seed=0).train_prompts(300)]
    assert [p.text for p in ArithmeticTask(level=level, seed=1).train_prompts(50)] != [p.text for p in again[:50]]


def test_split_is_by_unordered_operands():
    assert split_of("38 + 47") in ("train", "eval")
    task = ArithmeticTask()
    for e in task.eval_examples():
        a, b = e.prompt.metadata["expression"].split(" + ")
        key = " + ".join(sorted([a, b], key=int))
        assert split_of(key) == "eval"


def test_metadata_never_carries_the_answer():
    for level in LEVELS:
        task = ArithmeticTask(level=level)
        for e in task.eval_examples(40):
            assert "answer" not in e.prompt.metadata
            assert str(e.reference) not in e.prompt.metadata.values()
        for p in task.train_prompts(40):
            assert all("answer" not in k for k in p.metadata)


def test_limit_takes_a_prefix_of_the_fixed_eval_split():
    task = ArithmeticTask()
    assert [e.prompt.text for e in task.eval_examples(10)] == [e.prompt.text for e in task.eval_examples()[:10]]
    assert [e.prompt.text for e in ArithmeticTask(seed=5).eval_examples(10)] == [
        e.prompt.text for e in task.eval_examples(10)]


def test_bad_options_are_named():
    with pytest.raises(TaoInputError, match="unknown level 'add9'.*add2"):
        ArithmeticTask(level="add9")
    with pytest.raises(TaoInputError, match="n_eval"):
        ArithmeticTask(n_eval=0)
    with pytest.raises(TaoInputError, match="distinct"):
        ArithmeticTask(level="add2").problems("eval", 5000)


# The first four are real greedy outputs of the embedded SmolLM2-135M-Instruct to arithmetic
# prompts; the rest are constructed edge cases (answer line, separators, no number).
REAL_OUTPUTS = [
    ("59 + 63 = 122.", 122),
    ("15 + 43 = 52.", 52),
    ("75 + 72 = 14\nThe answer is 14.", 14),
    ("To add 59 and 63, we need to combine the numbers 59 and 63, which is 143. So, 59 + 63 = 143.", 143),
    ("Step 1: 40 + 30 = 70\nStep 2: 7 + 8 = 15\nAnswer: 85\n\nI hope these 2 steps help.", 85),
    ("Answer: 1,234", 1234),
    ("Answer: <number>", None),
    ("I cannot do math.", None),
]


@pytest.mark.parametrize(("text", "want"), REAL_OUTPUTS)
def test_answer_extractor(text, want):
    assert extract_final_number(text) == want


def test_check_uses_the_extractor():
    task = ArithmeticTask()
    e = EvalExample(Prompt(id="x", text="What is 59 plus 63?"), 122)
    assert task.check(e, "59 + 63 = 122.") == 1.0
    assert task.check(e, "59 + 63 = 121.") == 0.0
    assert task.check(e, "") == 0.0
    assert task.check(e, "Answer: 122.0") == 1.0


def test_expression_parser_is_not_eval():
    assert evaluate_expression("12 plus 3 times 4") == 24
    assert evaluate_expression("2 x 3 - 10") == -4
    assert evaluate_expression("16 minus 18 plus 49") == 47
    for junk in ("__import__('os').system('true')", "2 ** 10", "1 +", "plus 2 3", ""):
        with pytest.raises(ValueError):
            evaluate_expression(junk)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_verifier_recomputes_every_level_from_the_text(level):
    scorer = ArithmeticCheckScorer()
    for e in ArithmeticTask(level=level).eval_examples(30):
        bare = Prompt(id=e.prompt.id, text=e.prompt.text)  # no metadata: the text alone suffices
        scores = scorer.score(bare, [cand(f"Answer: {e.reference}"), cand(f"Answer: {e.reference + 1}", 1)])
        assert [s.value for s in scores] == [1.0, 0.0], (e.prompt.text, scores)


def test_verifier_reads_the_text_not_metadata_and_missing_answers_are_wrong():
    scorer = ArithmeticCheckScorer()
    p = Prompt(id="q", text="What is 2 plus 2?", metadata={"expression": "3 + 3", "answer": 6})
    s = scorer.score(p, [cand("Answer: 4"), cand("6"), cand("no idea"), cand("")])
    assert [x.status for x in s] == ["ok"] * 4
    assert [x.value for x in s] == [1.0, 0.0, 0.0, 0.0]
    assert s[2].reason == "no answer found"
    assert s[0].scorer == "arithmetic-check" and s[0].details["expression"] == "2 + 2"


def test_verifier_chat_messages_and_metadata_fallback():
    scorer = ArithmeticCheckScorer()
    chat = Prompt(id="c", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 7 times 8?"}])
    assert scorer.score(chat, [cand("56")])[0].value == 1.0
    opaque = Prompt(id="o", text="Solve the problem on the card.", metadata={"expression": "12 + 30"})
    assert scorer.score(opaque, [cand("Answer: 42")])[0].value == 1.0


def test_verifier_abstains_when_the_problem_cannot_be_parsed():
    scorer = ArithmeticCheckScorer()
    p = Prompt(id="z", text="Write a poem about the sea.")
    scores = scorer.score(p, [cand("Answer: 3"), cand("x", 1)])
    assert [s.status for s in scores] == ["abstain", "abstain"]
    assert "no arithmetic problem" in scores[0].reason
    bad_meta = Prompt(id="z2", text="Solve it.", metadata={"expression": "rm -rf /"})
    assert scorer.score(bad_meta, [cand("1")])[0].status == "abstain"


def test_registered_through_the_plugin_manager():
    task = get_component("tasks", "arithmetic")(level="word")
    assert task.default_scorer == "arithmetic-check"
    scorer = get_component("scorers", task.default_scorer)()
    e = task.eval_examples(1)[0]
    assert scorer.score(e.prompt, [cand(str(e.reference))])[0].value == 1.0
    assert get_component("scorers", "calculator") is get_component("scorers", "arithmetic-check")
