"""Reward-model training (Bradley-Terry), the ``reward-model`` scorer and ``tao rm train``.

A tiny random-init Llama with a character-level tokenizer learns a synthetic preference: the chosen
response contains the keyword "great", the rejected one does not.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tao_plugins.reward_training import (
    PreferencePair,
    RMTrainConfig,
    encode_for_reward,
    load_pairs,
    train_reward_model,
)
from tao_plugins.rm_commands import rm_group
from tao_plugins.scorers.reward_model import SCORERS, RewardModelScorer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tao_core.errors import ModelLoadError, TaoInputError
from tao_core.types import Candidate, Prompt

KEYWORD = "great"
WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "table", "light", "music", "horse", "plant", "bread"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus chat special tokens; with a ChatML-like template."""
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random-init 2-layer causal Llama saved with its tokenizer: the backbone to train from."""
    path = tmp_path_factory.mktemp("tiny-base")
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def sentence(with_keyword: bool) -> str:
        words = rng.sample(WORDS, 3)
        if with_keyword:
            words.insert(rng.randrange(4), KEYWORD)
        return " ".join(words)

    rows = []
    for i in range(n):
        row = {"chosen": sentence(True), "rejected": sentence(False)}
        if i % 2:
            row["prompt"] = f"describe {rng.choice(WORDS)}"
        else:
            row["messages"] = [{"role": "system", "content": "be kind"}, {"role": "user", "content": rng.choice(WORDS)}]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """Train once on 160 synthetic pairs (32 held out); shared by the tests below."""
    root = tmp_path_factory.mktemp("rm")
    pairs = write_jsonl(root / "pairs.jsonl", synthetic_pairs(160, seed=1))
    cfg = RMTrainConfig(epochs=6, lr=3e-3, batch_size=16, max_length=128, seed=0, eval_fraction=0.2)
    result = train_reward_model(pairs, tiny_base, root / "rm", cfg, progress=False)
    return result


def test_training_learns_the_preference(trained):
    assert trained.n_train == 128 and trained.n_eval == 32
    assert trained.accuracy is not None and trained.accuracy >= 0.85, trained.to_dict()
    assert trained.accuracy > trained.accuracy_before
    assert trained.final_loss < 0.4


def test_output_loads_as_scalar_seq_cls_model(trained):
    out = trained.output
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 1
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id is not None
    info = json.loads((out / "tao_rm.json").read_text())
    assert info["accuracy"] == trained.accuracy and info["config"]["epochs"] == 6
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("eval") == 7 and "train" in events
    assert not any(p.name.startswith(".tmp-") for p in out.parent.iterdir())


def test_scorer_ranks_chosen_over_rejected(trained):
    scorer = RewardModelScorer(trained.output, batch_size=3, max_length=128)
    assert SCORERS["reward-model"] is RewardModelScorer
    rows = synthetic_pairs(20, seed=99)  # unseen pairs
    wins = 0
    for i, row in enumerate(rows):
        prompt = Prompt(id=str(i), text=row["prompt"]) if "prompt" in row else Prompt(id=str(i), messages=row["messages"])
        cands = [Candidate(prompt_id=str(i), index=j, text=t, prompt_token_ids=[], token_ids=[], logprobs=[])
                 for j, t in enumerate([row["rejected"], row["chosen"]])]
        scores = scorer.score(prompt, cands)
        assert [s.status for s in scores] == ["ok", "ok"]
        assert all(s.scorer == "reward-model" and s.version.startswith("1-") for s in scores)
        wins += scores[1].value > scores[0].value
    assert wins >= 17


def test_scorer_batches_match_single_sequences(trained):
    """Padding must not change a reward: batch_size 1 and 4 give the same values."""
    texts = ["great", "apple great river stone", "paper", "a much longer response about horses and bread"]
    messages = [{"role": "user", "content": "hello"}]
    one = RewardModelScorer(trained.output, batch_size=1).rewards(messages, texts)
    four = RewardModelScorer(trained.output, batch_size=4).rewards(messages, texts)
    assert one == pytest.approx(four, abs=1e-5)


def test_scorer_left_truncates_prompt_and_abstains_when_candidate_cannot_fit(trained):
    scorer = RewardModelScorer(trained.output, max_length=40)
    long_prompt = Prompt(id="p", text="x" * 200)
    cands = [Candidate(prompt_id="p", index=j, text=t, prompt_token_ids=[], token_ids=[], logprobs=[])
             for j, t in enumerate(["great apple", "y" * 60])]
    ok, too_long = scorer.score(long_prompt, cands)
    assert ok.status == "ok"
    assert too_long.status == "abstain" and "max_length=40" in too_long.reason


def test_encode_for_reward_cuts_prompt_from_the_left():
    tok = char_tokenizer()
    messages = [{"role": "user", "content": "abcdefghij" * 5}]
    full = encode_for_reward(tok, messages, "resp", 1000)
    cut = encode_for_reward(tok, messages, "resp", 30)
    assert len(cut) == 30 and full[-30:] == cut
    assert tok.decode(cut).endswith("resp<|im_end|>\n")
    assert encode_for_reward(tok, messages, "r" * 40, 30) is None


def test_scorer_errors_name_the_problem(tmp_path, tiny_base):
    with pytest.raises(ModelLoadError, match="does not exist"):
        RewardModelScorer(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="causal LM.*tao rm train"):
        RewardModelScorer(tiny_base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        RewardModelScorer(tmp_path / "empty")
    with pytest.raises(TaoInputError, match="needs option 'path'"):
        RewardModelScorer()


def test_multi_label_classifier_is_rejected(tmp_path, tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=3)
    model.save_pretrained(tmp_path / "cls3")
    with pytest.raises(ModelLoadError, match="3 labels.*num_labels=1"):
        RewardModelScorer(tmp_path / "cls3")


def test_bad_pairs_file_reports_every_bad_line(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        "{not json",
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": 3, "rejected": "b"},
        good,
    ])
    with pytest.raises(TaoInputError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert "6 bad row(s)" in msg
    reasons = dict(ln.rsplit("bad.jsonl:", 1)[1].split(": ", 1) for ln in msg.splitlines()[1:])
    assert sorted(reasons) == ["2", "3", "4", "5", "6", "7"]
    for line, why in [("2", "invalid JSON"), ("3", "'rejected' must be a string, got missing"),
                      ("4", "give exactly one of 'prompt'"), ("5", "identical"), ("6", "messages[0]"),
                      ("7", "'chosen' must be a string, got a int")]:
        assert why in reasons[line]
    assert "bad.jsonl:1:" not in msg and "bad.jsonl:8:" not in msg
    pairs, skipped = load_pairs(path, skip_bad_rows=True)
    assert [p.line for p in pairs] == [1, 8] and [line for line, _ in skipped] == [2, 3, 4, 5, 6, 7]
    assert pairs[0] == PreferencePair(messages=[{"role": "user", "content": "q"}], chosen="a", rejected="b", line=1)


def test_training_refuses_non_empty_output(tmp_path, tiny_base):
    pairs = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(4, seed=0))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TaoInputError, match="not empty"):
        train_reward_model(pairs, tiny_base, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_train(tmp_path, tiny_base):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12, seed=3) + [{"prompt": "q", "chosen": "a"}])
    out = tmp_path / "rm-cli"
    args = ["train", "--pairs", str(pairs), "--base", str(tiny_base), "--output", str(out), "--epochs", "1",
            "--lr", "1e-3", "--batch-size", "4", "--max-length", "96", "--seed", "1"]
    res = CliRunner().invoke(rm_group, args)
    assert res.exit_code != 0 and "pairs.jsonl:13: 'rejected' must be a string" in res.output
    assert not out.exists()

    res = CliRunner().invoke(rm_group, [*args, "--skip-bad-rows", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["n_train"] + result["n_eval"] == 12 and result["skipped"][0][0] == 13
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (out / "model.safetensors").is_file()

    res = CliRunner().invoke(rm_group, [*args, "--skip-bad-rows", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "held-out pairwise accuracy" in res.output and "skipped" in res.output


def test_registered_through_the_entry_point():
    from tao_core.plugins import PluginManager

    assert PluginManager().registry.get("scorers", "reward-model") is RewardModelScorer


def test_training_goes_through_the_trainer_schedule(trained):
    """Warm-up over the first 10% of the steps (lr * k / W at step k), then constant: the Trainer's
    schedule; every logged step carries the lr AdamW used and the gradient norm before clipping."""
    from tao_plugins.reward_training import trainer_config

    from tao_core.train import scheduled_lr

    cfg = RMTrainConfig(epochs=6, lr=3e-3, batch_size=16)
    tcfg = trainer_config(cfg, 128)  # 8 steps an epoch, 48 in all: W = 4
    assert tcfg.total_steps == 48 and tcfg.lr == 3e-3 and tcfg.max_grad_norm == cfg.max_grad_norm
    assert [scheduled_lr(tcfg.lr, k, tcfg) for k in range(1, 7)] == pytest.approx([3e-3 * min(1, k / 4) for k in
                                                                                    range(1, 7)])
    rows = [json.loads(line) for line in (trained.output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    assert all(r["lr"] == 3e-3 and r["grad_norm"] > 0 and r["loss"] > 0 for r in steps)


def test_micro_batches_give_the_update_of_one_batch(tiny_base):
    """The pairs split under micro_batch_tokens accumulate to the whole batch's loss and gradient."""
    from tao_plugins.reward_training import load_rm_backbone, pair_micro_batches, rm_step, trainer_config

    from tao_core.models import LoadedModel
    from tao_core.train import Trainer

    rows = synthetic_pairs(5, seed=4)
    tok = char_tokenizer()
    pairs = [(encode_for_reward(tok, m, r["chosen"], 128), encode_for_reward(tok, m, r["rejected"], 128))
             for r in rows for m in [[{"role": "user", "content": r.get("prompt", "hi")}]]]
    widths = [max(len(c), len(rj)) for c, rj in pairs]
    budget = 2 * 2 * max(widths)
    groups = pair_micro_batches(pairs, budget)
    assert len({len(g) for g in groups}) > 1 and [p for g in groups for p in g] == pairs  # unequal weights
    assert all(2 * len(g) * max(max(len(c), len(rj)) for c, rj in g) <= budget for g in groups)
    assert pair_micro_batches(pairs, None) == [pairs]

    results = []
    for tokens in (None, budget):
        torch.manual_seed(0)  # the same head for both
        model, tok, path = load_rm_backbone(tiny_base)
        cfg = RMTrainConfig(lr=1e-2, batch_size=5, micro_batch_tokens=tokens)
        trainer = Trainer(LoadedModel(model, tok, "rm", path), trainer_config(cfg, 5), custom_loss=True)
        metrics = rm_step(trainer, pairs, tok.pad_token_id, tokens)
        results.append((metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))  # kept after the step
    (one, g_one), (many, g_many) = results
    for key in ("loss", "margin", "grad_norm", "lr", "step"):
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    for n, g in g_one.items():
        torch.testing.assert_close(g_many[n], g, rtol=1e-4, atol=1e-6)


