"""Advantage estimators against hand-computed values; every recipe's loss on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from tao_plugins.advantages import baseline, group_mean, group_norm, leave_one_out
from transformers import LlamaConfig, LlamaForCausalLM

import tao_core
from tao_core.models import LoadedModel
from tao_core.train import TrainConfig, Trainer
from tao_core.types import Candidate, Prompt, Score
from tests.conftest import completion_logprobs

RECIPES = ["grpo", "dr_grpo", "dapo", "rloo", "ppo_clip_kl", "online_dpo", "best_of_n_sft"]
X = 100.0  # value under a False mask: must never reach a statistic

# group 0: ok [1, 0, 0] + one masked; group 1: all equal; group 2: a single ok score (skipped)
REWARDS = torch.tensor([[1.0, 0.0, 0.0, X], [2.0, 2.0, 2.0, 2.0], [5.0, X, X, X]])
MASK = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, False, False]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_group_norm_hand_computed():
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased, = sqrt(1/3)
    want = torch.tensor([[(2 / 3) / (std + 1e-4), -(1 / 3) / (std + 1e-4), -(1 / 3) / (std + 1e-4), 0], [0] * 4, [0] * 4])
    torch.testing.assert_close(group_norm(REWARDS, MASK), want)


def test_group_mean_hand_computed():
    want = torch.tensor([[2 / 3, -1 / 3, -1 / 3, 0], [0] * 4, [0] * 4])
    torch.testing.assert_close(group_mean(REWARDS, MASK), want)


def test_leave_one_out_hand_computed():
    # 1 - mean(0, 0) = 1;  0 - mean(1, 0) = -0.5
    want = torch.tensor([[1.0, -0.5, -0.5, 0], [0] * 4, [0] * 4])
    torch.testing.assert_close(leave_one_out(REWARDS, MASK), want)


def test_baseline_hand_computed():
    b = (1 + 0 + 0 + 2 * 4) / 7  # mean of the ok scores of the groups that are not skipped
    want = torch.tensor([[1 - b, -b, -b, 0], [2 - b] * 4, [0] * 4])
    torch.testing.assert_close(baseline(REWARDS, MASK), want)


def test_builtins_registered_through_the_entry_point():
    reg = tao_core.get_registry()
    assert set(RECIPES) <= set(reg.names("objectives"))
    assert {"group_norm", "group_mean", "leave_one_out", "baseline"} <= set(reg.names("advantages"))
    assert reg.entry("objectives", "grpo").plugin == "builtin-objectives"
    for name in RECIPES:
        assert reg.get("objectives", name).__class__.__name__ == "Objective"
        assert reg.get("objectives", name).loss.__doc__ and "arxiv.org" in reg.get("objectives", name).loss.__doc__


# -- recipes on a tiny model -------------------------------------------------------------------------

CONFIG = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
)


class _Tok:
    pad_token_id = 0


def tiny_lm(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(LlamaForCausalLM(CONFIG).eval(), _Tok(), "tiny", None)



def make_batch(lm: LoadedModel, temperature: float = 0.7, seed: int = 1):
    """3 prompts x 4 candidates; candidate 0 scores 1, the others 0; old log-probs from the model itself."""
    g = torch.Generator().manual_seed(seed)
    prompts, groups, scores = [], [], []
    for p in range(3):
        ids = torch.randint(1, 97, (4 + p,), generator=g).tolist()
        prompts.append(Prompt(id=str(p), text="q"))
        cands = []
        for j in range(4):
            toks = torch.randint(1, 97, (2 + j,), generator=g).tolist()
            lp = completion_logprobs(lm.model, ids, toks, temperature).tolist()
            cands.append(Candidate(str(p), j, "", ids, toks, lp, temperature=temperature))
        groups.append(cands)
        scores.append([Score.ok(1.0 if j == 0 else 0.0) for j in range(4)])
    return prompts, groups, scores


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_loss_finite_and_gradient_decreases_it(recipe):
    lm = tiny_lm()
    batch = make_batch(lm)
    trainer = Trainer(lm, TrainConfig(objective=recipe, lr=1e-3))
    first = trainer.step(*batch)
    second = trainer.step(*batch)  # same batch: its loss before the update reflects the first update
    assert math.isfinite(first["loss"]) and first["updated"] == 1.0
    assert first["grad_norm"] > 0
    assert second["loss"] < first["loss"], (first["loss"], second["loss"])


def test_online_dpo_prefers_best_over_worst():
    lm = tiny_lm()
    prompts, groups, scores = make_batch(lm)
    trainer = Trainer(lm, TrainConfig(objective="online_dpo", lr=1e-3))
    assert trainer.reference is not None  # full fine-tuning: a frozen copy

    def margin():  # best (index 0) minus worst (index 1, first on ties), policy over reference
        total = 0.0
        for grp in groups:
            c_w, c_l = grp[0], grp[1]
            lp = lambda m, c: float(completion_logprobs(m, c.prompt_token_ids, c.token_ids).sum())
            total += (lp(lm.model, c_w) - lp(trainer.reference, c_w)) - (lp(lm.model, c_l) - lp(trainer.reference, c_l))
        return total

    assert margin() == pytest.approx(0.0, abs=1e-5)
    for _ in range(4):
        metrics = trainer.step(prompts, groups, scores)
    assert margin() > 0.5
    assert metrics["dpo_accuracy"] == 1.0


def test_best_of_n_sft_trains_only_on_the_best():
    lm = tiny_lm()
    prompts, groups, scores = make_batch(lm)
    metrics = Trainer(lm, TrainConfig(objective="best_of_n_sft", lr=1e-3)).step(prompts, groups, scores)
    assert metrics["sequences"] == 3.0  # one best per group
    assert metrics["tokens"] == 3 * 2.0  # candidate 0 has 2 tokens in every group
