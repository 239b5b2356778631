"""Supervised fine-tuning (``tao sft``): the labeled baseline that TAO is compared against.

SFT trains the model on ``examples`` labeled training prompts: each prompt of the task with the
response a labeled dataset would hold (:meth:`tao_core.tasks.Task.reference`). By default it takes
as many prompts as the matching TAO config consumes (``rounds x steps_per_round x
prompts_per_step``, at most the pool) and the very same ones, in TAO's order. The loss is the mean
negative log-likelihood of the response's tokens plus the end-of-turn token, given the prompt under
the chat template, on completion tokens only (``tao_kernels.linear_logprob``). Each update is
:meth:`tao_core.train.Trainer.optimize` with that loss (AdamW, gradient accumulation under
``train.micro_batch_tokens``, clipping, ``train.precision``, ``train.lr``, ``train.lora``, the LR
schedule; the objective, KL and PPO settings of ``[train]`` do not apply), with
``prompts_per_step`` examples per optimizer step and each epoch in a fresh seeded order.

Evaluation is the pipeline's protocol (:mod:`tao_core.evaluation`: greedy decoding, the task's
prompt and answer check, ``eval_limit`` held-out examples; a ``mixture`` evaluates each task at its
own budget and reports each task and their mean, ``tasks`` in the eval and final lines) before
training and after each epoch; ``final/`` holds the weights after the last epoch. The run directory
mirrors ``tao run``'s: ``config.json`` (the run config with ``kind = "sft"`` and an ``sft`` table),
``versions.json``, ``metrics.jsonl`` (``step``, ``eval`` and ``final`` lines, with the pipeline's
keys where they mean the same thing) and ``final/``, a Hugging Face directory.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tao_kernels
import torch
from tqdm.auto import tqdm

from tao_core.batching import ModelInputs, Segment, TrainBatch, final_hidden, pack, plan_micro_batches
from tao_core.config import RunConfig, validate
from tao_core.errors import TaoInputError
from tao_core.evaluation import eval_record, evaluate_rows, summarize
from tao_core.fsio import write_file
from tao_core.models import LoadedModel, load_model
from tao_core.objectives import LossOutput
from tao_core.pipeline import _versions, step_prompts
from tao_core.plugins import get_component
from tao_core.rundir import RunDir, write_dir
from tao_core.sampler import sampler_for
from tao_core.tasks import Task
from tao_core.train import Trainer
from tao_core.types import Prompt

KIND = "sft"  # config.json "kind" of an SFT run directory (a TAO run's config has no "kind")


def nll_loss(trainer: Trainer, part: tuple[ModelInputs, TrainBatch]) -> LossOutput:
    """Supervised fine-tuning: ``L = -(1 / |T|) sum_{t in T} log pi(y_t | x, y_<t)`` over the tokens
    ``T`` of the labeled responses in micro-batch ``part`` (temperature 1), the standard next-token
    cross-entropy; the policy's forward runs under the trainer's precision."""
    inputs, batch = part
    model = trainer.lm.model
    weight = model.get_output_embeddings().weight
    with trainer.forward_context():
        hidden = final_hidden(model.get_decoder(), inputs)
    lp = tao_kernels.linear_logprob(hidden.to(weight.dtype), weight, batch.targets.to(weight.device))
    return LossOutput(-lp.mean(), {"nll": float(-lp.detach().mean())})


@dataclass
class LabeledExample:
    """A training prompt with its labeled response, tokenized as the model sees them."""

    prompt: Prompt
    response: str  # Task.reference(prompt)
    prompt_ids: list[int]  # the prompt under the chat template, generation prompt included
    target_ids: list[int]  # the response's tokens followed by the end-of-turn token


@dataclass
class SftResult:
    run_dir: str
    before: dict[str, Any]  # held-out metric of the starting model
    after: dict[str, Any]  # held-out metric after the last epoch (the model in final/)
    examples: int  # labeled examples trained on
    epochs: int
    steps: int  # optimizer steps
    tuning_seconds: float  # training steps only; evaluation and writing excluded
    evals: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, before and per epoch


def references(task: Task, prompts: list[Prompt]) -> list[str]:
    """``task.reference(prompt)`` for every prompt; a task or a prompt without a label is an error."""
    reference = getattr(task, "reference", None)
    if not callable(reference):
        raise TaoInputError(f"task {task.name!r} has no reference(prompt) method, so it has no labeled responses "
                            "for `tao sft`; implement Task.reference or use a labeled task (arithmetic, sql)")
    out = []
    for p in prompts:
        text = reference(p)
        if not isinstance(text, str):
            raise TaoInputError(f"task {task.name!r} has no labeled response for training prompt {p.id!r} "
                                f"(reference() returned {text!r}): `tao sft` needs a task with labels, e.g. "
                                "arithmetic or sql, and the task's own training prompts rather than a prompts_file")
        out.append(text)
    return out


def labeled_examples(task: Task, prompts: list[Prompt], lm: LoadedModel) -> list[LabeledExample]:
    """Pair each prompt with its reference, tokenized: the chat-templated prompt, the response + end token."""
    texts = references(task, prompts)
    tok = lm.tokenizer
    end = tok.eos_token_id if tok.eos_token_id is not None else next(iter(lm.eos_token_ids), None)
    if end is None:
        raise TaoInputError(f"model {lm.name!r} has no end-of-sequence token to end the labeled responses with")
    return [LabeledExample(p, text, lm.prompt_token_ids(p),
                           [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]] + [int(end)])
            for p, text in zip(prompts, texts, strict=True)]


def _segments(examples: list[LabeledExample]) -> list[Segment]:
    return [Segment(e.prompt_ids, [e.target_ids], [[0.0] * len(e.target_ids)], [1.0], [1.0], 1.0) for e in examples]


@torch.no_grad()
def mean_nll(lm: LoadedModel, examples: list[LabeledExample], micro_batch_tokens: int = 1024) -> float:
    """Mean negative log-likelihood per response token of ``examples`` under the current weights."""
    model = lm.model
    decoder, weight = model.get_decoder(), model.get_output_embeddings().weight
    pad = lm.tokenizer.pad_token_id or 0
    total, count = 0.0, 0
    for mb in plan_micro_batches(_segments(examples), micro_batch_tokens):
        inputs, batch = pack(mb, "shared_prefix", pad)
        hidden = final_hidden(decoder, inputs).to(weight.dtype)
        lp = tao_kernels.linear_logprob(hidden, weight, batch.targets.to(weight.device))
        total -= float(lp.sum())
        count += lp.numel()
    return total / max(1, count)


def default_examples(cfg: RunConfig, pool_size: int) -> int:
    """The number of distinct prompts the TAO run of ``cfg`` consumes."""
    return min(cfg.rounds * cfg.steps_per_round * cfg.prompts_per_step, pool_size)


def sft(cfg: RunConfig, *, examples: int | None = None, epochs: int = 1, eval_each_epoch: bool = True,
        progress: bool = True, lm: LoadedModel | None = None) -> SftResult:
    """Fine-tune on ``examples`` labeled training prompts of ``cfg.task`` for ``epochs`` epochs.

    ``examples=None`` takes the number of distinct prompts the TAO run of ``cfg`` consumes;
    ``eval_each_epoch=False`` evaluates only before training and after the last epoch.

    ``cfg`` is the TAO run config; its ``output_dir`` is the SFT run directory, which must be empty
    or absent. See the module docstring for what is trained, evaluated and written.
    """
    validate(cfg)
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise TaoInputError(f"examples must be an integer >= 1, got {examples!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise TaoInputError(f"epochs must be an integer >= 1, got {epochs!r}")
    task: Task = get_component("tasks", cfg.task)(**cfg.task_options)
    prompts = training_prompts(cfg, task, examples)
    references(task, prompts)  # a task without labels fails here, before the model loads
    rd = RunDir(cfg.output_dir).claim(KIND)
    try:
        return _train(cfg, task, prompts, epochs, eval_each_epoch, rd, lm, progress)
    finally:
        rd.release()


def training_prompts(cfg: RunConfig, task: Task, examples: int | None) -> list[Prompt]:
    """The first ``examples`` prompts of the TAO run's order (all it consumes when None)."""
    if cfg.prompts_file:
        from tao_core.data import load_prompts

        pool = load_prompts(cfg.prompts_file, column=cfg.prompt_column, task=cfg.task)
    else:
        pool = task.train_prompts()
    n = default_examples(cfg, len(pool)) if examples is None else examples
    if n > len(pool):
        raise TaoInputError(f"examples = {n}, but task {cfg.task!r} gives {len(pool)} training prompts; ask for at "
                            "most that many (or raise the task's n_train in task_options)")
    return step_prompts(pool, cfg.seed, 0, n)


