"""The engine's public interface on the tiny random Llama: weight sets, per-token callbacks, abort,
drain and top-k log-probs."""

from __future__ import annotations

import pytest
import torch

from tao_core.engine import Engine, EngineConfig, EngineRequest
from tao_core.errors import TaoInputError
from tao_core.types import SamplingParams
from tests.conftest import completion_logprobs, make_tiny_model_dir

PROMPTS = [list(range(5, 18)), [40, 41, 42, 43, 44, 45, 46], list(range(5, 18)) + [60, 61]]


def load(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-teacher"), seed=1)


@pytest.fixture
def policy(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture
def teacher(teacher_dir):
    return load(teacher_dir)


def engine(model, **kw) -> Engine:
    kw.setdefault("max_kv_tokens", 2048)
    kw.setdefault("block_size", 4)
    return Engine(model, eos_token_ids=[], config=EngineConfig(**kw))


def params(seed: int, **kw) -> SamplingParams:
    kw.setdefault("n", 2)
    kw.setdefault("max_new_tokens", 10)
    return SamplingParams(temperature=0.8, seed=seed, **kw)


def samples(results):
    """Everything a request returned, for exact comparisons (same batch composition)."""
    return [[(s.token_ids, s.logprobs, s.finish_reason) for s in r.samples] for r in results]


def same_tokens(results, reference) -> bool:
    """Tokens equal and log-probs within float32 noise: a batch's composition changes the packed
    matmuls' summation order, not the result (tests/test_engine.py measures how rarely a token flips)."""
    for r, ref in zip(results, reference, strict=True):
        for s, t in zip(r.samples, ref.samples, strict=True):
            if s.token_ids != t.token_ids or (torch.tensor(s.logprobs) - torch.tensor(t.logprobs)).abs().max() > 1e-5:
                return False
    return len(results) == len(reference)


# weight sets ----------------------------------------------------------------------------------
def test_a_weight_set_samples_exactly_like_an_engine_over_that_model(policy, teacher):
    alone_teacher = engine(teacher).run([EngineRequest(p, params(i)) for i, p in enumerate(PROMPTS)])
    alone_policy = engine(policy).run([EngineRequest(p, params(10 + i)) for i, p in enumerate(PROMPTS)])
    eng = engine(policy)
    eng.add_weight_set("teacher", dict(teacher.named_parameters()))
    assert eng.weight_sets == ["policy", "teacher"]
    mixed = []  # the same prompts under both sets, interleaved in one batch
    for i, p in enumerate(PROMPTS):
        mixed += [EngineRequest(p, params(10 + i)), EngineRequest(p, params(i), weight_set="teacher")]
    res = eng.run(mixed)
    assert samples(res[1::2]) == samples(alone_teacher)
    assert samples(res[0::2]) == samples(alone_policy)
    assert samples(res[0::2]) != samples(res[1::2])


def test_a_weight_set_shares_the_parameters_it_does_not_override(policy, teacher):
    eng = engine(policy)
    q = "model.layers.1.self_attn.q_proj.weight"
    override = {q: dict(teacher.named_parameters())[q], "model.embed_tokens.weight": teacher.model.embed_tokens.weight}
    before = {n: p.data_ptr() for n, p in policy.named_parameters(remove_duplicate=False)}
    eng.add_weight_set("teacher", override)
    seen = []
    forward = eng.runner.forward

    def spy(*args, **kw):
        seen.append({n: p.data_ptr() for n, p in policy.named_parameters(remove_duplicate=False)})
        return forward(*args, **kw)

    eng.runner.forward = spy
    eng.run([EngineRequest(PROMPTS[1], params(0, n=1, max_new_tokens=3), weight_set="teacher")])
    assert len(seen) == 3  # a prefill and two decode steps, all under the teacher's tensors
    for ptrs in seen:
        for name, ptr in ptrs.items():
            if name == q:
                assert ptr == override[q].data_ptr()
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # tied: the LM head follows
                assert ptr == teacher.model.embed_tokens.weight.data_ptr()
            else:
                assert ptr == before[name], name  # the policy's own tensor, not a copy
    after = {n: p for n, p in policy.named_parameters(remove_duplicate=False)}
    assert {n: p.data_ptr() for n, p in after.items()} == before
    assert all(isinstance(p, torch.nn.Parameter) for p in after.values())


def test_weight_set_mistakes_are_clear_errors(policy, teacher):
    eng = engine(policy)
    w = teacher.model.layers[0].mlp.up_proj.weight
    with pytest.raises(TaoInputError, match=r"'t': the model has no parameter 'layers.0.mlp.up_proj.weight' \(names as in"):
        eng.add_weight_set("t", {"layers.0.mlp.up_proj.weight": w})
    with pytest.raises(TaoInputError, match=r"'t': model.layers.0.mlp.down_proj.weight is \(128, 64\) torch.float32 "
                                            r"on cpu, the model's is \(64, 128\)"):
        eng.add_weight_set("t", {"model.layers.0.mlp.down_proj.weight": w})
    with pytest.raises(TaoInputError, match="is .* torch.bfloat16 on cpu, the model's is .* torch.float32"):
        eng.add_weight_set("t", {"model.layers.0.mlp.up_proj.weight": w.to(torch.bfloat16)})
    with pytest.raises(TaoInputError, match="other than 'policy'"):
        eng.add_weight_set("policy", {"model.layers.0.mlp.up_proj.weight": w})
    with pytest.raises(TaoInputError, match="non-empty dict"):
        eng.add_weight_set("t", {})
    eng.add_weight_set("t", {"model.layers.0.mlp.up_proj.weight": w})
    with pytest.raises(TaoInputError, match=r"weight set 't' exists; remove_weight_set\('t'\) first"):
        eng.add_weight_set("t", {"model.layers.0.mlp.up_proj.weight": w})
    (bad,) = eng.run([EngineRequest(PROMPTS[0], params(0), weight_set="ema")])
    assert bad.error == "request 0: unknown weight set 'ema'; the engine has policy, t"
    rid = eng.add_request(EngineRequest(PROMPTS[0], params(0), weight_set="t"))
    with pytest.raises(TaoInputError, match=rf"weight set 't' is used by requests \[{rid}\] in flight"):
        eng.remove_weight_set("t")
    eng.abort(rid)
    eng.remove_weight_set("t")
    with pytest.raises(TaoInputError, match="no weight set 't'; the engine has policy"):
        eng.remove_weight_set("t")


def test_sets_never_share_cached_blocks_and_a_changed_set_is_recomputed(policy, teacher):
    eng = engine(policy)
    eng.add_weight_set("teacher", dict(teacher.named_parameters()))
    stats = eng.cache.stats
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    run = lambda ws: eng.run([EngineRequest(PROMPTS[0], greedy, weight_set=ws)])[0].samples[0].token_ids  # noqa: E731
    run("policy")
    run("teacher")
    assert stats.prefix_hit_tokens == 0  # the same prompt under another set finds nothing
    run("teacher")
    assert stats.prefix_hit_tokens == 12  # its own three full blocks
    with torch.no_grad():
        teacher.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an in-place update (an EMA step)
    changed = run("teacher")
    assert stats.prefix_hit_tokens == 12 and stats.invalidations == 1  # recomputed under the new tensors
    assert changed == engine(teacher).run([EngineRequest(PROMPTS[0], greedy)])[0].samples[0].token_ids
    run("policy")
    assert stats.prefix_hit_tokens == 24  # the policy's blocks were kept


# streaming ------------------------------------------------------------------------------------
def test_callbacks_see_every_token_once_in_order(policy):
    seen: dict[tuple[int, int], list[tuple[int, float]]] = {}

    def on_token(rid, j, token, logprob):
        seen.setdefault((rid, j), []).append((token, logprob))

    eng = engine(policy)
    reqs = [EngineRequest(p, params(i, n=3, stop_token_ids=[7]), on_token=on_token) for i, p in enumerate(PROMPTS)]
    res = eng.run(reqs)
    want = {(r.request_id, j): list(zip(s.token_ids, s.logprobs, strict=True)) for r in res for j, s in enumerate(r.samples)}
    assert seen == want and len(want) == 9
    plain = engine(policy).run([EngineRequest(p, params(i, n=3, stop_token_ids=[7])) for i, p in enumerate(PROMPTS)])
    assert samples(res) == samples(plain)


def test_a_raising_callback_ends_only_its_own_request(policy):
    calls = []

    def fail_third(rid, j, token, logprob):
        calls.append(j)
        if len(calls) == 5:
            raise ValueError("client went away")

    eng = engine(policy)
    reqs = [EngineRequest(p, params(i)) for i, p in enumerate(PROMPTS)]
    reqs[1].on_token = fail_third
    res = eng.run(reqs)
    assert res[1].error == "request 1: on_token callback raised ValueError: client went away"
    assert [s.finish_reason for s in res[1].samples] == ["error", "error"]
    assert sum(len(s.token_ids) for s in res[1].samples) == 5  # the five tokens given to the callback
    others = engine(policy).run([EngineRequest(p, params(i)) for i, p in enumerate(PROMPTS) if i != 1])
    assert same_tokens([res[0], res[2]], others)
    assert eng.cache.num_free == eng.cache.num_blocks and eng.scheduler.reserved == 0


# abort ----------------------------------------------------------------------------------------
def test_abort_frees_the_requests_blocks_at_once(policy):
    eng = engine(policy)
    eng.step()  # allocates the cache
    free, reserved = eng.cache.num_free, eng.scheduler.reserved
    rid = eng.add_request(EngineRequest(PROMPTS[2], params(3, max_new_tokens=40)))
    eng.step()
    eng.step()
    assert eng.cache.num_free < free and eng.scheduler.reserved > reserved
    assert eng.abort(rid)
    assert (eng.cache.num_free, eng.scheduler.reserved) == (free, reserved)
    assert not eng.has_unfinished()
    (res,) = eng.step()
    assert res.request_id == rid and res.error is None
    full = engine(policy).run([EngineRequest(PROMPTS[2], params(3, max_new_tokens=40))])[0]
    for part, whole in zip(res.samples, full.samples, strict=True):
        assert part.finish_reason == "abort" and len(part.token_ids) == 3  # a prefill and two decodes
        assert part.token_ids == whole.token_ids[:3] and part.logprobs == whole.logprobs[:3]
    assert not eng.abort(rid)  # finished: nothing to abort
    assert not eng.abort(999)


def test_abort_leaves_other_requests_unchanged(policy):
    eng = engine(policy, max_running=6)
    keep = [eng.add_request(EngineRequest(p, params(i))) for i, p in enumerate(PROMPTS[:2])]
    gone = eng.add_request(EngineRequest(PROMPTS[2], params(2, max_new_tokens=40)))
    waiting = eng.add_request(EngineRequest(PROMPTS[0], params(5)))  # max_running: it waits
    eng.step()
    eng.step()
    assert len(eng.scheduler.waiting) == 1
    headroom = eng.cache.num_free - eng.scheduler.reserved
    assert eng.abort(gone) and eng.abort(waiting)
    assert eng.cache.num_free - eng.scheduler.reserved > headroom
    results = {}
    while eng.has_unfinished():
        results.update((r.request_id, r) for r in eng.step())
    results.update((r.request_id, r) for r in eng.step())
    assert [s.finish_reason for s in results[waiting].samples] == ["abort", "abort"]
    assert all(s.token_ids == [] for s in results[waiting].samples)
    alone = engine(policy).run([EngineRequest(p, params(i)) for i, p in enumerate(PROMPTS[:2])])
    assert same_tokens([results[i] for i in keep], alone)
    assert eng.cache.num_free == eng.cache.num_blocks and eng.scheduler.reserved == 0


def test_abort_from_a_callback_applies_after_the_step(policy):
    eng = engine(policy)
    victim: list[int] = []
    stop_other = lambda rid, j, token, logprob: eng.abort(victim[0])  # noqa: E731
    first = eng.add_request(EngineRequest(PROMPTS[0], params(0, n=1, max_new_tokens=4), on_token=stop_other))
    victim.append(eng.add_request(EngineRequest(PROMPTS[1], params(1, n=1, max_new_tokens=30))))
    (res,) = eng.step()  # its first token came in the same prefill as the callback's
    assert res.request_id == victim[0] and res.samples[0].finish_reason == "abort"
    assert len(res.samples[0].token_ids) == 2  # the prefill's and the decode's tokens of this step
    while eng.has_unfinished():
        (done,) = eng.step() or (None,)
    assert done.request_id == first and len(done.samples[0].token_ids) == 4


# drain ----------------------------------------------------------------------------------------
def test_drain_finishes_in_flight_work_and_refuses_new(policy):
    eng = engine(policy, max_running=2)
    ids = [eng.add_request(EngineRequest(p, params(i))) for i, p in enumerate(PROMPTS)]  # the third waits
    eng.step()
    eng.start_drain()
    assert eng.draining
    refused = eng.add_request(EngineRequest(PROMPTS[0], params(0)))
    results = eng.drain()
    assert not eng.has_unfinished()
    by_id = {r.request_id: r for r in results}
    assert by_id[refused].error == f"request {refused}: engine is draining (resume_admission() accepts again)"
    alone = engine(policy, max_running=2).run([EngineRequest(p, params(i)) for i, p in enumerate(PROMPTS)])
    assert samples([by_id[i] for i in ids]) == samples(alone)
    (late,) = eng.run([EngineRequest(PROMPTS[0], params(0))])
    assert late.error is not None and "draining" in late.error
    eng.resume_admission()
    (again,) = eng.run([EngineRequest(PROMPTS[0], params(0))])
    assert again.error is None and same_tokens([again], [by_id[ids[0]]])


# top-k log-probs ------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_top_logprobs_match_a_full_forward(policy, temperature):
    eng = engine(policy)
    asked = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=4, top_logprobs=5)
    plain = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=5)
    res = eng.run([EngineRequest(PROMPTS[0], asked), EngineRequest(PROMPTS[1], plain)])
    t = temperature or 1.0
    for s in res[0].samples:
        assert len(s.top_logprobs) == len(s.token_ids) and all(len(row) == 5 for row in s.top_logprobs)
        with torch.no_grad():
            logits = policy(torch.tensor([PROMPTS[0] + s.token_ids])).logits[0, len(PROMPTS[0]) - 1 : -1].float()
        want = torch.log_softmax(logits / t, -1).topk(5, dim=-1)
        assert [[i for i, _ in row] for row in s.top_logprobs] == want.indices.tolist()
        got = torch.tensor([[lp for _, lp in row] for row in s.top_logprobs])
        assert (got - want.values).abs().max() <= 1e-4
        sampled = completion_logprobs(policy, PROMPTS[0], s.token_ids, t)
        assert (torch.tensor(s.logprobs) - sampled).abs().max() <= 1e-4
    assert all(s.top_logprobs == [] for s in res[1].samples)
    # asking for them changes no sampled token
    again = engine(policy).run([EngineRequest(PROMPTS[0], SamplingParams(**{**asked.to_dict(), "top_logprobs": 0}))])
    assert samples(again) == samples(res[:1])


