"""The Trainer on a tiny random Llama with handmade candidates."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tao_core.batching import Segment, pack, plan_micro_batches
from tao_core.errors import PluginError, TaoInputError
from tao_core.models import LoadedModel
from tao_core.objectives import LossOutput, Objective
from tao_core.train import TrainConfig, Trainer
from tao_core.types import Candidate, Prompt, Score
from tests.conftest import completion_logprobs

CONFIG = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_lm(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(LlamaForCausalLM(CONFIG).eval(), tiny_tokenizer(), "tiny", None)



def make_batch(lm: LoadedModel, seed: int = 1, temperature: float = 1.0, n_prompts: int = 3, n: int = 4):
    """Handmade groups: candidate 0 scores 1, the others 0; old log-probs from the current model."""
    g = torch.Generator().manual_seed(seed)
    prompts, groups, scores = [], [], []
    for p in range(n_prompts):
        ids = torch.randint(2, 97, (4 + p,), generator=g).tolist()
        prompts.append(Prompt(id=str(p), text="q"))
        cands = []
        for j in range(n):
            toks = torch.randint(2, 97, (2 + (j + p) % 3,), generator=g).tolist()
            lp = completion_logprobs(lm.model, ids, toks, temperature).tolist()
            cands.append(Candidate(str(p), j, "", ids, toks, lp, temperature=temperature))
        groups.append(cands)
        scores.append([Score.ok(1.0 if j == 0 else 0.0) for j in range(n)])
    return prompts, groups, scores


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_high_reward_completions_become_more_likely():
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", lr=3e-3))
    _, groups, _ = make_batch(lm)
    before = [[float(completion_logprobs(lm.model, c.prompt_token_ids, c.token_ids).sum()) for c in g] for g in groups]
    for _ in range(5):
        trainer.step(*make_batch(lm))  # on-policy: old log-probs from the current weights
    after = [[float(completion_logprobs(lm.model, c.prompt_token_ids, c.token_ids).sum()) for c in g] for g in groups]
    for b, a in zip(before, after, strict=True):
        assert a[0] > b[0] + 0.5  # the rewarded completion went up
        others = sum(a[j] - b[j] for j in range(1, 4)) / 3
        assert others < a[0] - b[0] - 0.5  # and pulled away from the unrewarded ones


@pytest.mark.parametrize("objective", ["grpo", "dr_grpo", "dapo", "online_dpo", "best_of_n_sft"])
def test_shared_prefix_layout_matches_padded_rows(objective):
    results = []
    for layout in ("shared_prefix", "padded"):
        lm = tiny_lm()
        batch = make_batch(lm, temperature=0.8)
        metrics = Trainer(lm, TrainConfig(objective=objective, layout=layout, kl_coef=0.1)).step(*batch)
        results.append((metrics["loss"], grads(lm.model)))
    (loss_a, g_a), (loss_b, g_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-5, rtol=1e-5, msg=name)


ACCUMULATION_CASES = [
    ("grpo", {}),
    ("grpo", {"ratio_level": "sequence", "kl_coef": 0.1, "kl_estimator": "exact"}),
    ("dr_grpo", {}),
    ("dapo", {"kl_coef": 0.1}),
    ("online_dpo", {}),
    ("best_of_n_sft", {}),
]


@pytest.mark.parametrize(("objective", "options"), ACCUMULATION_CASES)
def test_gradient_accumulation_equals_one_big_batch(objective, options):
    results = []
    for budget in (10_000, 9):  # 9 tokens: several micro-batches and groups split across them
        lm = tiny_lm()
        batch = make_batch(lm)
        cfg = TrainConfig(objective=objective, micro_batch_tokens=budget, **options)
        metrics = Trainer(lm, cfg).step(*batch)
        results.append((metrics, grads(lm.model)))
    (m_big, g_big), (m_small, g_small) = results
    assert m_big["micro_batches"] == 1 and m_small["micro_batches"] >= 3
    assert m_small["loss"] == pytest.approx(m_big["loss"], abs=1e-5)
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], atol=1e-5, rtol=1e-5, msg=name)


def test_split_keeps_pairs_and_budget():
    seg = Segment([5, 6, 7], [[1, 2, 3]] * 6, [[0.0] * 3] * 6, [1.0, -1.0] * 3, [1.0, 0.0] * 3, 1.0)
    plan = plan_micro_batches([seg], budget=8, unit=2)
    assert [len(s.completions) for mb in plan for s in mb] == [2, 2, 2]  # 3 + 2*2 = 7 <= 8 tokens each
    inputs, batch = pack(plan[0], "shared_prefix")
    assert inputs.input_ids.shape == (1, 7) and batch.n_tokens == 6
    assert inputs.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4]  # each completion restarts after the prompt


def test_masked_scores_off_policy_and_skipped_groups_are_counted():
    lm = tiny_lm()
    prompts, groups, scores = make_batch(lm)
    scores[0][1] = Score.abstain("no majority")
    scores[1] = [Score.ok(1.0), Score.error("timeout"), Score.abstain("x"), Score.abstain("x")]  # 1 ok: skipped
    groups[2][3].metadata["off_policy"] = True
    metrics = Trainer(lm, TrainConfig(objective="grpo")).step(prompts, groups, scores)
    assert metrics["skipped_groups"] == 1.0
    assert metrics["off_policy_dropped"] == 1.0
    assert metrics["sequences"] == 3 + 3  # group 0 without its abstained one, group 2 without off-policy
    assert metrics["scored"] == 3 + 1 + 3
    with pytest.raises(TaoInputError, match="group 0: 4 candidates but 3 scores"):
        Trainer(lm, TrainConfig(objective="grpo")).step(prompts[:1], [groups[0]], [scores[0][:3]])


def test_nothing_to_learn_means_no_update():
    lm = tiny_lm()
    prompts, groups, _ = make_batch(lm)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    one_ok = [[Score.ok(1.0)] + [Score.abstain("unsure")] * 3 for _ in groups]
    metrics = Trainer(lm, TrainConfig(objective="grpo")).step(prompts, groups, one_ok)
    assert metrics["updated"] == 0.0 and metrics["step"] == 1.0 and metrics["skipped_groups"] == 3
    equal = [[Score.ok(0.5)] * 4 for _ in groups]  # DAPO drops groups without signal
    assert Trainer(lm, TrainConfig(objective="dapo")).step(prompts, groups, equal)["updated"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_lora_trains_adapters_and_reference_is_the_base():
    lm = tiny_lm()
    base = {n: p.clone() for n, p in lm.model.named_parameters()}
    prompts, groups, scores = make_batch(lm)
    probe = torch.tensor([groups[0][0].prompt_token_ids + groups[0][0].token_ids])
    with torch.no_grad():
        base_logits = lm.model(probe).logits
    trainer = Trainer(lm, TrainConfig(objective="ppo_clip_kl", lora=True, lr=1e-2))
    assert trainer.reference is None and trainer.needs_reference  # no second copy under LoRA
    assert all("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    for _ in range(3):
        metrics = trainer.step(prompts, groups, scores)
    assert metrics["kl"] > 0
    with torch.no_grad():
        tuned_logits = lm.model(probe).logits
        with lm.model.disable_adapter():
            ref_logits = lm.model(probe).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)
    torch.testing.assert_close(ref_logits, base_logits)
    for n, p in lm.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


@pytest.mark.parametrize("lora", [False, True])
def test_save_pretrained_round_trips(tmp_path, lora):
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", lora=lora, lr=1e-2))
    trainer.step(*make_batch(lm))
    out = trainer.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    probe = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, lm.model(probe).logits, atol=1e-5, rtol=1e-5)
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith("adapter") for p in out.iterdir())


def _bytes_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_bit_identical(lora):
    cfg = TrainConfig(objective="grpo", lora=lora, lr=1e-2, kl_coef=0.05)

    def run(trainer, lm, steps):
        for s in steps:
            trainer.step(*make_batch(lm, seed=10 + s))
            torch.rand(3)  # a step's caller may draw from the global RNG too

    lm_a = tiny_lm()
    trainer_a = Trainer(lm_a, cfg)
    run(trainer_a, lm_a, range(4))
    rng_a = torch.get_rng_state()

    lm_b = tiny_lm()
    trainer_b = Trainer(lm_b, cfg)
    run(trainer_b, lm_b, range(2))
    state = _bytes_round_trip(trainer_b.state_dict())
    torch.rand(5)  # the interrupted process's RNG moves on; the state restores it

    lm_c = tiny_lm()  # a fresh process builds the Trainer on the same base model, then loads the state
    trainer_c = Trainer(lm_c, cfg)
    trainer_c.load_state_dict(state)
    run(trainer_c, lm_c, range(2, 4))

    assert trainer_c.step_count == trainer_a.step_count == 4
    for (n, a), (_, c) in zip(lm_a.model.named_parameters(), lm_c.model.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, c), n
    assert torch.equal(torch.get_rng_state(), rng_a)


def test_current_old_logprobs_ignore_the_sampled_ones():
    results = []
    for mode in ("sampled", "current"):
        lm = tiny_lm()
        prompts, groups, scores = make_batch(lm)
        if mode == "current":  # wrong sampled log-probs must not matter
            for grp in groups:
                for c in grp:
                    c.logprobs = [-5.0] * len(c.logprobs)
        metrics = Trainer(lm, TrainConfig(objective="dapo", old_logprobs=mode)).step(prompts, groups, scores)
        results.append((metrics, grads(lm.model)))
    (m_s, g_s), (m_c, g_c) = results
    assert m_c["clip_fraction"] == 0.0
    assert m_c["loss"] == pytest.approx(m_s["loss"], abs=1e-5)
    for name in g_s:
        torch.testing.assert_close(g_c[name], g_s[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "exact"])
def test_kl_to_the_reference_grows_as_the_policy_moves(estimator):
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", lr=1e-2, kl_coef=0.1, kl_estimator=estimator))
    first = trainer.step(*make_batch(lm))
    second = trainer.step(*make_batch(lm))
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert abs(second["kl"]) > 1e-4
    if estimator in ("k2", "k3", "exact"):  # non-negative estimators
        assert second["kl"] > 0


def test_shared_prefix_under_eager_attention_matches_sdpa():
    losses = []
    for impl in ("sdpa", "eager"):
        lm = tiny_lm()
        lm.model.set_attn_implementation(impl)
        assert lm.model.config._attn_implementation == impl
        losses.append(Trainer(lm, TrainConfig(objective="best_of_n_sft")).step(*make_batch(lm))["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.real_model
def test_training_logprobs_match_the_samplers_on_the_embedded_model():
    import tao_kernels

    from tao_core.batching import final_hidden
    from tao_core.models import load_model
    from tao_core.sampler import HFSampler
    from tao_core.types import SamplingParams

    lm = load_model("smollm2-135m")  # the README setup installs it: its absence is a failure
    prompt = Prompt(id="0", text="What is 12 + 30?")
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=8, seed=0)
    group = HFSampler(lm).sample([prompt], params)[0]
    seg = Segment(group[0].prompt_token_ids, [c.token_ids for c in group], [c.logprobs for c in group],
                  [1.0, -1.0], [1.0, 0.0], group[0].temperature)
    inputs, batch = pack([seg])
    with torch.no_grad():
        hidden = final_hidden(lm.model.get_decoder(), inputs)
        weight = lm.model.get_output_embeddings().weight
        lp = tao_kernels.linear_logprob(hidden, weight, batch.targets, temperature=batch.temperature)
    torch.testing.assert_close(lp, batch.old_logprobs, atol=1e-4, rtol=0)  # measured 2e-6


def test_ppo_epochs_take_several_updates_on_one_batch():
    losses = []
    for epochs in (1, 3):
        lm = tiny_lm()
        trainer = Trainer(lm, TrainConfig(objective="dapo", ppo_epochs=epochs, lr=1e-2))
        losses.append(trainer.step(*make_batch(lm))["loss"])  # the last epoch's loss
        adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
        assert adam_steps == {float(epochs)} and trainer.step_count == 1
    assert losses[1] < losses[0] - 1e-3  # the third epoch sees ratios moved in the advantages' direction


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.25, 0.5, 0.75, 0.8, 0.6, 0.4, 0.2, 0.0]),
    ("cosine", [0.25, 0.5, 0.75, 0.9045085, 0.6545085, 0.3454915, 0.0954915, 0.0]),
])
def test_lr_schedule_warms_up_then_follows_the_schedule(schedule, expected):
    from tao_core.train import scheduled_lr

    cfg = TrainConfig(lr_schedule=schedule, warmup_steps=3, total_steps=8)
    assert [scheduled_lr(1.0, s, cfg) for s in range(1, 9)] == pytest.approx(expected)
    assert scheduled_lr(1.0, 20, cfg) == pytest.approx(expected[-1])  # past the end it stays put


def test_trainer_applies_the_schedule_to_the_update():
    """The step's reported lr is the one AdamW used: a cosine run ends on a zero-lr step that
    leaves the weights unchanged."""
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", lr=1e-2, lr_schedule="cosine", total_steps=2))
    first = trainer.step(*make_batch(lm))
    assert first["lr"] == pytest.approx(0.5e-2)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    last = trainer.step(*make_batch(lm))
    assert last["lr"] == 0.0 and last["updated"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_bad_schedule_settings_are_named():
    with pytest.raises(TaoInputError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(TaoInputError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1).validate()
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", lr_schedule="linear"))
    with pytest.raises(TaoInputError, match="needs total_steps"):
        trainer.step(*make_batch(lm))


# -- optimize: a loss of the caller's own -------------------------------------------------------


def _sequences(seed: int = 3, n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 97, (3 + i % 3,), generator=g).tolist() for i in range(n)]


def seq_nll(trainer: Trainer, part: list[list[int]]) -> LossOutput:
    """Mean next-token NLL per sequence of ``part`` (a custom loss whose unit is the sequence)."""
    losses = []
    with trainer.forward_context():
        for ids in part:
            logits = trainer.lm.model(torch.tensor([ids])).logits[0, :-1].float()
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))
    loss = torch.stack(losses).mean()
    return LossOutput(loss, {"first_token_nll": float(losses[0].detach())})


def test_optimize_accumulates_micro_batches_as_one_batch():
    seqs = _sequences()
    runs = []
    for parts in ([seqs], [seqs[:1], seqs[1:4], seqs[4:]]):
        lm = tiny_lm()
        trainer = Trainer(lm, TrainConfig(lr=1e-2), custom_loss=True)
        metrics = trainer.optimize(parts, functools.partial(seq_nll, trainer), [len(p) for p in parts])
        runs.append((metrics, grads(lm.model)))
    (one, g_one), (many, g_many) = runs
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6)
    assert one["grad_norm"] == pytest.approx(many["grad_norm"], rel=1e-5)
    for n, g in g_one.items():
        torch.testing.assert_close(g_many[n], g, rtol=1e-4, atol=1e-7)
    assert set(one) == {"step", "lr", "loss", "grad_norm", "first_token_nll"} and one["step"] == 1.0


def test_optimize_schedules_clips_and_counts_steps():
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(lr=1e-2, warmup_steps=1, max_grad_norm=1e-3), custom_loss=True)
    loss = functools.partial(seq_nll, trainer)
    first = trainer.optimize([_sequences()], loss)
    assert first["lr"] == pytest.approx(0.5e-2) and trainer.optimizer.param_groups[0]["lr"] == first["lr"]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads(lm.model).values()]))
    assert first["grad_norm"] > 1e-3 and float(clipped) == pytest.approx(1e-3, rel=1e-3)
    second = trainer.optimize([_sequences(seed=4)], loss)
    assert second["lr"] == 1e-2 and second["step"] == 2.0 and trainer.step_count == 2
    assert not lm.model.training  # back in eval mode between updates


def test_custom_loss_trainer_has_no_objective_and_says_what_to_call():
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(kl_coef=0.1), custom_loss=True)
    assert trainer.objective is None and trainer.reference is None  # no frozen copy for a KL it never computes
    with pytest.raises(TaoInputError, match="custom_loss=True.*optimize"):
        trainer.step(*make_batch(lm))
    with pytest.raises(TaoInputError, match="objective 'sft' would never be used"):
        Trainer(lm, custom_loss=True, objective=Objective("sft", lambda *a: None, advantage="group_mean"))
    with pytest.raises(TaoInputError, match="2 micro-batches but 1 units"):
        trainer.optimize([[[2, 3]], [[4, 5]]], functools.partial(seq_nll, trainer), [1])
    with pytest.raises(TaoInputError, match="units summing to 0"):
        trainer.optimize([[[2, 3]]], functools.partial(seq_nll, trainer), [0])
    nan = LossOutput(torch.tensor(float("nan"), requires_grad=True), {})
    with pytest.raises(PluginError, match="my loss returned a non-finite loss"):
        trainer.optimize([None], lambda part: nan, name="my loss")


def test_optimize_resume_is_bit_identical():
    """A custom-loss trainer's state (weights, AdamW, step, RNGs) resumes exactly as step's does."""
    cfg = TrainConfig(lr=1e-2, warmup_steps=2)

    def run(trainer, steps):
        for s in steps:
            trainer.optimize([_sequences(seed=20 + s)], functools.partial(seq_nll, trainer))

    lm_a, lm_b, lm_c = tiny_lm(), tiny_lm(), tiny_lm()
    trainer_a = Trainer(lm_a, cfg, custom_loss=True)
    run(trainer_a, range(3))
    trainer_b = Trainer(lm_b, cfg, custom_loss=True)
    run(trainer_b, range(1))
    state = _bytes_round_trip(trainer_b.state_dict())
    trainer_c = Trainer(lm_c, cfg, custom_loss=True)
    trainer_c.load_state_dict(state)
    run(trainer_c, range(1, 3))
    assert trainer_c.step_count == 3
    for (n, a), (_, c) in zip(lm_a.model.named_parameters(), lm_c.model.named_parameters(), strict=True):
        assert torch.equal(a, c), n


def test_a_trainer_needs_an_objective_named_or_given():
    with pytest.raises(TaoInputError, match="train.objective is not set"):
        Trainer(tiny_lm(), TrainConfig())