def _train(cfg: RunConfig, task: Task, prompts: list[Prompt], epochs: int, eval_each_epoch: bool, rd: RunDir,
           lm: LoadedModel | None, progress: bool) -> SftResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    lm = lm or load_model(cfg.model, sampler=cfg.generate.sampler)
    data = labeled_examples(task, prompts, lm)
    trainer = Trainer(lm, cfg.train, custom_loss=True)  # the objective, KL and PPO settings do not apply
    held_out = _HeldOut(rd, task, sampler_for(lm), task.eval_examples(cfg.eval_limit), lm, data,
                        cfg.train.micro_batch_tokens)
    n, batch = len(data), cfg.prompts_per_step
    steps = -(-n // batch) * epochs
    _write_config(rd, cfg, n, epochs, steps)

    evals, tuning_s, step, seen = [held_out(0, 0, 0)], 0.0, 0, 0
    bar = tqdm(total=steps, desc="tao sft", disable=not progress, unit="step")
    for epoch in range(1, epochs + 1):
        for chunk in epoch_batches(data, batch, cfg.seed, epoch):
            record = sft_step(trainer, chunk)
            step, seen, tuning_s = step + 1, seen + len(chunk), tuning_s + record["train_s"]
            rd.log({**record, "type": "step", "step": step, "epoch": epoch, "examples_seen": seen})
            bar.update(1)
            bar.set_postfix(nll=f"{record['nll']:.4f}")
        if epoch == epochs or eval_each_epoch:
            evals.append(held_out(step, epoch, seen))
    bar.close()
    before, after = evals[0], evals[-1]

    def final(tmp: Path) -> None:
        trainer.save_pretrained(tmp)
        write_file(tmp / "tao_run.json", json.dumps({"kind": KIND, "before": before, "after": after}, indent=2))

    write_dir(rd.root / "final", final)
    per_task = {name: {"before": r["value"], "after": after["tasks"][name]["value"]}
                for name, r in before.get("tasks", {}).items() if name in after.get("tasks", {})}
    rd.log({"type": "final", "kind": KIND, "step": step, "before": before["value"], "after": after["value"],
            "tuning_seconds": tuning_s, "examples": n, "epochs": epochs, **({"tasks": per_task} if per_task else {})})
    return SftResult(str(rd.root), before, after, n, epochs, step, tuning_s, evals)


def _write_config(rd: RunDir, cfg: RunConfig, n: int, epochs: int, steps: int) -> None:
    config = {"kind": KIND, **cfg.to_dict(),
              "sft": {"examples": n, "epochs": epochs, "batch_size": cfg.prompts_per_step, "steps": steps,
                      "prompts": f"the first {n} prompts of the TAO run's order (seed {cfg.seed})"}}
    write_file(rd.root / "config.json", json.dumps(config, indent=2))
    write_file(rd.root / "versions.json", json.dumps(_versions(), indent=2))


@dataclass
class _HeldOut:
    """An evaluation (before training, after epochs): the held-out metric and the training NLL, logged and printed."""

    rd: RunDir
    task: Task
    sampler: Any  # the model's sampler (tao_core.sampler.sampler_for)
    examples: list  # the task's held-out examples
    lm: LoadedModel
    data: list[LabeledExample]  # the training examples, for the training NLL
    micro_batch_tokens: int

    def __call__(self, step: int, epoch: int, seen: int) -> dict[str, Any]:
        result = summarize(self.task, evaluate_rows(self.task, self.sampler, self.examples))
        rec = {**eval_record(self.task, result), "step": step, "epoch": epoch, "examples_seen": seen,
               "train_nll": mean_nll(self.lm, self.data, self.micro_batch_tokens)}
        self.rd.log({"type": "eval", **rec})
        each = "".join(f"; {name} {r['value']:.3f}" for name, r in rec.get("tasks", {}).items())
        tqdm.write(f"sft epoch {epoch}: held-out {result.metric} = {result.value:.3f} "
                   f"[{result.ci_low:.3f}, {result.ci_high:.3f}]{each}, train NLL {rec['train_nll']:.4f}")
        return rec


def epoch_batches(data: list[LabeledExample], batch: int, seed: int, epoch: int) -> Iterator[list[LabeledExample]]:
    """The examples in epoch ``epoch``'s seeded order, ``batch`` at a time."""
    order = list(range(len(data)))
    random.Random(f"tao-sft:{seed}:{epoch}").shuffle(order)
    for start in range(0, len(order), batch):
        yield [data[i] for i in order[start : start + batch]]


def sft_step(trainer: Trainer, chunk: list[LabeledExample]) -> dict[str, Any]:
    """One optimizer update (:meth:`Trainer.optimize`) on a batch of labeled examples, packed into
    micro-batches under ``train.micro_batch_tokens`` and weighted by their response tokens; returns
    the step's metrics, ``train_s`` its seconds."""
    t0 = time.perf_counter()
    cfg = trainer.cfg
    pad = trainer.lm.tokenizer.pad_token_id or 0
    packed = [pack(mb, cfg.layout, pad) for mb in plan_micro_batches(_segments(chunk), cfg.micro_batch_tokens)]
    metrics = trainer.optimize(packed, functools.partial(nll_loss, trainer), [b.n_tokens for _, b in packed],
                               name="SFT's NLL loss")
    elapsed = time.perf_counter() - t0
    tokens = float(sum(b.n_tokens for _, b in packed))
    return {"loss": metrics["loss"], "nll": metrics["nll"], "grad_norm": metrics["grad_norm"], "tokens": tokens,
            "row_tokens": float(sum(i.input_ids.numel() for i, _ in packed)), "micro_batches": float(len(packed)),
            "lr": metrics["lr"], "tokens_per_s": tokens / elapsed, "sequences": float(len(chunk)),
            "trainer_step": metrics["step"], "train_s": elapsed}