def test_top_logprobs_are_checked():
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(TaoInputError, match=r"top_logprobs must be an integer in \[0, 20\]"):
            SamplingParams(top_logprobs=bad)


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_candidates_carry_top_logprobs_only_when_asked(tiny_model_dir, backend):
    from tao_core.models import load_model
    from tao_core.sampler import sampler_for
    from tao_core.types import Candidate, Prompt

    lm = load_model(str(tiny_model_dir), sampler=backend)
    sampler = sampler_for(lm)
    prompts = [Prompt(id="a", text="What is 12 plus 35?")]
    (plain,) = sampler.sample(prompts, SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert all(c.metadata == {} for c in plain)
    assert set(plain[0].to_dict()) == {f for f in Candidate.__dataclass_fields__}
    (asked,) = sampler.sample(prompts, SamplingParams(n=2, max_new_tokens=6, seed=0, top_logprobs=3))
    for c in asked:
        top = c.metadata["top_logprobs"]
        assert len(top) == len(c.token_ids) and all(len(row) == 3 for row in top)
        with torch.no_grad():
            logits = lm.model(torch.tensor([c.prompt_token_ids + c.token_ids])).logits[0, len(c.prompt_token_ids) - 1 : -1]
        want = torch.log_softmax(logits.float(), -1).topk(3, dim=-1)
        assert [[i for i, _ in row] for row in top] == want.indices.tolist()
        assert (torch.tensor([[lp for _, lp in row] for row in top]) - want.values).abs().max() <= 1e-4
    if backend == "engine":  # the same draws with or without them
        assert [c.token_ids for c in asked] == [c.token_ids for c in plain]


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_an_interrupted_step_frees_everything_and_the_engine_goes_on(policy, where):
    """A KeyboardInterrupt or a cancellation inside a step (a callback, the forward) ends every
    request in flight with an error, frees every block and reservation, and leaves the engine usable."""
    eng = engine(policy)
    eng.step()
    free, reserved = eng.cache.num_free, eng.scheduler.reserved
    calls = []

    def hang_up(rid, sample, token, logprob):
        calls.append(token)
        if len(calls) == 3:
            raise KeyboardInterrupt

    real_forward = eng.runner.forward

    def forward(*args):
        raise KeyboardInterrupt

    if where == "prefill":
        eng.runner.forward = forward
    rid = eng.add_request(EngineRequest(PROMPTS[0], params(1, max_new_tokens=20), on_token=hang_up))
    other = eng.add_request(EngineRequest(PROMPTS[1], params(2, max_new_tokens=20)))
    with pytest.raises(KeyboardInterrupt):
        while eng.has_unfinished():
            eng.step()
    eng.runner.forward = real_forward
    assert not eng.has_unfinished() and (eng.cache.num_free, eng.scheduler.reserved) == (free, reserved)
    done = {r.request_id: r for r in eng.step()}
    assert set(done) == {rid, other} and all("interrupted (KeyboardInterrupt)" in r.error for r in done.values())
    again = eng.run([EngineRequest(PROMPTS[1], params(2, max_new_tokens=20))])
    fresh = engine(policy).run([EngineRequest(PROMPTS[1], params(2, max_new_tokens=20))])
    for a, b in zip(samples(again)[0], samples(fresh)[0], strict=True):
        assert a[0] == b[0] and a[2] == b[2] and a[1] == pytest.approx(b[1], abs=1e-5), (a, b)
