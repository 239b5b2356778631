"""Teachers (frozen and EMA) and sampling from them through both samplers' weight sets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tao_core.errors import TaoInputError
from tao_core.models import load_model
from tao_core.sampler import sampler_for
from tao_core.teacher import Teacher, trainable
from tao_core.types import Prompt, SamplingParams
from tests.conftest import make_tiny_model_dir

PROMPTS = [Prompt(id="a", text="What is 12 plus 35?"), Prompt(id="b", text="hello world, this is")]
GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another tiny Llama whose matrices are scaled up: random tiny models at initialization scale all
    answer a newline to every prompt when greedy, this one answers other tokens."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-teacher"), seed=1)
    lm = load_model(str(path))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    lm.model.save_pretrained(path)
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def train_steps(model: torch.nn.Module, steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def tokens(groups) -> list[list[int]]:
    return [c.token_ids for g in groups for c in g]


def test_a_frozen_teacher_keeps_the_starting_weights(tiny_lm):
    start = snapshot(tiny_lm.model)
    teacher = Teacher.frozen(tiny_lm)
    assert teacher.kind == "frozen" and set(teacher.tensors) == set(start)
    train_steps(tiny_lm.model)
    teacher.update()  # a frozen teacher does not follow
    policy = trainable(tiny_lm.model)
    for n, t in teacher.tensors.items():
        assert torch.equal(t, start[n])
        assert t.data_ptr() != policy[n].data_ptr()
    assert any(not torch.equal(start[n], p) for n, p in policy.items())  # the policy did train
    teacher.refresh()  # voters refreshed on promotion
    assert all(torch.equal(teacher.tensors[n], p) for n, p in policy.items())


def test_ema_update_against_a_hand_computation(tiny_lm):
    policy = trainable(tiny_lm.model)
    p0 = snapshot(tiny_lm.model)
    teacher = Teacher.ema(tiny_lm, 0.9)
    registered = dict(teacher.tensors)
    gen = torch.Generator().manual_seed(0)
    p1 = {n: torch.randn(p.shape, generator=gen) for n, p in policy.items()}
    p2 = {n: torch.randn(p.shape, generator=gen) for n, p in policy.items()}
    for target in (p1, p2):
        with torch.no_grad():
            for n, p in policy.items():
                p.copy_(target[n])
        teacher.update()
    for n, t in teacher.tensors.items():
        want = 0.81 * p0[n] + 0.09 * p1[n] + 0.1 * p2[n]  # 0.9 * (0.9 * p0 + 0.1 * p1) + 0.1 * p2
        assert torch.allclose(t, want, atol=1e-6), n
        assert t is registered[n]  # updated in place: a sampler holding the tensors sees it
    with pytest.raises(TaoInputError, match=r"must be in \[0, 1\)"):
        Teacher.ema(tiny_lm, 1.0)


def test_a_bfloat16_ema_accumulates_steps_smaller_than_its_rounding():
    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    teacher = Teacher.ema(SimpleNamespace(model=model, name="tiny-bf16"), 0.99)
    with torch.no_grad():
        model.weight.fill_(1.25)
    for _ in range(100):
        teacher.update()  # each step moves 0.0025, a third of a bfloat16 unit at 1.0
    want = 1.0 + 0.25 * (1 - 0.99**100)
    assert teacher.tensors["weight"].dtype == torch.bfloat16
    assert abs(teacher.tensors["weight"].float()[0, 0].item() - want) < 2**-7
    assert teacher.state_dict()["weight"].dtype == torch.float32


def test_state_round_trip_continues_the_same_ema(tiny_lm, tmp_path):
    teacher = Teacher.ema(tiny_lm, 0.5)
    train_steps(tiny_lm.model, 1)
    teacher.update()
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    resumed = Teacher.ema(tiny_lm, 0.5)  # made from the current policy: differs until loaded
    assert any(not torch.equal(resumed.tensors[n], t) for n, t in teacher.tensors.items())
    resumed.load_state_dict(load_file(tmp_path / "teacher.safetensors"))
    train_steps(tiny_lm.model, 1)
    teacher.update()
    resumed.update()
    assert all(torch.equal(resumed.tensors[n], t) for n, t in teacher.tensors.items())
    state = teacher.state_dict()
    with pytest.raises(TaoInputError, match="missing"):
        resumed.load_state_dict({k: v for k, v in list(state.items())[1:]})
    name = next(iter(state))
    with pytest.raises(TaoInputError, match=f"saved {name} is"):
        resumed.load_state_dict({**state, name: torch.zeros(3)})


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_sampling_from_the_teacher_gives_the_teacher_models_tokens(tiny_model_dir, teacher_dir, backend):
    lm = load_model(str(tiny_model_dir), sampler=backend)
    sampler = sampler_for(lm)
    policy_alone = sampler.sample(PROMPTS, GREEDY)
    teacher_alone = sampler_for(load_model(str(teacher_dir), sampler=backend)).sample(PROMPTS, GREEDY)
    assert tokens(teacher_alone) != tokens(policy_alone)

    teacher = Teacher.frozen(lm)
    teacher.load_state_dict(dict(load_model(str(teacher_dir)).model.named_parameters()))
    teacher.attach(sampler)
    got = sampler.sample(PROMPTS, GREEDY, weight_set="teacher")
    assert tokens(got) == tokens(teacher_alone)
    for c, ref in zip([c for g in got for c in g], [c for g in teacher_alone for c in g], strict=True):
        assert (torch.tensor(c.logprobs) - torch.tensor(ref.logprobs)).abs().max() <= 1e-5
        assert c.metadata["weight_set"] == "teacher" and c.metadata["off_policy"] is True
    mine = sampler.sample(PROMPTS, GREEDY)
    assert tokens(mine) == tokens(policy_alone) and all("weight_set" not in c.metadata for g in mine for c in g)

    teacher.refresh()  # an in-place change is seen by the next sample (the engine drops its cached prefixes)
    assert tokens(sampler.sample(PROMPTS, GREEDY, weight_set="teacher")) == tokens(policy_alone)
    with pytest.raises(TaoInputError, match="unknown weight set 'ema'"):
        sampler.sample(PROMPTS, GREEDY, weight_set="ema")
    with pytest.raises(TaoInputError, match="exists"):
        teacher.attach(sampler)
    sampler.remove_weight_set("teacher")
    with pytest.raises(TaoInputError, match="unknown weight set 'teacher'"):
        sampler.sample(PROMPTS, GREEDY, weight_set="teacher")


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_weight_sets_survive_the_model_being_replaced(tiny_model_dir, teacher_dir, backend):
    lm = load_model(str(tiny_model_dir), sampler=backend)
    sampler = sampler_for(lm)
    teacher_model = load_model(str(teacher_dir)).model
    sampler.add_weight_set("teacher", {n: p.detach() for n, p in teacher_model.named_parameters()})
    before = tokens(sampler.sample(PROMPTS, GREEDY, weight_set="teacher"))
    lm.model = load_model(str(tiny_model_dir)).model  # a new model object with the same parameter names
    assert tokens(sampler.sample(PROMPTS, GREEDY, weight_set="teacher")) == before
    if backend == "engine":
        assert sampler.engine.model is lm.model and sampler.engine.weight_sets == ["policy", "teacher"]

    from peft import LoraConfig, get_peft_model

    lm.model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(TaoInputError, match="registered before the model was replaced"):
        sampler.sample(PROMPTS, GREEDY, weight_set="teacher")
    sampler.remove_weight_set("teacher")  # as the error says; then the wrapped model samples
    assert len(tokens(sampler.sample(PROMPTS, GREEDY))) == 2 and sampler.weight_sets == ["policy"]


def test_a_lora_teacher_is_a_second_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(tiny_model_dir), sampler="engine")
    lm.model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    sampler = sampler_for(lm)
    teacher = Teacher.ema(lm, 0.9)
    assert teacher.tensors and all("lora_" in n for n in teacher.tensors)
    assert sum(t.numel() for t in teacher.tensors.values()) < sum(p.numel() for p in lm.model.parameters()) / 20
    teacher.attach(sampler)
    with torch.no_grad():
        for t in teacher.tensors.values():
            t.normal_(0, 1.0)  # adapters far from the policy's (zero-initialized B): other tokens
    assert tokens(sampler.sample(PROMPTS, GREEDY, weight_set="teacher")) != tokens(sampler.sample(PROMPTS, GREEDY))