def test_every_setting_has_a_flag_with_the_same_default():
    import dataclasses

    from tao_plugins.rm_commands import rm_train

    flags = {p.name: p.default for p in rm_train.params}
    for f in dataclasses.fields(RMTrainConfig):
        assert f.name in flags, f"RMTrainConfig.{f.name} has no `tao rm train` flag"
        assert flags[f.name] == f.default, f.name
    with pytest.raises(TaoInputError, match="precision must be one of"):
        RMTrainConfig(precision="fp16").validate()
    with pytest.raises(TaoInputError, match="micro_batch_tokens must be >= 1"):
        RMTrainConfig(micro_batch_tokens=0).validate()


def test_cli_train_from_the_inference_table(tmp_path, tiny_base):
    """`tao rm train --from-table`: feedback logged beside served exchanges becomes the training pairs."""
    from tao_core.table import InferenceTable

    db = tmp_path / "inference.db"
    args = ["train", "--from-table", str(db), "--base", str(tiny_base), "--output", str(tmp_path / "rm"),
            "--epochs", "1", "--lr", "1e-3", "--batch-size", "4", "--max-length", "96", "--json"]
    with InferenceTable.open(db) as table:
        for i, row in enumerate(synthetic_pairs(8, seed=5)):
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            table.log({"request_id": f"r{i}", "request_json": {"messages": messages},
                       "response_json": {"choices": [{"index": 0, "message": {"role": "assistant", "content": row["rejected"]}},
                                                     {"index": 1, "message": {"role": "assistant", "content": row["chosen"]}}]}})
        assert table.flush(timeout=30)
        empty = CliRunner().invoke(rm_group, args)
        assert empty.exit_code != 0 and "makes no preference pair" in empty.output
        for i in range(8):
            table.log_feedback(f"r{i}", preferred_choice=1, source="test")
    res = CliRunner().invoke(rm_group, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_train"] + json.loads(res.stdout)["n_eval"] == 8
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    both = CliRunner().invoke(rm_group, [*args, "--pairs", str(tmp_path / "x.jsonl")])
    assert both.exit_code == 2 and "one of them" in both.output
