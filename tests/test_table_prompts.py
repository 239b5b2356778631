"""Rounds from the inference table: exact and near duplicates, the per-requester cap, the held-out
slice, and a run whose training prompts come from logged exchanges."""

from __future__ import annotations

import json
import random

import pytest

from tao_core.table_prompts import jaccard, prepare, shingles
from tao_core.types import Prompt

WORDS = "the quick brown fox jumps over a lazy dog while seven tired cats watch from an old red barn".split()


def sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def prompts(texts, requesters=None) -> list[Prompt]:
    requesters = requesters or ["k"] * len(texts)
    return [Prompt(id=f"r{i}", text=t, metadata={"requester": r}) for i, (t, r) in enumerate(zip(texts, requesters, strict=True))]


def test_exact_and_near_duplicates_are_one_prompt():
    rng = random.Random(0)
    base = sentence(rng)
    one_word = base.rsplit(" ", 1)[0] + " different"  # 27 of 29 trigrams shared: Jaccard 0.93
    far = sentence(rng)
    assert jaccard(shingles(base), shingles(one_word)) >= 0.9 > jaccard(shingles(base), shingles(far))
    got = prepare(prompts([base, "  " + base.upper() + " ", one_word, far]), max_key_share=1.0)
    assert [p.id for p in got.train] == ["r0", "r3"]
    assert got.counts == {"read": 4, "exact_duplicates": 1, "near_duplicates": 1, "capped": 0, "held_out": 0}
    assert [p.id for p in prepare(prompts([base, one_word]), near_duplicate=0.95).train] == ["r0", "r1"]
    assert len(prepare(prompts([base, one_word]), near_duplicate=1.0).train) == 2  # off


def test_near_duplicates_found_among_many_prompts():
    rng = random.Random(1)
    texts = [sentence(rng) for _ in range(300)]
    copies = [t.rsplit(" ", 1)[0] + " changed" for t in texts[:50]]
    got = prepare(prompts(texts + copies), max_key_share=1.0)
    assert got.counts["near_duplicates"] == 50 and len(got.train) == 300


def test_no_requester_contributes_more_than_its_share():
    rng = random.Random(2)
    texts = [sentence(rng) for _ in range(10)]
    got = prepare(prompts(texts, ["flood"] * 8 + ["a", "b"]), max_key_share=0.5)
    assert [p.metadata["requester"] for p in got.train] == ["flood"] * 5 + ["a", "b"]
    assert got.counts["capped"] == 3


def test_the_held_out_slice_is_stable_and_about_its_share():
    rng = random.Random(3)
    texts = [sentence(rng) for _ in range(400)]
    a = prepare(prompts(texts), max_key_share=1.0, holdout=0.25)
    b = prepare(prompts(list(reversed(texts))), max_key_share=1.0, holdout=0.25)
    assert {p.text for p in a.held_out} == {p.text for p in b.held_out}
    assert 0.18 < len(a.held_out) / 400 < 0.32
    assert not {p.text for p in a.held_out} & {p.text for p in a.train}


def test_a_run_trains_on_the_tables_prompts(tmp_path, tiny_model_dir):
    from tao_core import pipeline
    from tao_core.config import RunConfig, from_dict
    from tao_core.table import InferenceTable

    db = tmp_path / "inference.db"
    rng = random.Random(4)
    texts = [f"What is {rng.randrange(10, 99)} plus {rng.randrange(10, 99)}?" for _ in range(12)]
    with InferenceTable.open(db) as table:
        for i, t in enumerate(texts + texts[:3]):  # three exact repeats
            table.log({"request_id": f"r{i}", "status_code": 200, "requester": "k1" if i % 2 else "k2",
                       "request_json": {"messages": [{"role": "user", "content": t}]}})
    cfg = from_dict(RunConfig, {
        "task": "arithmetic", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "rounds": 1,
        "steps_per_round": 2, "prompts_per_step": 2, "eval_limit": 4, "checkpoint_every": 2,
        "generate": {"n": 2, "max_new_tokens": 4}, "score": {"scorer": "arithmetic-check"},
        "table": {"url": str(db), "holdout": 0.25, "max_key_share": 1.0}})
    pipeline.run(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = next(r for r in rows if r["type"] == "prompts")
    assert counts["read"] == 15 and counts["exact_duplicates"] == 3 and counts["train"] + counts["held_out"] == 12
    trained = [json.loads(line)["text"] for d in sorted((tmp_path / "run" / "steps").glob("step-*"))
               for line in (d / "prompts.jsonl").read_text().splitlines()]
    assert trained and set(trained) <= set(texts)
    import hashlib

    from tao_core.table_prompts import normalize

    held = {t for t in texts if int.from_bytes(hashlib.sha256(normalize(t).encode()).digest()[:8], "big") / 2**64 < 0.25}
    assert not held & set(trained)


def test_table_keys_are_checked(tmp_path):
    from tao_core.config import RunConfig, from_dict, validate
    from tao_core.errors import TaoInputError

    base = {"task": "arithmetic", "output_dir": str(tmp_path / "x")}
    with pytest.raises(TaoInputError, match="table.since must be an ISO 8601 date or time"):
        validate(from_dict(RunConfig, {**base, "table": {"url": "t.db", "since": "yesterday"}}))
    with pytest.raises(TaoInputError, match="prompts_file and table.url both"):
        validate(from_dict(RunConfig, {**base, "prompts_file": __file__, "table": {"url": "t.db"}}))
    with pytest.raises(TaoInputError, match="table.holdout"):
        validate(from_dict(RunConfig, {**base, "table": {"url": "t.db", "holdout": 1.0}}))
