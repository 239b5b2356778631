"""Off-policy candidates (truncated importance sampling), DAPO's soft overlong penalty and masking of
truncated completions, in the training step (tao_core.offpolicy through Trainer.step)."""

from __future__ import annotations

import math

import pytest
import torch
from tao_plugins.objectives import clipped_policy_loss

from tao_core.errors import TaoInputError
from tao_core.objectives import Objective
from tao_core.offpolicy import importance_weights, length_penalty
from tao_core.train import TrainConfig, Trainer
from tao_core.types import Candidate, Prompt, Score
from tests.conftest import completion_logprobs
from tests.test_train import grads, make_batch, tiny_lm

TEMPERATURE = 0.8
STRUCTURED = [11, 12, 13]  # the template tokens a structured prompt puts before the question


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def policy_logprobs(lm, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The policy's log-probs of ``tokens`` after ``prompt`` from one full forward (the hand reference)."""
    return completion_logprobs(lm.model, prompt, tokens, TEMPERATURE)


def off_policy(lm, plain: list[int], tokens: list[int], log_ratio: list[float], index: int = 0,
               prompt_ids: bool = True) -> Candidate:
    """A candidate sampled under the structured prompt whose behaviour log-probs are chosen so that
    log pi(plain) - log mu = ``log_ratio`` per token."""
    mu = policy_logprobs(lm, plain, tokens) - torch.tensor(log_ratio)
    meta = {"off_policy": True, **({"policy_prompt_token_ids": plain} if prompt_ids else {})}
    return Candidate("0", index, "", STRUCTURED + plain, tokens, mu.tolist(), temperature=TEMPERATURE,
                     template="steps", metadata=meta)


def on_policy(lm, plain: list[int], tokens: list[int], index: int = 0, shift: float = 0.0) -> Candidate:
    lp = policy_logprobs(lm, plain, tokens) + shift
    return Candidate("0", index, "", plain, tokens, lp.tolist(), temperature=TEMPERATURE)


class Recorder:
    """An objective wrapping GRPO's loss that keeps every micro-batch it sees."""

    def __init__(self, loss_agg: str = "seq_mean") -> None:
        self.batches = []
        self.objective = Objective("recorder", self.loss, advantage="group_norm", defaults={"loss_agg": loss_agg})

    def loss(self, batch, hidden, weight, cfg):
        self.batches.append(batch)
        return clipped_policy_loss(batch, hidden, weight, cfg)


PLAIN = [20, 21, 22, 23]
TOKENS = [[30, 31, 32], [40, 41], [50, 51, 52, 53]]


def mixed_group(lm):
    """One group: two on-policy candidates, then two off-policy ones with chosen log-ratios."""
    log_ratios = [[math.log(0.5), math.log(1.5), math.log(3.0)], [math.log(1.2), math.log(0.8), 0.4, -0.1]]
    cands = [on_policy(lm, PLAIN, TOKENS[0], 0), on_policy(lm, PLAIN, TOKENS[1], 1),
             off_policy(lm, PLAIN, TOKENS[0], log_ratios[0], 2), off_policy(lm, PLAIN, TOKENS[2], log_ratios[1], 3)]
    scores = [Score.ok(v) for v in (1.0, 0.0, 1.0, 0.0)]
    return [Prompt(id="0", text="q")], [cands], [scores], log_ratios


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_and_old_logprobs_match_a_hand_computation(level):
    lm = tiny_lm()
    prompts, groups, scores, log_ratios = mixed_group(lm)
    cands = groups[0]
    hand = torch.cat([policy_logprobs(lm, PLAIN, c.token_ids) for c in cands[2:]])  # before the update
    rec = Recorder()
    cfg = TrainConfig(off_policy="importance", is_level=level, is_cap=2.0)
    metrics = Trainer(lm, cfg, objective=rec.objective).step(prompts, groups, scores)
    (batch,) = rec.batches
    # hand: the group's advantages over all four (off-policy ones included), then the weights
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    seq_adv = (r - r.mean()) / (r.std() + 1e-4)
    ratios = []
    for lr in log_ratios:
        lr = torch.tensor(lr, dtype=torch.float64)
        ratios.append(lr.exp() if level == "token" else lr.sum().exp().expand(len(lr)))
    expected_adv = torch.cat([seq_adv[0].expand(3), seq_adv[1].expand(2),
                              seq_adv[2] * ratios[0].clamp(max=2.0), seq_adv[3] * ratios[1].clamp(max=2.0)])
    assert batch.n_seqs == 4 and batch.off_policy.tolist() == [False] * 5 + [True] * 7
    torch.testing.assert_close(batch.advantages.double(), expected_adv, rtol=1e-4, atol=1e-6)
    # old log-probs: the sampled ones for on-policy tokens (bit for bit), the policy's own on the
    # plain prompt for off-policy tokens (a full forward here, the packed one in the trainer)
    assert batch.old_logprobs[:5].tolist() == cands[0].logprobs + cands[1].logprobs
    torch.testing.assert_close(batch.old_logprobs[5:], hand, rtol=0, atol=1e-5)
    flat = torch.cat(ratios)
    assert metrics["is_ratio_mean"] == pytest.approx(float(flat.mean()), rel=1e-4)
    assert metrics["is_ratio_max"] == pytest.approx(float(flat.max()), rel=1e-4)
    assert metrics["is_clipped_fraction"] == pytest.approx(float((flat > 2.0).double().mean()))
    assert 0 < metrics["is_clipped_fraction"] < 1
    assert metrics["off_policy_trained"] == 2 and metrics["off_policy_dropped"] == 0
    assert metrics["sequences"] == 4 and metrics["clip_fraction"] == 0.0  # the first update's ratio is 1


def test_importance_weights_function():
    current = torch.tensor([-1.0, -2.0, -0.5, -0.1, -3.0])
    behaviour = torch.tensor([-1.5, -1.0, -0.5, -0.3, -1.0])
    off = torch.tensor([True, True, False, True, True])
    cu = torch.tensor([0, 3, 5])
    w, r = importance_weights(current, behaviour, off, cu, "token", 1.5)
    torch.testing.assert_close(r, torch.tensor([math.exp(0.5), math.exp(-1.0), 1.0, math.exp(0.2), math.exp(-2.0)],
                                                dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.5, math.exp(-1.0), 1.0, math.exp(0.2), math.exp(-2.0)]))
    w, r = importance_weights(current, behaviour, off, cu, "sequence", 1.5)
    seq = [math.exp(0.5 - 1.0), math.exp(0.2 - 2.0)]  # the on-policy token adds nothing to its sequence's sum
    torch.testing.assert_close(w, torch.tensor([seq[0], seq[0], 1.0, seq[1], seq[1]]))
    big = torch.full((400,), 2.0)
    w, r = importance_weights(big, torch.zeros(400), torch.ones(400, dtype=torch.bool), torch.tensor([0, 400]),
                              "sequence", 2.0)
    assert torch.isfinite(r).all() and (w == 2.0).all()  # exp(800) clamped, never inf


