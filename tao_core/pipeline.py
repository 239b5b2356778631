"""The TAO pipeline: rounds of generate -> score -> train -> evaluate, resumable at any step.

Each optimizer step samples fresh candidates for ``prompts_per_step`` prompts from the current
policy (stage 1), scores them (stage 2), and takes one training step on them (stage 3). A round
ends with a held-out evaluation: the round is *promoted* when it does not regress, otherwise the
best weights are restored (a guard against label-free rewards that get gamed). Prompts logged
while serving can be fed back as ``prompts_file`` for the next run (stage 4).

Determinism: prompt order and sampling seeds derive from ``(seed, step)``; the trainer's state
carries every RNG. A resumed run therefore ends in the same weights as an uninterrupted one, bit
for bit on the CPU, and reuses any candidates and scores already on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tao_core.checkpoint import PIPELINE_TENSORS
from tao_core.config import RunConfig, from_dict, validate, weight_set_routes
from tao_core.distributed import Dist, DistributedError
from tao_core.errors import TaoInputError, TaoWriteError
from tao_core.evaluation import components, eval_record, evaluate_rows, gate_items, summarize
from tao_core.fsio import fault_point, write_file
from tao_core.guards import Guard
from tao_core.models import LoadedModel, load_model
from tao_core.monitors import FlipMonitor
from tao_core.pipeline_step import StepStages, step_prompts  # noqa: F401 (tao sft and tests import it here)
from tao_core.plugins import get_component
from tao_core.promotion import decide
from tao_core.rundir import KEEP_CHECKPOINTS, RunDir
from tao_core.sampler import HFSampler, sampler_for
from tao_core.scoring import ScorerLimits, load_scorer
from tao_core.tasks import EvalResult, Task
from tao_core.teacher import Teacher
from tao_core.train import Trainer
from tao_core.types import Prompt, SamplingParams


@dataclass
class RunResult:
    run_dir: str
    before: dict[str, Any]  # held-out metric of the starting model
    after: dict[str, Any]  # held-out metric of the promoted (final) model
    steps: int
    tuning_seconds: float  # generate + score + train, evaluation and checkpoints excluded
    warnings: list[str] = field(default_factory=list)
    stopped_early: bool = False


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("tao-core", "torch", "transformers", "triton", "peft", "numpy", "pluggy", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out



class Pipeline(StepStages):
    """Holds the model, task, generator, scorer and trainer of one run directory.

    Order of work: the config is validated, the task built and the prompts read; only then is
    the run directory claimed (marker + lock, see :class:`RunDir`) and the model loaded. A bad
    config or prompts file therefore fails in seconds and leaves no directory behind.
    """

    def __init__(self, cfg: RunConfig, *, lm: LoadedModel | None = None, progress: bool = True,
                 resume: bool = False) -> None:
        validate(cfg)
        self.cfg = cfg = copy.deepcopy(cfg)  # filled in below with what the run resolves, then saved
        self.progress = progress
        self.dist = Dist.from_env(cfg.distributed)  # one process, or this rank of torchrun's
        self.task: Task = get_component("tasks", cfg.task)(**cfg.task_options)
        self.table_counts: dict[str, int] | None = None
        if cfg.prompts_file:
            from tao_core.data import load_prompts

            self.pool = load_prompts(cfg.prompts_file, column=cfg.prompt_column, task=cfg.task)
        elif cfg.table.url:
            self.pool = self._table_pool()
        else:
            self.pool = self.task.train_prompts()
        if not self.pool:
            raise TaoInputError(f"task {cfg.task!r} gave no training prompts")
        self.eval_examples = self.task.eval_examples(cfg.eval_limit)
        self.objective_name = cfg.train.objective or getattr(self.task, "default_objective", None)
        if not isinstance(self.objective_name, str):
            raise TaoInputError(f"train.objective is not set and task {cfg.task!r} names no default_objective; "
                                "set train.objective (tao plugins lists the objectives)")
        self.objective = get_component("objectives", self.objective_name)
        self.scorer_name = cfg.score.scorer or self.task.default_scorer
        self.scorer = load_scorer(self.scorer_name, **cfg.score.options)
        # config.json records the plugins the task's defaults resolved to: a resume (or a plugin
        # upgrade in between) never picks different ones
        cfg.train.objective, cfg.score.scorer = self.objective_name, self.scorer_name
        cfg.generate.generator = cfg.generate.generator or self.task.default_generator
        self.dir = RunDir(cfg.output_dir, writes=self.dist.is_main)
        created = not self.dir.root.exists()
        self.dir.claim("run", resume=resume)
        try:
            self._build(lm)
        except BaseException:
            self.dir.release()
            if created:  # nothing of the run exists yet: leave no empty run directory behind
                self.dir.remove_unstarted()
            raise

    def _build(self, lm: LoadedModel | None) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        sharded = cfg.distributed.strategy == "fsdp" and self.dist.world_size > 1
        # under FSDP the model loads on the CPU: fully_shard moves each layer to the device as it shards it
        self.lm = lm or load_model(cfg.model, sampler=cfg.generate.sampler, device="cpu" if sharded else self.dist.device)
        if cfg.generate.sampler != "auto":  # a model passed in samples with the backend the config declares
            self.lm.sampler_backend = cfg.generate.sampler
        train_cfg = cfg.train
        if train_cfg.total_steps is None:
            train_cfg = dataclasses.replace(train_cfg, total_steps=cfg.rounds * cfg.steps_per_round)
        self.trainer = Trainer(self.lm, train_cfg, objective=self.objective, dist=self.dist,  # the config's, else the task's default
                               strategy=cfg.distributed.strategy)
        if self.trainer.sharding is not None:  # FSDP2: the engine samples from weights gathered per phase
            from tao_core.dist_fsdp import attach_engine

            attach_engine(self.lm, self.trainer.sharding)
        self.generator = get_component("generators", cfg.generate.generator)(self.lm, **cfg.generate.options)
        if self.dist.world_size > 1 and isinstance(sampler_for(self.lm), HFSampler):
            self._say("warning: the 'hf' sampler seeds one generator per call, so which prompts share a rank changes "
                      "the samples: this run will differ from a 1-process one (the engine sampler does not)")
        self.teacher = self._teacher()
        self.flips = FlipMonitor()  # share of revisited prompts whose voter majority changed
        self._warned_gate = False
        self.limits = ScorerLimits(timeout_s=cfg.score.timeout_s)
        self.guard = Guard(cfg.guard)
        self._best_steps: list[int] = []  # best steps the kept checkpoints refer to (their weights stay)
        self._best_items: list[dict[str, Any]] | None = None  # per-item results of the best model (the gate pairs them)

    def _table_pool(self) -> list[Prompt]:
        """The training prompts of the inference table (``[table]``, :mod:`tao_core.table_prompts`)."""
        from tao_core.table_prompts import from_table

        prepared = from_table(self.cfg.table)
        self.table_counts, self.held_out_prompts = {**prepared.counts, "train": len(prepared.train)}, prepared.held_out
        self._say(f"table {self.cfg.table.url}: " + ", ".join(f"{k} {v}" for k, v in self.table_counts.items()))
        return prepared.train

    def _teacher(self) -> Teacher | None:
        """The voters' weights apart from the policy (``generate.voters``), as the weight set
        ``teacher`` of the model's sampler; the generator routes its voter templates to it."""
        voters = self.cfg.generate.voters
        if voters == "policy":
            return None
        teacher = Teacher.frozen(self.lm) if voters == "frozen" else Teacher.ema(self.lm, self.cfg.generate.ema_rate)
        teacher.attach(sampler_for(self.lm))
        routes = weight_set_routes(self.cfg)
        if not any(isinstance(r, dict) and teacher.name in r.values() for r in routes.values()):
            self._say(f"warning: generate.voters = {voters!r} but no generator template samples with the "
                       f"{teacher.name!r} weights (none of {', '.join(routes)} names it)")
        return teacher

    # -- pieces --------------------------------------------------------------------------------
    def sampling(self, step: int) -> SamplingParams:
        g = self.cfg.generate
        return SamplingParams(
            n=g.n, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
            max_new_tokens=self.task.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens, stop=list(g.stop),
            seed=self.cfg.seed * 1_000_003 + step,
        )

    def _sample_and_score(self, step: int, prompts: list[Prompt], part: int = 0):
        with self.trainer.full_weights():  # gathered once for the phase under FSDP
            return super()._sample_and_score(step, prompts, part)

    def evaluate(self) -> EvalResult:
        with self.trainer.full_weights():
            return self._evaluate()

    def _evaluate(self) -> EvalResult:
        """The held-out evaluation with the generator's sampler (per task for a combined task,
        :mod:`tao_core.evaluation`); each rank greedy-decodes its shard."""
        if self.dist.world_size == 1:
            return summarize(self.task, evaluate_rows(self.task, sampler_for(self.lm), self.eval_examples))
        mine = self.dist.shard(len(self.eval_examples))
        local = evaluate_rows(self.task, sampler_for(self.lm), self.eval_examples[mine.start:mine.stop]) if mine else []
        return summarize(self.task, self.dist.gather("evaluation", local))  # the rows keep their task tag

    def _trainable(self) -> dict[str, torch.Tensor]:
        return self.trainer.full_trainable()  # gathered under FSDP: every rank calls it

    def _restore_best(self, step: int) -> None:
        best = self.dist.broadcast("best weights", self.dir.load_best(step) if self.dist.is_main else None)
        self.trainer.load_trainable(best)

    def _save_checkpoint(self, done: int, state: dict[str, Any]) -> None:
        if self.trainer.sharding is not None:  # every rank writes its shards (tao_core.dist_checkpoint)
            from tao_core.dist_checkpoint import save

            save(self.dir, done, self.trainer, state)
        elif self.dist.is_main:
            self.dir.save_checkpoint(done, self.trainer.state_dict(), state)

    def _load_trainer(self, trainer_state: Any) -> None:
        if self.trainer.sharding is None:
            self.trainer.load_state_dict(trainer_state)
        else:
            from tao_core.dist_checkpoint import load

            load(self.trainer, trainer_state)

    def _load_checkpoint(self) -> tuple | None:
        """The newest valid checkpoint, on every rank (under FSDP each rank then reads its own rows)."""
        if self.trainer.sharding is None:
            return self.dist.broadcast("checkpoint", self.dir.load_checkpoint() if self.dist.is_main else None)
        from tao_core.dist_checkpoint import read_lazy

        return self.dist.broadcast("checkpoint", self.dir.load_checkpoint(read=read_lazy) if self.dist.is_main else None)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> RunResult:
        """Run to the end (resuming from the newest valid checkpoint when ``resume``); releases the directory."""
        try:
            result = self._run(resume)
            self.dist.close()
            return result
        except DistributedError as e:
            last = self.dir.latest_checkpoint()  # not hashed: torchrun kills the ranks 30 s after its SIGTERM
            raise DistributedError(f"{e}. The run stopped on every rank; the last valid checkpoint is "
                                   f"{last or 'none (the run restarts from step 0)'}: continue with `torchrun "
                                   f"--nproc-per-node N -m tao_core.cli run --resume {self.dir.root}` (any N)") from None
        except TaoWriteError as e:
            raise TaoWriteError(e.errno, f"{e}; the run stopped, and what it wrote before is intact: free the "
                                f"space or fix the disk, then `tao run --resume {self.dir.root}`") from e
        finally:
            self.dir.release()

    def _start(self, resume: bool) -> tuple[int, dict, dict, float]:
        """(first step, the evaluation before tuning, the best so far, tuning seconds so far):
        from the newest valid checkpoint when resuming, else from a first evaluation at step 0."""
        cfg, rd = self.cfg, self.dir
        found = self._load_checkpoint() if resume else None
        if found is not None:
            ckpt, trainer_state, state, fallbacks = found
            try:
                self._load_trainer(trainer_state)
                self.guard.load_state_dict(state["guard"])
                start, before, best, tuning_s = state["step"], state["before"], state["best"], state["tuning_seconds"]
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise TaoInputError(f"{ckpt}: checkpoint does not fit this run ({type(e).__name__}: {e})") from None
            self._best_steps = [best["step"]]
            self._best_items = state.get("best_items")  # None in a checkpoint from before the paired gate
            if "flips" in state:
                self.flips.load_state_dict(state["flips"])
            if self.teacher is not None and PIPELINE_TENSORS in state:
                self.teacher.load_state_dict(state[PIPELINE_TENSORS])
            rd.truncate_metrics_after(start)
            for message in fallbacks:
                rd.log({"type": "warning", "step": start, "kind": "checkpoint_fallback", "message": message})
                self._say(f"warning: {message}")
            return start, before, best, tuning_s
        if resume:
            self._say(f"warning: {rd.root}: no checkpoint was written before the run stopped; starting again "
                       "from step 0 (finished generation and scoring on disk are reused)")
            rd.truncate_metrics_after(-1)
        rd.write_text("config.json", json.dumps(cfg.to_dict(), indent=2))
        if self.table_counts is not None:
            rd.log({"type": "prompts", "step": 0, "source": "table", **self.table_counts})
        rd.write_text("versions.json", json.dumps(_versions(), indent=2))
        fault_point("eval.before")
        result = self.evaluate()
        self._best_items = _items(result)
        before = {**eval_record(self.task, result), "step": 0, "round": 0}
        rd.log({"type": "eval", "step": 0, "round": 0, **eval_record(self.task, result)})
        rd.save_best(self._trainable(), before)
        return 0, before, before, 0.0

    def _run(self, resume: bool) -> RunResult:
        cfg, rd = self.cfg, self.dir
        total_steps = cfg.rounds * cfg.steps_per_round
        start, before, best, tuning_s = self._start(resume)
        stopped, done, failed_steps = False, start, 0
        bar = tqdm(total=total_steps, initial=start, desc="tao run", disable=not (self.progress and self.dist.is_main),
                   unit="step")
        for step in range(start, total_steps):
            round_index = step // cfg.steps_per_round + 1
            record, elapsed = self._one_step(step, round_index)
            tuning_s += elapsed
            rd.log(record)
            failed_steps = self._check_scored(record, step, failed_steps)
            bar.update(1)
            bar.set_postfix(reward=f"{record.get('reward_mean', float('nan')):.3f}", loss=f"{record.get('loss', 0):.4f}")
            for w in self.guard.observe_step(record):
                rd.log({"type": "warning", "step": step + 1, **w})
                self._say(f"warning: {w['message']}")
                stopped = stopped or cfg.guard.stop_on_collapse
            stopped = self.dist.broadcast("stop", stopped)  # rank 0's guard decides for every rank
            done = step + 1
            end_of_round = done % cfg.steps_per_round == 0
            if (cfg.guard.eval_every and done % cfg.guard.eval_every == 0) or end_of_round or stopped:
                best, stop_now = self._evaluate_and_promote(done, round_index, best, end_of_round)
                stopped = stopped or stop_now
            if done % cfg.checkpoint_every == 0 or end_of_round or stopped or done == total_steps:
                state = {"step": done, "before": before, "best": best, "tuning_seconds": tuning_s,
                         "guard": self.guard.state_dict(), "best_items": self._best_items,
                         "flips": self.flips.state_dict()}
                if self.teacher is not None:
                    state[PIPELINE_TENSORS] = self.teacher.state_dict()
                fault_point("checkpoint.before")
                self._save_checkpoint(done, state)
                self._best_steps = [*self._best_steps, best["step"]][-KEEP_CHECKPOINTS:]
            if stopped:
                self._say("stopping: a collapse guard fired (guard.stop_on_collapse); keeping the best weights")
                break
        bar.close()
        self._restore_best(best["step"])
        fault_point("final.before")

        whole = self.trainer.full_state_dict()  # under FSDP: gathered (every rank calls it), on rank 0

        def final(tmp: Path) -> None:
            self.trainer.save_pretrained(tmp, whole)
            write_file(tmp / "tao_run.json", json.dumps({"best": best, "before": before}, indent=2))

        rd.write_dir(rd.root / "final", final)
        fault_point("final.after")
        per_task = {name: {"before": r["value"], "after": best["tasks"][name]["value"]}
                    for name, r in before.get("tasks", {}).items() if name in best.get("tasks", {})}
        rd.log({"type": "final", "step": best["step"], "before": before["value"], "after": best["value"],
                "tuning_seconds": tuning_s, **({"tasks": per_task} if per_task else {})})
        return RunResult(str(rd.root), before, best, done, tuning_s, self.guard.messages(), stopped)

    def _evaluate_and_promote(self, done: int, round_index: int, best: dict[str, Any],
                              end_of_round: bool) -> tuple[dict[str, Any], bool]:
        cfg, rd = self.cfg, self.dir
        fault_point("eval.before")
        result = self.evaluate()
        fault_point("eval.after")
        rec = {**eval_record(self.task, result), "step": done, "round": round_index}
        rd.log({"type": "eval", **rec})
        each = "".join(f"; {name} {r['value']:.3f}" for name, r in rec.get("tasks", {}).items())
        self._say(f"step {done}: held-out {result.metric} = {result.value:.3f} "
                   f"[{result.ci_low:.3f}, {result.ci_high:.3f}] (best {best['value']:.3f}){each}")
        warnings = self.guard.observe_eval(rec, best)
        for w in warnings:
            rd.log({"type": "warning", "step": done, **w})
            self._say(f"warning: {w['message']}")
        stop = bool(warnings) and cfg.guard.stop_on_collapse
        items = _items(result)
        if self._best_items is not None:  # the promotion gate: no task regresses, by a paired test per task
            decision = decide(gate_items(self.task, self._best_items), gate_items(self.task, items),
                              alpha=cfg.guard.promote_alpha, tolerance=cfg.guard.promote_tolerance)
            promoted, gate = decision.promoted, _gate_fields(decision.to_dict(), combined=bool(components(self.task)))
        else:  # resumed from a checkpoint that kept no per-item results: compare the means
            promoted, gate = result.value >= best["value"] - cfg.guard.promote_tolerance, None
        promoted, gate, stop = self.dist.broadcast("promotion", (promoted, gate, stop))  # rank 0's decision
        if promoted and result.value >= best["value"]:
            best, self._best_items = rec, items
            rd.save_best(self._trainable(), best, keep_steps=set(self._best_steps))
            fault_point("best.after")
        if end_of_round:
            whole = self.trainer.full_state_dict()  # under FSDP: gathered, on rank 0
            rd.write_dir(rd.round_model_dir(round_index), lambda tmp: self.trainer.save_pretrained(tmp, whole))
            fault_point("round.after-model")
            rolled_back = not promoted and cfg.guard.rollback
            if rolled_back:
                self._restore_best(best["step"])
            if self.teacher is not None and (rolled_back or (best["step"] == done and cfg.generate.voters == "frozen")):
                self.teacher.refresh()  # voters take the best weights: after a rollback, or frozen ones a new best
            rd.log({"type": "round", "step": done, "round": round_index, "value": result.value,
                    "promoted": promoted, "rolled_back": (not promoted) and cfg.guard.rollback,
                    "best_value": best["value"], "best_step": best["step"], **(gate or {})})
        return best, stop


