"""The engine on a tiny random Llama: agreement with transformers, log-probs, prefix sharing,
weight changes, LoRA, scheduling under a small cache, per-request errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tao_core.engine import Engine, EngineConfig, EngineRequest, weights_version
from tao_core.types import SamplingParams

VOCAB = 96


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=96,
        tie_word_embeddings=True,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init, so greedy has no near-ties
        m.model.embed_tokens.weight.mul_(4)
    return m


def make_engine(model, **kw) -> Engine:
    kw.setdefault("max_kv_tokens", 1024)
    kw.setdefault("block_size", 4)
    return Engine(model, eos_token_ids=[], config=EngineConfig(**kw))


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11], [3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27]]


def full_logprobs(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def max_gap(model, prompts, results, temperature):
    gap = 0.0
    for p, r in zip(prompts, results, strict=True):
        for s in r.samples:
            want = full_logprobs(model, p, s.token_ids, temperature)
            gap = max(gap, (want - torch.tensor(s.logprobs)).abs().max().item())
    return gap


def test_greedy_matches_transformers_generate(model):
    eng = make_engine(model)
    res = eng.run([EngineRequest(p, SamplingParams(temperature=0, max_new_tokens=12)) for p in PROMPTS])
    for p, r in zip(PROMPTS, res, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert r.samples[0].token_ids == ref[0, len(p) :].tolist()
        assert r.samples[0].finish_reason == "length"


def test_sampled_logprobs_match_full_forward(model):
    eng = make_engine(model)
    params = SamplingParams(n=3, temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, max_new_tokens=15, seed=3)
    res = eng.run([EngineRequest(p, params) for p in PROMPTS])
    assert all(len(r.samples) == 3 and len(s.token_ids) == 15 for r in res for s in r.samples)
    assert max_gap(model, PROMPTS, res, 0.7) <= 1e-4


def test_seeds_give_reproducible_independent_streams(model):
    eng = make_engine(model)
    a, b, c = (
        eng.run([EngineRequest(PROMPTS[0], SamplingParams(n=4, max_new_tokens=10, seed=s))])[0]
        for s in (5, 5, 6)
    )
    toks = [s.token_ids for s in a.samples]
    assert toks == [s.token_ids for s in b.samples]
    assert toks != [s.token_ids for s in c.samples]
    assert len({tuple(t) for t in toks}) > 1  # the n samples have different streams


def test_n_samples_prefill_prompt_once_and_system_prefix_is_shared(model):
    eng = make_engine(model)
    system = list(range(30, 42))  # three full blocks of 4
    prompts = [system + [1, 2, 3], system + [7, 8]]
    res = eng.run([EngineRequest(p, SamplingParams(n=5, max_new_tokens=6, seed=1)) for p in prompts])
    stats = eng.cache.stats
    # the first prompt is prefilled once for its 5 samples; the second reuses the 12 system tokens
    assert stats.prefilled_tokens == len(prompts[0]) + 2
    assert stats.prefix_hit_tokens == 12
    assert max_gap(model, prompts, res, 1.0) <= 1e-4
    alone = make_engine(model).run([EngineRequest(prompts[1], SamplingParams(n=5, max_new_tokens=6, seed=1))])
    assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in res[1].samples]


def test_prefix_blocks_survive_between_calls_until_the_weights_change(model):
    eng = make_engine(model)
    prompt = list(range(40, 53))
    req = lambda: EngineRequest(prompt, SamplingParams(temperature=0, max_new_tokens=8))  # noqa: E731
    first = eng.run([req()])[0].samples[0]
    eng.run([req()])
    assert eng.cache.stats.prefix_hit_tokens == 12  # second call found 3 blocks
    assert eng.cache.num_indexed == 3

    weight = model.model.layers[0].self_attn.q_proj.weight
    ptr, version = weight.data_ptr(), weights_version(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    loss = -torch.log_softmax(model(torch.tensor([prompt + first.token_ids])).logits[0, :-1], -1).mean()
    loss.backward()
    opt.step()
    model.eval()
    assert weight.data_ptr() == ptr and weights_version(model) != version  # updated in place

    after = eng.run([req()])[0].samples[0]
    assert eng.cache.stats.invalidations == 1
    assert eng.cache.stats.prefix_hit_tokens == 12  # nothing reused from before the step
    assert (full_logprobs(model, prompt, after.token_ids, 1.0) - torch.tensor(after.logprobs)).abs().max() <= 1e-4
    assert (full_logprobs(model, prompt, first.token_ids, 1.0) - torch.tensor(first.logprobs)).abs().max() > 1e-3


def test_lora_adapters_are_applied(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, cfg).eval()
    eng = make_engine(wrapped)
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    res = eng.run([EngineRequest(p, params) for p in PROMPTS[:2]])
    assert max_gap(wrapped, PROMPTS[:2], res, 0.9) <= 1e-4
    with wrapped.disable_adapter():
        assert max_gap(wrapped, PROMPTS[:2], res, 0.9) > 1e-3


def test_train_mode_is_restored_and_dropout_off_while_sampling(model):
    model.train()
    eng = make_engine(model)
    eng.run([EngineRequest(PROMPTS[0], SamplingParams(max_new_tokens=3))])
    assert model.training


def test_requests_wait_for_a_small_cache_and_batching_does_not_change_them(model):
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=10, seed=11)
    reqs = lambda: [EngineRequest(p, params) for p in PROMPTS]  # noqa: E731
    big = make_engine(model).run(reqs())
    # 48 tokens: room for one request at a time (each needs up to 2 x ceil((11 + 9) / 4) blocks)
    small_engine = make_engine(model, max_kv_tokens=48, max_running=3)
    small = small_engine.run(reqs())
    assert [[s.token_ids for s in r.samples] for r in small] == [[s.token_ids for s in r.samples] for r in big]
    assert small_engine.cache.num_free == small_engine.cache.num_blocks
    assert small_engine.scheduler.reserved == 0


def test_request_that_can_never_fit_fails_alone(model):
    eng = make_engine(model, max_kv_tokens=32)
    res = eng.run([
        EngineRequest(PROMPTS[0], SamplingParams(n=8, max_new_tokens=30)),
        EngineRequest(PROMPTS[2], SamplingParams(max_new_tokens=5)),
    ])
    assert "raise max_kv_tokens" in res[0].error
    assert res[1].error is None and len(res[1].samples[0].token_ids) == 5


def test_bad_requests_error_alone_and_the_batch_goes_on(model):
    bad_param = SamplingParams()
    bad_param.temperature = -1.0
    eng = make_engine(model)
    ok = SamplingParams(temperature=0, max_new_tokens=6)
    res = eng.run([
        EngineRequest([], ok),
        EngineRequest(PROMPTS[0], ok),
        EngineRequest(list(range(90)) * 2, ok),
        EngineRequest(PROMPTS[1], bad_param),
        EngineRequest([1, VOCAB + 5], ok),
        EngineRequest(PROMPTS[2], ok),
    ])
    assert "empty prompt" in res[0].error
    assert "context" in res[2].error
    assert "temperature" in res[3].error
    assert "outside" in res[4].error
    alone = make_engine(model).run([EngineRequest(PROMPTS[0], ok), EngineRequest(PROMPTS[2], ok)])
    assert res[1].samples[0].token_ids == alone[0].samples[0].token_ids
    assert res[5].samples[0].token_ids == alone[1].samples[0].token_ids


def test_stop_token_ids_and_max_new_tokens_finish_reasons(model):
    eng = make_engine(model)
    base = eng.run([EngineRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=8))])[0].samples[0]
    stop_tok = base.token_ids[3]
    first = base.token_ids.index(stop_tok)
    res = eng.run([EngineRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[stop_tok]))])
    s = res[0].samples[0]
    assert s.finish_reason == "stop" and s.token_ids == base.token_ids[: first + 1]
    checked = eng.run([EngineRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=8), stop_checker=lambda ids: len(ids) == 2)])
    assert checked[0].samples[0].token_ids == base.token_ids[:2] and checked[0].samples[0].finish_reason == "stop"
    eos_engine = Engine(model, eos_token_ids=[stop_tok], config=EngineConfig(max_kv_tokens=256, block_size=4))
    ignored = eos_engine.run([EngineRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=8), ignore_eos=True)])
    assert ignored[0].samples[0].token_ids == base.token_ids


def test_continuous_batching_requests_join_and_leave(model):
    lengths = [3, 12, 5, 9, 2, 7]
    reqs = [EngineRequest(PROMPTS[i % 4], SamplingParams(temperature=0, max_new_tokens=n)) for i, n in enumerate(lengths)]
    eng = make_engine(model, max_running=3)
    steps, seen = 0, []
    for r in reqs:
        eng.add_request(r)
    while eng.has_unfinished():
        seen.append(len(eng.scheduler.running))
        for done in eng.step():
            assert len(done.samples[0].token_ids) == lengths[done.request_id]
        steps += 1
    assert max(seen) <= 3
    assert steps < sum(lengths)  # sequences were decoded together


def test_release_and_reallocate_cache(model):
    eng = make_engine(model)
    req = lambda: EngineRequest(PROMPTS[3], SamplingParams(temperature=0, max_new_tokens=5))  # noqa: E731
    first = eng.run([req()])[0].samples[0].token_ids
    assert eng.cache.allocated
    eng.release_cache()
    assert not eng.cache.allocated and eng.cache.k is None
    assert eng.run([req()])[0].samples[0].token_ids == first
    assert eng.cache.allocated


def test_batch_composition_agreement(model):
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=100 + i) for i in range(8)]
    prompts = [PROMPTS[i % 4] + [i + 1] for i in range(8)]
    together = make_engine(model).run([EngineRequest(p, sp) for p, sp in zip(prompts, params, strict=True)])
    same = 0
    for i in range(8):
        alone = make_engine(model).run([EngineRequest(prompts[i], params[i])])
        same += alone[0].samples[0].token_ids == together[i].samples[0].token_ids
    print(f"batch-composition agreement: {same}/8")
    assert same >= 7


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96, head_dim=8,
        **({"n_embd": 48, "n_layer": 2, "n_head": 6, "n_positions": 96} if model_type == "gpt2" else {}),
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_llama_family_variants_match_full_forward(model_type):
    m = tiny(model_type)
    eng = make_engine(m)
    res = eng.run([EngineRequest(p, SamplingParams(n=2, max_new_tokens=8, seed=2)) for p in PROMPTS[:3]])
    assert max_gap(m, PROMPTS[:3], res, 1.0) <= 1e-4
    greedy = eng.run([EngineRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=8))])
    ref = m.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy[0].samples[0].token_ids == ref[0, len(PROMPTS[1]) :].tolist()


def test_sampler_for_uses_the_engine_for_llama_and_generate_otherwise(model):
    from pathlib import Path

    from tao_core.engine import EngineSampler
    from tao_core.models import LoadedModel
    from tao_core.sampler import HFSampler, sampler_for

    assert isinstance(sampler_for(LoadedModel(model, None, "tiny", Path("."))), EngineSampler)
    assert isinstance(sampler_for(LoadedModel(tiny("gpt2"), None, "gpt2", Path("."))), HFSampler)


def test_the_declared_sampler_backend_is_honoured(model):
    from pathlib import Path

    from tao_core.engine import EngineSampler
    from tao_core.errors import TaoInputError
    from tao_core.models import LoadedModel, load_model
    from tao_core.sampler import HFSampler, sampler_for

    assert isinstance(sampler_for(LoadedModel(model, None, "tiny", Path("."), sampler_backend="engine")), EngineSampler)
    forced = LoadedModel(model, None, "tiny", Path("."), sampler_backend="hf")
    assert isinstance(sampler_for(forced), HFSampler)
    forced.sampler_backend = "auto"  # a changed declaration builds the sampler it names
    assert isinstance(sampler_for(forced), EngineSampler)
    with pytest.raises(TaoInputError, match=r"gpt2: .*\"engine\" but tao's engine cannot run this model \(model type 'gpt2'"):
        sampler_for(LoadedModel(tiny("gpt2"), None, "gpt2", Path("."), sampler_backend="engine"))
    with pytest.raises(TaoInputError, match="unknown sampler backend 'vllm'; use one of auto, engine, hf"):
        LoadedModel(model, None, "tiny", Path("."), sampler_backend="vllm")
    with pytest.raises(TaoInputError, match="unknown sampler backend 'fast'"):
        load_model("anything", sampler="fast")  # refused before anything is read


def test_bfloat16_model_runs_with_a_bfloat16_cache(model):
    m = model.to(torch.bfloat16)
    eng = make_engine(m)
    assert eng.cache.dtype == torch.bfloat16
    res = eng.run([EngineRequest(p, SamplingParams(n=2, max_new_tokens=8, seed=4)) for p in PROMPTS[:2]])
    # bf16 rounding differs between the packed engine forward and the padded full forward
    assert max_gap(m, PROMPTS[:2], res, 1.0) <= 0.1


class CharTokenizer:
    """Token i <-> character chr(32 + i): enough of a tokenizer for the text layer."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [min(ord(c) - 32, VOCAB - 1) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i) for i in ids)