@pytest.mark.parametrize(("level", "w"), [("token", 0.6), ("token", 5.0), ("sequence", 1.7)])
def test_an_off_policy_gradient_is_w_times_the_on_policy_one(level, w):
    """Every candidate off-policy with ratio w (capped at 2): the gradient is min(w, 2) times the
    gradient of the same candidates trained on-policy with old log-probs = the current ones."""
    runs = []
    for mode in ("importance", "on_policy"):
        lm = tiny_lm()
        cands = []
        for j, toks in enumerate(TOKENS):
            per_token = [math.log(w)] * len(toks) if level == "token" else [math.log(w) / len(toks)] * len(toks)
            c = off_policy(lm, PLAIN, toks, per_token, j)
            if mode == "on_policy":
                c = Candidate("0", j, "", PLAIN, toks, [-9.0] * len(toks), temperature=TEMPERATURE)
            cands.append(c)
        scores = [[Score.ok(v) for v in (1.0, 0.0, 0.5)]]
        cfg = TrainConfig(objective="grpo", off_policy="importance", is_level=level, is_cap=2.0, max_grad_norm=0,
                          old_logprobs="sampled" if mode == "importance" else "current")
        Trainer(lm, cfg).step([Prompt(id="0", text="q")], [cands], scores)
        runs.append(grads(lm.model))
    weighted, plain = runs
    scale = min(w, 2.0)
    assert len(plain) > 0
    for name in plain:
        torch.testing.assert_close(weighted[name], scale * plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_later_ppo_epochs_keep_the_first_epochs_weights_and_old_logprobs():
    lm = tiny_lm()
    prompts, groups, scores, _ = mixed_group(lm)
    rec = Recorder()
    cfg = TrainConfig(off_policy="importance", is_cap=2.0, ppo_epochs=2, lr=1e-2)
    Trainer(lm, cfg, objective=rec.objective).step(prompts, groups, scores)
    first, second = rec.batches
    assert torch.equal(first.advantages.cpu(), second.advantages.cpu())
    assert torch.equal(first.old_logprobs.cpu(), second.old_logprobs.cpu())


def test_an_off_policy_candidate_without_its_task_prompt_is_dropped_and_counted():
    lm = tiny_lm()
    prompts, groups, scores, _ = mixed_group(lm)
    groups[0][3] = off_policy(lm, PLAIN, TOKENS[2], [0.0] * 4, 3, prompt_ids=False)
    rec = Recorder()
    metrics = Trainer(lm, TrainConfig(off_policy="importance"), objective=rec.objective).step(prompts, groups, scores)
    assert metrics["off_policy_dropped"] == 1 and metrics["off_policy_trained"] == 1
    assert metrics["sequences"] == 3 and metrics["scored"] == 3
    assert rec.batches[0].targets.tolist() == TOKENS[0] + TOKENS[1] + TOKENS[0]
    groups[0][3].metadata["policy_prompt_token_ids"] = "20 21"
    with pytest.raises(TaoInputError, match=r"0/3 .*policy_prompt_token_ids"):
        Trainer(lm, TrainConfig(off_policy="importance"), objective=rec.objective).step(prompts, groups, scores)


def test_sampler_trainer_kl_is_the_mean_log_prob_gap_on_on_policy_tokens():
    lm = tiny_lm()
    cands = [on_policy(lm, PLAIN, TOKENS[0], 0, shift=0.25), on_policy(lm, PLAIN, TOKENS[1], 1, shift=-0.05),
             off_policy(lm, PLAIN, TOKENS[2], [3.0] * 4, 2)]  # off-policy tokens stay out of it
    scores = [[Score.ok(v) for v in (1.0, 0.0, 0.0)]]
    metrics = Trainer(lm, TrainConfig(objective="grpo", off_policy="importance")).step(
        [Prompt(id="0", text="q")], [cands], scores)
    assert metrics["sampler_trainer_kl"] == pytest.approx((3 * 0.25 - 2 * 0.05) / 5, abs=1e-5)


STEP_KEYS = {"reward_mean", "reward_std", "scored", "adv_mean", "adv_std", "adv_abs_mean", "skipped_groups",
             "off_policy_dropped", "empty_dropped", "sequences", "step", "tokens", "row_tokens", "micro_batches",
             "lr", "loss", "grad_norm", "entropy", "clip_fraction", "updated", "seconds", "tokens_per_s"}


def test_drop_mode_is_unchanged_and_importance_leaves_on_policy_candidates_alone():
    results = {}
    for name, mode, mark in [("drop", "drop", True), ("abstained", "drop", False), ("importance", "importance", False)]:
        lm = tiny_lm()
        prompts, groups, scores = make_batch(lm, temperature=0.8)
        if mark:  # dropped as off-policy
            groups[1][2].metadata["off_policy"] = True
        else:  # the same candidate left out by its score instead
            scores[1][2] = Score.abstain("left out")
        metrics = Trainer(lm, TrainConfig(objective="dapo", off_policy=mode)).step(prompts, groups, scores)
        results[name] = (metrics, grads(lm.model))
    (m_drop, g_drop), (m_abs, g_abs), (m_imp, g_imp) = results["drop"], results["abstained"], results["importance"]
    assert set(m_drop) == STEP_KEYS  # no new metric in the default mode
    assert m_drop["off_policy_dropped"] == 1 and m_abs["off_policy_dropped"] == 0
    same = {k for k in STEP_KEYS if k not in ("off_policy_dropped", "seconds", "tokens_per_s")}
    assert {k: m_drop[k] for k in same} == {k: m_abs[k] for k in same}
    assert {k: m_imp[k] for k in same} == {k: m_abs[k] for k in same}
    assert set(m_imp) - STEP_KEYS == {"is_ratio_mean", "is_ratio_max", "is_clipped_fraction", "off_policy_trained",
                                      "sampler_trainer_kl"}
    assert math.isnan(m_imp["is_ratio_mean"]) and m_imp["off_policy_trained"] == 0
    for n, g in g_abs.items():
        assert torch.equal(g_drop[n], g), n
        assert torch.equal(g_imp[n], g), n


# -- soft overlong penalty ----------------------------------------------------------------------


def test_length_penalty_at_the_boundaries():
    # L_max = 20, L_cache = 4: free up to 16 tokens, then a linear ramp to -penalty at 20
    assert length_penalty(1, 20, 4, 1.0) == 0.0
    assert length_penalty(16, 20, 4, 1.0) == 0.0
    assert length_penalty(17, 20, 4, 1.0) == pytest.approx(-0.25)
    assert length_penalty(18, 20, 4, 0.5) == pytest.approx(-0.25)
    assert length_penalty(20, 20, 4, 1.0) == pytest.approx(-1.0)
    assert length_penalty(21, 20, 4, 2.0) == -2.0  # DAPO's third case: longer than L_max
    assert length_penalty(20, 20, 20, 1.0) == pytest.approx(-1.0) and length_penalty(5, 20, 20, 1.0) == -0.25


def test_overlong_penalty_shapes_the_rewards_the_advantages_see():
    lm = tiny_lm()
    plain = PLAIN
    lengths = [3, 5, 6, 8]  # max_new_tokens 8, buffer 4: 0, -0.25, -0.5, -1.0 (penalty 1)
    cands = [on_policy(lm, plain, list(range(30, 30 + n)), j) for j, n in enumerate(lengths)]
    scores = [[Score.ok(1.0) for _ in cands]]
    rec = Recorder()
    trainer = Trainer(lm, TrainConfig(overlong_buffer=4), objective=rec.objective)
    metrics = trainer.step([Prompt(id="0", text="q")], [cands], scores, max_new_tokens=8)
    r = torch.tensor([1.0, 0.75, 0.5, 0.0])
    torch.testing.assert_close(rec.batches[0].seq_advantages, (r - r.mean()) / (r.std() + 1e-4))
    assert metrics["overlong_penalized"] == 3 and metrics["overlong_penalty_mean"] == pytest.approx(-1.75 / 3)
    assert metrics["reward_mean"] == 1.0  # the scorers' own values
    with pytest.raises(TaoInputError, match="needs the step's max_new_tokens"):
        trainer.step([Prompt(id="0", text="q")], [cands], scores)
    with pytest.raises(TaoInputError, match=r"overlong_buffer = 4 must lie in \[1, max_new_tokens = 3\]"):
        trainer.step([Prompt(id="0", text="q")], [cands], scores, max_new_tokens=3)


# -- masking truncated completions --------------------------------------------------------------


def test_mask_truncated_removes_exactly_those_sequences_tokens():
    lm = tiny_lm()
    prompts, groups, scores = make_batch(lm)
    cut = {(0, 0), (1, 2), (2, 1)}
    for g, grp in enumerate(groups):
        for i, c in enumerate(grp):
            c.finish_reason = "length" if (g, i) in cut else "stop"
    kept = {}
    for masked in (False, True):
        trainer = Trainer(tiny_lm(), TrainConfig(objective="grpo", mask_truncated=masked))
        segments, metrics = trainer._segments(groups, scores)
        kept[masked] = {(tuple(s.prompt_ids), tuple(c)): a for s in segments
                        for c, a in zip(s.completions, s.advantages, strict=True)}
        assert metrics.get("truncated_masked") == (3 if masked else None)
    removed = {(tuple(groups[g][i].prompt_token_ids), tuple(groups[g][i].token_ids)) for g, i in cut}
    assert set(kept[False]) - set(kept[True]) == removed and set(kept[True]) <= set(kept[False])
    # the truncated still count in their group's statistics: the others' advantages do not move
    assert all(kept[True][k] == kept[False][k] for k in kept[True])
    metrics = Trainer(lm, TrainConfig(objective="grpo", mask_truncated=True)).step(prompts, groups, scores)
    total = sum(len(c.token_ids) for grp in groups for c in grp)
    assert metrics["tokens"] == total - sum(len(groups[g][i].token_ids) for g, i in cut)
    assert metrics["sequences"] == 12 - 3 and metrics["truncated_masked"] == 3


def test_mask_truncated_drops_a_whole_dpo_pair():
    lm = tiny_lm()
    prompts, groups, scores = make_batch(lm)
    for grp in groups:
        for c in grp:
            c.finish_reason = "stop"
    groups[0][0].finish_reason = "length"  # group 0's chosen candidate (the only one scoring 1)
    segments, metrics = Trainer(lm, TrainConfig(objective="online_dpo", mask_truncated=True))._segments(groups, scores)
    assert metrics["truncated_masked"] == 1
    assert len(segments) == 2 and all(len(s.completions) == 2 for s in segments)
    assert [s.prompt_ids for s in segments] == [groups[1][0].prompt_token_ids, groups[2][0].prompt_token_ids]


def test_micro_batches_accumulate_to_the_one_batch_weights_and_ratios():
    runs = []
    for budget in (10_000, 6):  # 6 tokens: several micro-batches, the group split across them
        lm = tiny_lm()
        prompts, groups, scores, _ = mixed_group(lm)
        cfg = TrainConfig(objective="dapo", off_policy="importance", micro_batch_tokens=budget)
        runs.append((Trainer(lm, cfg).step(prompts, groups, scores), grads(lm.model)))
    (m_big, g_big), (m_small, g_small) = runs
    assert m_big["micro_batches"] == 1 and m_small["micro_batches"] >= 3
    for key in ("loss", "is_ratio_mean", "is_ratio_max", "is_clipped_fraction", "sampler_trainer_kl"):
        assert m_small[key] == pytest.approx(m_big[key], rel=1e-5, abs=1e-6), key
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_diverse_generators_voters_train_the_plain_prompt(tiny_lm):
    """End to end on the conftest model: the ``diverse`` generator's structured-template candidates
    are trained on the task prompt, their ratios are pi(plain) / mu(structured) from a full forward,
    and the sampler agrees with the trainer on the on-policy ones."""
    from tao_plugins.generators import DiverseGenerator
    from tao_plugins.tasks.arithmetic import ArithmeticTask

    from tao_core.types import SamplingParams

    prompts = ArithmeticTask().train_prompts(2)
    params = SamplingParams(n=8, max_new_tokens=6, seed=3)
    groups = DiverseGenerator(tiny_lm, temperatures=(0.7, 1.0)).generate(prompts, params)
    scores = [[Score.ok(float(j % 3 == 0)) for j in range(len(g))] for g in groups]
    off = [c for g in groups for c in g if c.metadata["off_policy"]]
    log_ratio = torch.cat([completion_logprobs(tiny_lm.model, c.metadata["policy_prompt_token_ids"], c.token_ids,
                                               c.temperature) - torch.tensor(c.logprobs) for c in off]).double()
    metrics = Trainer(tiny_lm, TrainConfig(objective="grpo", off_policy="importance", is_cap=3.0)).step(
        prompts, groups, scores)
    assert metrics["off_policy_trained"] == len(off) == 12 and metrics["sequences"] == 16
    assert metrics["is_ratio_mean"] == pytest.approx(float(log_ratio.exp().mean()), rel=1e-4)
    assert metrics["is_ratio_max"] == pytest.approx(float(log_ratio.exp().max()), rel=1e-4)
    assert metrics["is_clipped_fraction"] == pytest.approx(float((log_ratio.exp() > 3.0).double().mean()))
    assert abs(metrics["sampler_trainer_kl"]) < 1e-4


def test_off_policy_candidates_train_at_the_policys_temperature():
    """A voter drawn at T=0.3 trains the plain prompt at the policy's own temperature (its log-probs
    stay the behaviour policy's, so the ratio is pi(T=1) / mu(T=0.3)); on-policy ones keep theirs."""
    lm = tiny_lm()
    trainer = Trainer(lm, TrainConfig(objective="grpo", off_policy="importance"))
    _, groups, scores, _ = mixed_group(lm)
    for c in groups[0][2:]:
        c.temperature = 0.3
    segments, _ = trainer._segments(groups, scores, policy_temperature=TEMPERATURE)
    assert {s.temperature for s in segments} == {TEMPERATURE}
    assert sum(len(s.completions) for s in segments) == 4 and len(segments) == 1  # one shared prompt
    segments, _ = trainer._segments(groups, scores)  # no policy temperature given: each candidate's own
    assert sorted(s.temperature for s in segments) == sorted({0.3, TEMPERATURE})