def _items(result: EvalResult) -> list[dict[str, Any]]:
    """The per-item results the promotion gate pairs: ``prompt_id``, ``value`` and ``task`` of each example (a row
    without a task tag is the result's task's, as in :func:`tao_core.evaluation.per_task`)."""
    return [{"prompt_id": r["prompt_id"], "value": r["value"], "task": r.get("task", result.task)}
            for r in result.per_example]


def _gate_fields(decision: dict[str, Any], *, combined: bool) -> dict[str, Any]:
    """The round line's gate fields: one task's test flat, every task's (and the reason) for a combined task."""
    keys = ("p_worse", "wins", "losses", "method")
    if not combined:
        (test,) = decision["tasks"].values()
        return {f"gate_{k}": test[k] for k in keys}
    return {"gate_reason": decision["reason"],
            "gate_tasks": {name: {k: test[k] for k in (*keys, "old_mean", "new_mean", "regressed")}
                           for name, test in decision["tasks"].items()}}


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True, lm: LoadedModel | None = None) -> RunResult:
    """Run (or resume) the TAO pipeline described by ``cfg``; see :class:`Pipeline`."""
    return Pipeline(cfg, lm=lm, progress=progress, resume=resume).run(resume=resume)


def resume(run_dir: str, *, progress: bool = True) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint with its saved config."""
    path = RunDir(run_dir).root / "config.json"
    if not path.exists():
        raise TaoInputError(f"{run_dir}: not a tao run directory (no config.json); nothing to resume")
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TaoInputError(f"{path}: unreadable saved config ({e})") from None
    try:
        cfg = from_dict(RunConfig, saved)
        cfg.output_dir = run_dir
        validate(cfg, where=str(path))
    except TaoInputError as e:
        raise TaoInputError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return run(cfg, resume=True, progress=progress)
