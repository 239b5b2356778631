"""Data contracts: validation, JSONL round-trips, prompt files, and the HF sampler."""

from __future__ import annotations

import json

import pytest
import torch

from tao_core.completion import finish_completion
from tao_core.data import load_prompts, load_prompts_report
from tao_core.errors import TaoInputError
from tao_core.sampler import HFSampler
from tao_core.types import Candidate, Prompt, SamplingParams, Score, read_jsonl, write_jsonl
from tests.conftest import completion_logprobs


def test_jsonl_round_trip(tmp_path):
    p = Prompt(id="q1", messages=[{"role": "user", "content": "hi"}], task="arithmetic", metadata={"db": "x"})
    c = Candidate("q1", 0, "hello", [1, 2], [3, 4], [-0.5, -0.1], "stop", 0.7, "sample", "default", {"k": 1})
    s = Score.ok(0.5, scorer="rules", version="1", prompt_id="q1", index=0)
    for obj in (p, c, s):
        path = tmp_path / f"{type(obj).__name__}.jsonl"
        write_jsonl(path, [obj, obj])
        assert read_jsonl(path, type(obj)) == [obj, obj]


def test_prompt_validation():
    with pytest.raises(TaoInputError, match="exactly one"):
        Prompt(id="a")
    with pytest.raises(TaoInputError, match="empty"):
        Prompt(id="a", text="   ")
    with pytest.raises(TaoInputError, match=r"messages\[0\]"):
        Prompt(id="a", messages=[{"content": "no role"}])


def test_score_rules():
    with pytest.raises(TaoInputError, match="finite"):
        Score.ok(float("nan"))
    with pytest.raises(TaoInputError, match="reason"):
        Score("abstain")
    with pytest.raises(TaoInputError, match="carries no value"):
        Score("error", 0.0, "x")
    assert Score.abstain("no answer").value is None


def test_sampling_params_validation_lists_every_problem():
    with pytest.raises(TaoInputError) as e:
        SamplingParams(n=0, top_p=0, min_p=1.5, stop=["ok", ""])
    msg = str(e.value)
    assert "n must be" in msg and "top_p" in msg and "min_p" in msg and "stop" in msg


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "txt": "y"}\n')
    with pytest.raises(TaoInputError, match=r"c.jsonl:2: .*unknown field.*txt"):
        read_jsonl(path, Prompt)
    path.write_text('{"id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(TaoInputError, match=r"c.jsonl:2: invalid JSON"):
        read_jsonl(path, Prompt)


def test_load_prompts_formats_and_bad_rows(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"id": "a", "question": "What is 1 plus 2?", "db_path": "x.sqlite"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        + json.dumps({"id": "c", "question": ""}) + "\n"
        + "not json\n"
    )
    with pytest.raises(TaoInputError, match=r"p.jsonl:3: .*empty"):
        load_prompts(jl)
    rep = load_prompts_report(jl, on_error="skip")
    assert [p.id for p in rep.prompts] == ["a", "p-2"]
    assert rep.prompts[0].metadata == {"db_path": "x.sqlite"}
    assert [ln for ln, _ in rep.skipped] == [3, 4]

    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,body\nx,Hello there\ny,General Kenobi\n")
    with pytest.raises(TaoInputError, match=r"p.csv:2: missing column 'text'"):
        load_prompts(csv_path, column="text")
    assert [p.text for p in load_prompts(csv_path, column="body")] == ["Hello there", "General Kenobi"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c d"]}), pq_path)
    assert [p.text for p in load_prompts(pq_path)] == ["a b", "c d"]

    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x" * 50}) + "\n")
    with pytest.raises(TaoInputError, match="more than the limit"):
        load_prompts(big, max_chars=10)


def test_finish_completion_stop_token_and_string(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("Answer: 83. Let me think")["input_ids"]
    eos = tok.eos_token_id
    out_ids, lps, text, reason = finish_completion(tok, [*ids, eos, 5], [-1.0] * (len(ids) + 2),
                                                   stop=[], stop_token_ids=[eos])
    assert out_ids == [*ids, eos] and reason == "stop" and text == "Answer: 83. Let me think"
    out_ids, lps, text, reason = finish_completion(tok, ids, [-1.0] * len(ids), stop=["."], stop_token_ids=[eos])
    assert text == "Answer: 83" and reason == "stop"
    assert tok.decode(out_ids).startswith("Answer: 83") and len(lps) == len(out_ids) < len(ids)


def test_hf_generator_logprobs_match_forward(tiny_lm):
    """Candidate.logprobs == log_softmax(logits / T) of a full forward pass at the sampled tokens."""
    gen = HFSampler(tiny_lm)
    prompts = [Prompt(id="a", text="What is 12 plus 35?"), Prompt(id="b", text="hello")]
    params = SamplingParams(n=3, temperature=0.8, top_k=20, max_new_tokens=6, seed=0)
    groups = gen.sample(prompts, params)
    assert [len(g) for g in groups] == [3, 3]
    for c in (c for g in groups for c in g):
        ref = completion_logprobs(tiny_lm.model, c.prompt_token_ids, c.token_ids, 0.8)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)
        assert c.finish_reason in ("stop", "length") and c.temperature == 0.8


def test_generate_cli_writes_candidates(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from tao_core.cli import cli

    out = tmp_path / "c.jsonl"
    res = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--n", "2",
                                   "--max-new-tokens", "4", "--seed", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    cands = read_jsonl(out, Candidate)
    assert len(cands) == 2 and all(len(c.token_ids) <= 4 for c in cands)
    res = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--top-p", "0"])
    assert res.exit_code == 2 and "top_p must be in (0, 1]" in res.output


def test_generate_api_without_a_generator_uses_the_models_sampler(tiny_model_dir):
    from tao_core.api import generate
    from tao_core.models import load_model
    from tao_core.sampler import HFSampler, sampler_for

    lm = load_model(str(tiny_model_dir), sampler="hf")
    assert isinstance(sampler_for(lm), HFSampler)
    params = SamplingParams(n=2, max_new_tokens=3, seed=1)
    plain = generate(["hi"], params, model=lm)
    named = generate(["hi"], params, model=lm, generator="sample")
    assert [c.token_ids for c in plain[0]] == [c.token_ids for c in named[0]]
    assert plain[0][0].generator == "hf-generate" and named[0][0].generator == "sample"
    with pytest.raises(TaoInputError, match="need a generator"):
        generate(["hi"], params, model=lm, templates=["plain"])


def test_generate_api_takes_one_prompt_as_a_string(tiny_model_dir):
    from tao_core.api import generate
    from tao_core.models import load_model

    groups = generate("hello", SamplingParams(n=1, max_new_tokens=2, seed=0), model=load_model(str(tiny_model_dir)))
    assert len(groups) == 1 and groups[0][0].prompt_id == "p0"