def test_engine_sampler_cuts_stop_strings_and_reports_bad_prompts_alone(model):
    from pathlib import Path

    from tao_core.engine import EngineSampler
    from tao_core.models import LoadedModel
    from tao_core.types import Prompt

    lm = LoadedModel(model, CharTokenizer(), "tiny", Path("."))
    gen = EngineSampler(lm, EngineConfig(max_kv_tokens=1024, block_size=4))
    prompts = [Prompt("a", text="hello there"), Prompt("long", text="x" * 200), Prompt("b", text="abc")]
    plain = gen.sample(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    assert plain[1][0].finish_reason == "error" and "context" in plain[1][0].metadata["error"]
    text = plain[0][0].text
    assert len(text) == 10 and plain[0][0].finish_reason == "length"
    stop = text[3:5]
    cut = gen.sample(prompts, SamplingParams(temperature=0, max_new_tokens=10, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert cut.token_ids == plain[0][0].token_ids[: text.index(stop) + 1]
    assert cut.logprobs == plain[0][0].logprobs[: len(cut.token_ids)]
    assert [c.finish_reason for c in plain[2]] == ["length"]



def test_shared_prefix_decode_attention_equals_plain_attention(model):
    from tao_core.engine.cache import BlockKVCache
    from tao_core.engine.runner import LlamaRunner, decode_batch

    runner = LlamaRunner(model)
    native = runner.native_attention
    runner.native_attention = False  # the PyTorch path: cascade vs plain
    kvh, d, bs = runner.num_kv_heads, runner.head_dim, 4
    cache = BlockKVCache(num_layers=2, num_kv_heads=kvh, head_dim=d, block_size=bs, num_blocks=40, dtype=torch.float32, device="cpu")
    cache.allocate()
    torch.manual_seed(3)
    cache.k.normal_()
    cache.v.normal_()
    # two requests: 3 samples sharing blocks [1, 2], 2 samples sharing [7]; one request alone
    tables = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 8, 9], [7, 10], [7, 11, 12], [13, 14]]
    lengths = [15, 10, 18, 6, 11, 7]
    groups = [0, 0, 0, 1, 1, 2]
    shared = [2, 2, 2, 1, 1, 0]
    q = torch.randn(len(tables), runner.num_heads, d)
    new_k = new_v = torch.zeros(len(tables), kvh, d)  # unused by attend (already cached)
    cascade = decode_batch(tables, lengths, groups, shared, bs, torch.float32, torch.device("cpu"))
    plain = decode_batch(tables, lengths, groups, [0] * 6, bs, torch.float32, torch.device("cpu"))
    assert cascade.prefix is not None and plain.prefix is None
    assert cascade.prefix.rows.tolist() == [0, 1, 2, 3, 4]
    with torch.inference_mode():
        for layer in range(2):
            a = runner.decode_attend(cache, cascade)(layer, q, new_k, new_v)
            b = runner.decode_attend(cache, plain)(layer, q, new_k, new_v)
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
            if native:  # and the native kernel, which reads the shared blocks in place
                runner.native_attention = True
                c = runner.decode_attend(cache, cascade)(layer, q, new_k, new_v)
                runner.native_attention = False
                assert torch.allclose(c, b, atol=1e-5), (c - b).abs().max()
