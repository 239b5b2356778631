"""Train a scalar reward model from preference pairs (Bradley-Terry), for the ``reward-model`` scorer.

A pairs file is JSONL, one preference per line::

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}

The reward model is the base causal LM's backbone with a scalar head on the last token
(``AutoModelForSequenceClassification`` with ``num_labels=1``, e.g. ``LlamaForSequenceClassification``
loaded from the causal-LM directory; the head starts from random weights). Each pair is scored as
``r = RM(chat_template(prompt + [assistant: response]))`` and the loss is Bradley-Terry's
(Bradley & Terry 1952; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1)::

    loss = -log sigmoid(r_chosen - r_rejected)

The training runs through :class:`tao_core.train.Trainer` (``Trainer.optimize`` with the loss above):
the same AdamW, learning-rate schedule, gradient clipping, precision context and micro-batch
accumulation as a TAO run's policy update.

A seeded held-out slice of the pairs measures pairwise accuracy (the share of pairs with
``r_chosen > r_rejected``) before training and after each epoch. The output is a plain Hugging Face
directory (config, safetensors, tokenizer) that ``AutoModelForSequenceClassification`` loads and the
``reward-model`` scorer reads, plus ``tao_rm.json`` (config and metrics) and ``metrics.jsonl``
(one line per logged step and per evaluation, written as training goes).

Sequences longer than ``max_length`` lose tokens from the left of the prompt; a pair whose response
alone does not fit is skipped and reported with its line number (never dropped silently).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tao_core.config import PRECISIONS, TrainConfig
from tao_core.errors import ModelLoadError, TaoInputError
from tao_core.fields import Rule, between, check_fields, one_of
from tao_core.fsio import append_line, write_file
from tao_core.records import read_records
from tao_core.rundir import LOCK, MARKER, RunDir

if TYPE_CHECKING:
    from tao_core.objectives import LossOutput
    from tao_core.train import Trainer

T = TypeVar("T")
EncodedPair = tuple[list[int], list[int]]  # (chosen token ids, rejected token ids)

RM_INFO_FILE = "tao_rm.json"
_MAX_LISTED_ERRORS = 20


@dataclass
class PreferencePair:
    """One preference: a chat prompt, the preferred and the dispreferred response."""

    messages: list[dict[str, str]]  # the prompt as chat turns, without the response
    chosen: str  # preferred assistant response
    rejected: str  # dispreferred assistant response
    line: int = 0  # line number in the pairs file (0 when built in Python)


@dataclass
class RMTrainConfig:
    """Reward-model training settings; the same names as the ``tao rm train`` flags."""

    epochs: int = 1  # passes over the training pairs
    lr: float = 1e-5  # AdamW learning rate (linear warmup over the first 10% of steps, then constant)
    batch_size: int = 8  # pairs per optimizer step (2 x batch_size sequences per forward pass)
    max_length: int = 1024  # tokens per sequence; longer prompts are cut from the left
    seed: int = 0  # seeds the head's initialization, the held-out split and the shuffling
    eval_fraction: float = 0.1  # share of pairs held out for pairwise accuracy (at least one pair)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    device: str = "cpu"  # torch device to train on
    log_every: int = 10  # optimizer steps between lines in metrics.jsonl
    precision: str = "auto"  # as train.precision: "auto" (bf16 autocast on a bf16-capable GPU, fp32 on the CPU),
    # "fp32" or "bf16"
    micro_batch_tokens: int | None = None  # padded tokens of one forward/backward (2 x pairs x longest sequence);
    # None: the whole batch in one

    def validate(self) -> None:
        """Every field's type, range and finiteness (the same checks as the run config's)."""
        problems = check_fields(self, RM_RULES)
        if problems:
            raise TaoInputError("invalid reward-model training settings: " + "; ".join(problems.values()))


RM_RULES: dict[str, Rule] = {
    "epochs": between(1, 10_000), "lr": between(0, 1, lo_open=True), "batch_size": between(1, 65_536),
    "max_length": between(8, 1 << 20), "seed": between(0, 2**32 - 1), "eval_fraction": between(0, 1, hi_open=True),
    "weight_decay": between(0, 10), "max_grad_norm": between(0), "device": Rule("a non-empty string", bool),
    "log_every": between(1), "precision": one_of(*PRECISIONS), "micro_batch_tokens": between(1),
}


@dataclass
class RMTrainResult:
    """What a training run produced: where the model is and how well it separates held-out pairs."""

    output: Path  # the Hugging Face directory written
    n_train: int  # training pairs used
    n_eval: int  # held-out pairs
    accuracy_before: float | None  # held-out pairwise accuracy of the untrained head (None without held-out pairs)
    accuracy: float | None  # held-out pairwise accuracy after the last epoch
    final_loss: float  # mean Bradley-Terry loss over the last epoch
    seconds: float  # wall time
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of pairs left out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise TaoInputError(f"'{key}' must be a string, got {got}")
    if not value.strip():
        raise TaoInputError(f"'{key}' is empty")
    return value


def pair_from_row(row: Any, line: int = 0) -> PreferencePair:
    """One JSONL row -> :class:`PreferencePair`; raises :class:`TaoInputError` saying what is wrong."""
    if not isinstance(row, dict):
        raise TaoInputError(f"expected a JSON object, got {type(row).__name__}")
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        raise TaoInputError("give exactly one of 'prompt' (text) or 'messages' (chat turns)")
    if has_prompt:
        messages = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise TaoInputError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TaoInputError(f"messages[{i}] needs string 'role' and 'content', got {m!r}")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise TaoInputError("'chosen' and 'rejected' are identical, so the pair carries no preference")
    return PreferencePair(messages=messages, chosen=chosen, rejected=rejected, line=line)


def load_pairs(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> tuple[list[PreferencePair], list[tuple[int, str]]]:
    """Read a pairs JSONL file; return ``(pairs, skipped)`` with skipped as ``(line, reason)``.

    Every bad row is found before anything is raised: without ``skip_bad_rows`` the error lists them
    all (the first 20) by line number; with it they are returned in ``skipped``.
    """
    records = read_records(path, on_error="skip")
    pairs: list[PreferencePair] = []
    for lineno, row in records:
        try:
            pairs.append(pair_from_row(row, lineno))
        except TaoInputError as e:
            records.reject(lineno, str(e))
    bad = records.skipped
    if bad and not skip_bad_rows:
        listed = "\n".join(f"  {path}:{line}: {why}" for line, why in bad[:_MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(bad) - _MAX_LISTED_ERRORS} more" if len(bad) > _MAX_LISTED_ERRORS else ""
        raise TaoInputError(
            f"{path}: {len(bad)} bad row(s); each needs 'prompt' or 'messages', plus 'chosen' and "
            f"'rejected' strings (pass skip_bad_rows / --skip-bad-rows to leave them out):\n{listed}{more}"
        )
    if not pairs:
        raise TaoInputError(f"{path}: no usable preference pairs")
    return pairs, bad


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_for_reward(
    tokenizer: Any, messages: list[dict[str, str]], response: str, max_length: int
) -> list[int] | None:
    """Token ids a reward model reads for ``response`` to the chat ``messages``.

    With a chat template: the template applied to ``messages + [assistant: response]``. Without one:
    the turns' contents joined by newlines, a newline, the response, then EOS. When the sequence is
    longer than ``max_length``, tokens are cut from the left of the prompt part; ``None`` when the
    response (with the template's closing tokens and at least one prompt token) does not fit.
    """
    if getattr(tokenizer, "chat_template", None):
        full = _template_ids(tokenizer, [*messages, {"role": "assistant", "content": response}], False)
        if len(full) <= max_length:
            return full
        head = _template_ids(tokenizer, messages, True)
        if full[: len(head)] != head:  # the template does not extend the prompt token for token
            return None
        prompt_ids, response_ids = head, full[len(head):]
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
        prompt_ids = [int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"]]
        response_ids = [int(t) for t in tokenizer(response, add_special_tokens=False)["input_ids"]]
        if tokenizer.eos_token_id is not None:
            response_ids.append(int(tokenizer.eos_token_id))
        if len(prompt_ids) + len(response_ids) <= max_length:
            return prompt_ids + response_ids
    keep = max_length - len(response_ids)
    if keep < 1:
        return None
    return prompt_ids[-keep:] + response_ids


def check_seq_cls_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a Hugging Face sequence-classification checkpoint with one label."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"reward model {p}: path does not exist; give a directory written by `tao rm train` "
                             f"or any Hugging Face sequence-classification checkpoint")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"reward model {p}: not a Hugging Face model directory (no config.json)")
    config = json.loads((p / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        hint = (" It is a causal LM: train a reward model from it with `tao rm train --base "
                f"{p} --pairs PAIRS.jsonl --output DIR`." if any(a.endswith("ForCausalLM") for a in archs) else "")
        raise ModelLoadError(
            f"reward model {p}: not a sequence-classification checkpoint (architectures {archs}).{hint}"
        )
    n_labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if n_labels != 1:
        raise ModelLoadError(
            f"reward model {p}: has {n_labels} labels; a scalar reward model needs num_labels=1"
        )
    return p


def _split(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split into (train, held-out); at least one held-out item when there are two or more."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if fraction == 0 or len(items) < 2 else max(1, round(len(items) * fraction))
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def _batch_tensors(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):  # right padding: positions stay 0..len-1 for every row
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def reward_forward(model: Any, seqs: list[list[int]], pad_id: int) -> Any:
    """Scalar rewards ``[len(seqs)]`` (float32) for token sequences, right-padded into one batch."""
    ids, mask = _batch_tensors(seqs, pad_id, next(model.parameters()).device)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def pairwise_accuracy(model: Any, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Share of ``(chosen_ids, rejected_ids)`` pairs the model scores chosen > rejected."""
    import torch

    if not encoded:
        return float("nan")
    wins = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            r = reward_forward(model, [c for c, _ in chunk] + [rj for _, rj in chunk], pad_id)
            wins += int((r[: len(chunk)] > r[len(chunk):]).sum())
    model.train(was_training)
    return wins / len(encoded)


def load_rm_backbone(base: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any, Path]:
    """A scalar-head sequence-classification model and tokenizer built from a causal LM (or an RM)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tao_core.models import resolve_model_path

    path = resolve_model_path(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialized" report is expected here
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: could not build a sequence-classification reward model from this checkpoint "
            f"({type(e).__name__}: {e}); the base must be a causal LM whose architecture has a "
            f"*ForSequenceClassification variant in transformers (Llama, Qwen2, Mistral, ...)"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.to(device)
    return model, tok, path


def train_reward_model(
    pairs: str | os.PathLike | list[PreferencePair],
    base: str | os.PathLike,
    output: str | os.PathLike,
    config: RMTrainConfig | None = None,
    *,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RMTrainResult:
    """Train a Bradley-Terry reward model on ``pairs`` starting from ``base``; write it to ``output``.

    ``pairs`` is a JSONL path (see the module docstring) or a list of :class:`PreferencePair`;
    ``base`` is anything :func:`tao_core.models.resolve_model_path` accepts (alias, GGUF, directory).
    The model is written to a temporary sibling directory and renamed into ``output`` at the end, so
    an interrupted run never leaves a half-written reward model.
    """

    cfg = config or RMTrainConfig()
    cfg.validate()
    start = time.time()
    out = Path(output).expanduser()
    if isinstance(pairs, list):
        rows, skipped = pairs, []
    else:
        rows, skipped = load_pairs(pairs, skip_bad_rows=skip_bad_rows)
    # The output is a run directory of kind "rm" (marker + lock, tao_core.rundir): a folder tao did
    # not make is refused, and only --overwrite empties an earlier reward model's directory.
    if out.exists() and out.is_dir() and any(p.name not in (LOCK, MARKER) for p in out.iterdir()) and not overwrite:
        raise TaoInputError(f"{out}: output exists and is not empty; choose another path or pass overwrite / --overwrite")
    rd = RunDir(out).claim("rm", replace=overwrite)
    try:
        return _train(rd, rows, skipped, base, cfg, start, progress)
    finally:
        rd.release()


def _train(rd: RunDir, rows: list[PreferencePair], skipped: list[tuple[int, str]], base: str | os.PathLike,
           cfg: RMTrainConfig, start: float, progress: bool) -> RMTrainResult:
    import torch

    from tao_core.models import LoadedModel
    from tao_core.train import Trainer

    out = rd.root
    torch.manual_seed(cfg.seed)
    model, tok, base_path = load_rm_backbone(base, cfg.device)
    encoded = encode_pairs(tok, rows, cfg.max_length, skipped)
    train_set, eval_set = _split(encoded, cfg.eval_fraction, cfg.seed)
    lm = LoadedModel(model=model, tokenizer=tok, name=str(base), path=base_path)
    trainer = Trainer(lm, trainer_config(cfg, len(train_set)), custom_loss=True)

    tmp = out / f".model.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        acc_before, acc, final_loss = _fit(trainer, train_set, eval_set, cfg, out / "metrics.jsonl", progress)
        trainer.save_pretrained(tmp)
        result = RMTrainResult(
            output=out, n_train=len(train_set), n_eval=len(eval_set), accuracy_before=acc_before,
            accuracy=acc, final_loss=final_loss, seconds=round(time.time() - start, 2), skipped=skipped,
        )
        info = {"base": str(base), "base_path": str(base_path), "config": dataclasses.asdict(cfg), **result.to_dict()}
        for f in tmp.iterdir():  # the model files move in; the info file, written last, marks it complete
            os.replace(f, out / f.name)
        write_file(out / RM_INFO_FILE, json.dumps(info, indent=2))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def encode_pairs(tokenizer: Any, rows: list[PreferencePair], max_length: int,
                 skipped: list[tuple[int, str]]) -> list[EncodedPair]:
    """Each pair's chosen and rejected sequences (:func:`encode_for_reward`); a pair that does not fit
    is appended to ``skipped`` with its line number. Raises when no pair fits."""
    encoded: list[EncodedPair] = []
    for p in rows:
        c = encode_for_reward(tokenizer, p.messages, p.chosen, max_length)
        r = encode_for_reward(tokenizer, p.messages, p.rejected, max_length)
        if c is None or r is None:
            skipped.append((p.line, f"a response does not fit in max_length={max_length} tokens"))
        else:
            encoded.append((c, r))
    if not encoded:
        raise TaoInputError(f"no pair fits in max_length={max_length} tokens; raise --max-length")
    return encoded


def trainer_config(cfg: RMTrainConfig, n_train: int) -> TrainConfig:
    """The :class:`~tao_core.train.Trainer` settings of a reward-model run on ``n_train`` pairs: AdamW
    (default betas and eps) at ``cfg.lr``, warmed up linearly over the first 10% of the steps (``W``
    steps: ``lr * k / W`` at step ``k``), then constant; ``cfg``'s clipping, weight decay and precision."""
    total = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    warmup = max(1, total // 10)
    return TrainConfig(lr=cfg.lr, lr_schedule="constant", warmup_steps=warmup - 1, total_steps=total,
                       weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, precision=cfg.precision,
                       seed=cfg.seed)


def _fit(trainer: Trainer, train_set: list[EncodedPair], eval_set: list[EncodedPair], cfg: RMTrainConfig,
         metrics_path: Path, progress: bool) -> tuple[float | None, float | None, float]:
    """Train ``cfg.epochs`` epochs in a seeded order, measuring held-out accuracy before and after each;
    returns (accuracy before, accuracy after, mean loss of the last epoch). Writes ``metrics_path`` as it goes."""
    from tqdm.auto import tqdm

    def record(**row: Any) -> None:
        append_line(metrics_path, json.dumps(row))

    model, pad_id = trainer.lm.model, int(trainer.lm.tokenizer.pad_token_id)
    acc_before = pairwise_accuracy(model, eval_set, pad_id, cfg.batch_size) if eval_set else None
    record(event="eval", epoch=0, accuracy=acc_before, n_eval=len(eval_set))
    rng = random.Random(cfg.seed + 1)
    acc, epoch_loss = acc_before, float("nan")
    bar = tqdm(total=trainer.cfg.total_steps, desc="rm train", disable=not progress)
    for epoch in range(1, cfg.epochs + 1):
        order = list(range(len(train_set)))
        rng.shuffle(order)
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            m = rm_step(trainer, [train_set[i] for i in order[s : s + cfg.batch_size]], pad_id, cfg.micro_batch_tokens)
            losses.append(m["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            if trainer.step_count % cfg.log_every == 0:
                record(event="train", epoch=epoch, step=trainer.step_count, loss=m["loss"], margin=m["margin"],
                       lr=m["lr"], grad_norm=m["grad_norm"])
        epoch_loss = sum(losses) / len(losses)
        acc = pairwise_accuracy(model, eval_set, pad_id, cfg.batch_size) if eval_set else None
        record(event="eval", epoch=epoch, step=trainer.step_count, accuracy=acc, train_loss=epoch_loss)
    bar.close()
    return acc_before, acc, epoch_loss


def rm_step(trainer: Trainer, pairs: list[EncodedPair], pad_id: int, micro_batch_tokens: int | None) -> dict[str, float]:
    """One optimizer update (:meth:`Trainer.optimize`) of the Bradley-Terry loss on a batch of pairs,
    micro-batched under ``micro_batch_tokens``, each micro-batch weighted by its pairs."""
    parts = pair_micro_batches(pairs, micro_batch_tokens)
    loss = functools.partial(bradley_terry_loss, trainer, pad_id)
    return trainer.optimize(parts, loss, [len(p) for p in parts], name="the reward model's Bradley-Terry loss")


def bradley_terry_loss(trainer: Trainer, pad_id: int, pairs: list[EncodedPair]) -> LossOutput:
    """``-mean log sigmoid(r_chosen - r_rejected)`` over ``pairs`` (Bradley-Terry; the module docstring),
    the rewards from one forward of the chosen then the rejected sequences under the trainer's precision."""
    import torch

    from tao_core.objectives import LossOutput

    with trainer.forward_context():
        r = reward_forward(trainer.lm.model, [c for c, _ in pairs] + [rj for _, rj in pairs], pad_id)
    margin = r[: len(pairs)] - r[len(pairs):]
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return LossOutput(loss, {"margin": float(margin.detach().mean())})


def pair_micro_batches(pairs: list[EncodedPair], budget: int | None) -> list[list[EncodedPair]]:
    """Consecutive pairs grouped so that each group's padded forward (2 x pairs x longest sequence) stays
    within ``budget`` tokens (a pair longer than that alone); ``None``: one group."""
    if budget is None:
        return [pairs]
    groups: list[list[EncodedPair]] = [[]]
    width = 0
    for pair in pairs:
        longest = max(len(pair[0]), len(pair[1]))
        if groups[-1] and 2 * (len(groups[-1]) + 1) * max(width, longest) > budget:
            groups.append([])
            width = 0
        groups[-1].append(pair)
        width = max(width, longest)
    return groups
