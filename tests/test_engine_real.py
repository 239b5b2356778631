"""The engine on the embedded SmolLM2-135M: greedy agreement with transformers, the engine/trainer
log-prob gap, stop strings, and the batch-composition agreement rate."""

from __future__ import annotations

import pytest
import torch

from tao_core.engine import EngineSampler
from tao_core.models import load_model
from tao_core.sampler import HFSampler, sampler_for
from tao_core.types import Prompt, SamplingParams

pytestmark = pytest.mark.real_model

CHATS = [
    Prompt("p0", text="Hi!"),
    Prompt("p1", text="What is the capital of France?"),
    Prompt("p2", text="Write a haiku about the ocean."),
    Prompt("p3", text="Explain photosynthesis to a ten-year-old in a few sentences, with one example."),
    Prompt("p4", text="List three uses of a paperclip that are not holding paper."),
    Prompt("p5", messages=[
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]),
    Prompt("p6", messages=[
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3? Explain how you got the result step by step, briefly."},
    ]),
    Prompt("p7", text="Write a polite note to a neighbor asking them to keep their dog from barking late at night. "
                      "Mention that you work early shifts and that you appreciate their understanding."),
]


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


def test_sampler_for_picks_the_engine(lm):
    assert isinstance(sampler_for(lm), EngineSampler)


def test_greedy_matches_transformers_generate_on_batched_chat_prompts(lm):
    new = 24
    groups = EngineSampler(lm).sample(CHATS, SamplingParams(temperature=0, max_new_tokens=new))
    eos = lm.eos_token_ids
    lengths = {len(lm.prompt_token_ids(p)) for p in CHATS}
    assert len(lengths) >= 6  # prompts of different lengths share the batch
    ties = 0
    for p, (cand,) in zip(CHATS, groups, strict=True):
        ids = torch.tensor([cand.prompt_token_ids])
        with torch.no_grad():
            out = lm.model.generate(
                ids, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id,
                return_dict_in_generate=True, output_logits=True,
            )
        ref = out.sequences[0, ids.shape[1] :].tolist()
        for i, (a, b) in enumerate(zip(cand.token_ids, ref, strict=False)):
            if a != b:
                top2 = torch.topk(out.logits[i][0].float(), 2).values
                gap = (top2[0] - top2[1]).item()
                assert gap <= 1e-4, f"{p.id}: token {i} differs ({a} vs {b}) with a top-2 logit gap of {gap:.2e}"
                ties += 1
                break
        else:
            assert cand.token_ids == ref, f"{p.id}: lengths differ"
    print(f"greedy vs transformers: {len(CHATS) - ties}/{len(CHATS)} identical, {ties} genuine ties")


def test_engine_trainer_logprob_gap(lm):
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=7)
    groups = EngineSampler(lm).sample(CHATS[:4], params)
    gap = 0.0
    for group in groups:
        for c in group:
            full = torch.tensor([c.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = lm.model(full).logits[0, len(c.prompt_token_ids) - 1 : -1].float()
            want = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            gap = max(gap, (want - torch.tensor(c.logprobs)).abs().max().item())
    print(f"engine/trainer log-prob gap: {gap:.2e}")
    assert gap <= 1e-4


def test_stop_strings_match_the_hf_generator(lm):
    prompt = [Prompt("count", text="Count from 1 to 20, separated by commas.")]
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=["3.", "zebra"])
    (ours,) = EngineSampler(lm).sample(prompt, params)[0]
    (ref,) = HFSampler(lm).sample(prompt, params)[0]
    assert ours.finish_reason == "stop" and ours.text.startswith("1.") and "3." not in ours.text
    assert (ours.text, ours.token_ids) == (ref.text, ref.token_ids)
    assert len(ours.token_ids) < 15  # generation stopped at the string, not at max_new_tokens


def test_batch_composition_agreement_rate(lm):
    gen = EngineSampler(lm)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1)
    together = gen.sample(CHATS, params)
    same = sum(
        gen.sample([p], params)[0][0].token_ids == together[i][0].token_ids for i, p in enumerate(CHATS)
    )
    print(f"batch-composition agreement: {same}/{len(CHATS)} samples identical alone and batched")
    assert same >= len(CHATS) - 2
