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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tao_core.checkpoint import PIPELINE_TENSORS
from tao_core.config import RunConfig, from_dict, validate
from tao_core.errors import PluginError, TaoInputError, TaoWriteError
from tao_core.fsio import fault_point, write_file
from tao_core.guards import Guard
from tao_core.models import LoadedModel, load_model
from tao_core.monitors import FlipMonitor, gate_groups, group_detail, group_majorities
from tao_core.plugins import get_component
from tao_core.promotion import decide
from tao_core.rundir import KEEP_CHECKPOINTS, RunDir, write_dir
from tao_core.sampler import sampler_for
from tao_core.scoring import ScorerLimits, load_scorer, score_groups
from tao_core.tasks import EvalResult, Task, evaluate
from tao_core.teacher import Teacher
from tao_core.train import Trainer
from tao_core.types import Prompt, SamplingParams

MAX_UNSCORED_STEPS = 3  # consecutive steps in which the scorer scored nothing before the run stops


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


def step_prompts(pool: list[Prompt], seed: int, step: int, k: int) -> list[Prompt]:
    """The ``k`` prompts of a step: epochs over ``pool`` in a seeded order, no repeats within one."""
    out: list[Prompt] = []
    pos = step * k
    while len(out) < k:
        epoch, offset = divmod(pos, len(pool))
        order = list(range(len(pool)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + (k - len(out))]
        out.extend(pool[i] for i in take)
        pos += len(take)
    return out


class Pipeline:
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
        self.dir = RunDir(cfg.output_dir)
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
        self.lm = lm or load_model(cfg.model, sampler=cfg.generate.sampler)
        if cfg.generate.sampler != "auto":  # a model passed in samples with the backend the config declares
            self.lm.sampler_backend = cfg.generate.sampler
        train_cfg = cfg.train
        if train_cfg.total_steps is None:
            train_cfg = dataclasses.replace(train_cfg, total_steps=cfg.rounds * cfg.steps_per_round)
        self.trainer = Trainer(self.lm, train_cfg, objective=self.objective)  # the config's, else the task's default
        self.generator = get_component("generators", cfg.generate.generator)(self.lm, **cfg.generate.options)
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
        tqdm.write(f"table {self.cfg.table.url}: " + ", ".join(f"{k} {v}" for k, v in self.table_counts.items()))
        return prepared.train

    def _teacher(self) -> Teacher | None:
        """The voters' weights apart from the policy (``generate.voters``), as the weight set
        ``teacher`` of the model's sampler; the generator routes its voter templates to it."""
        voters = self.cfg.generate.voters
        if voters == "policy":
            return None
        teacher = Teacher.frozen(self.lm) if voters == "frozen" else Teacher.ema(self.lm, self.cfg.generate.ema_rate)
        teacher.attach(sampler_for(self.lm))
        if "teacher" not in str(self.cfg.generate.options.get("template_weight_sets", {})):
            tqdm.write(f"warning: generate.voters = {voters!r} but no generator template samples with the "
                       "'teacher' weights (generate.options.template_weight_sets)")
        return teacher

    # -- pieces --------------------------------------------------------------------------------
    def sampling(self, step: int) -> SamplingParams:
        g = self.cfg.generate
        return SamplingParams(
            n=g.n, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
            max_new_tokens=self.task.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens, stop=list(g.stop),
            seed=self.cfg.seed * 1_000_003 + step,
        )

    def evaluate(self) -> EvalResult:
        return evaluate(self.task, sampler_for(self.lm), self.eval_examples)  # the generator's sampler, shared

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.lm.model.named_parameters() if p.requires_grad}

    def _restore_best(self, step: int) -> None:
        best = self.dir.load_best(step)
        with torch.no_grad():
            for n, p in self._trainable().items():
                p.copy_(best[n])

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> RunResult:
        """Run to the end (resuming from the newest valid checkpoint when ``resume``); releases the directory."""
        try:
            return self._run(resume)
        except TaoWriteError as e:
            raise TaoWriteError(e.errno, f"{e}; the run stopped, and what it wrote before is intact: free the "
                                f"space or fix the disk, then `tao run --resume {self.dir.root}`") from e
        finally:
            self.dir.release()

    def _start(self, resume: bool) -> tuple[int, dict, dict, float]:
        """(first step, the evaluation before tuning, the best so far, tuning seconds so far):
        from the newest valid checkpoint when resuming, else from a first evaluation at step 0."""
        cfg, rd = self.cfg, self.dir
        found = rd.load_checkpoint() if resume else None
        if found is not None:
            ckpt, trainer_state, state, fallbacks = found
            try:
                self.trainer.load_state_dict(trainer_state)
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
                tqdm.write(f"warning: {message}")
            return start, before, best, tuning_s
        if resume:
            tqdm.write(f"warning: {rd.root}: no checkpoint was written before the run stopped; starting again "
                       "from step 0 (finished generation and scoring on disk are reused)")
            rd.truncate_metrics_after(-1)
        write_file(rd.root / "config.json", json.dumps(cfg.to_dict(), indent=2))
        if self.table_counts is not None:
            rd.log({"type": "prompts", "step": 0, "source": "table", **self.table_counts})
        write_file(rd.root / "versions.json", json.dumps(_versions(), indent=2))
        fault_point("eval.before")
        result = self.evaluate()
        self._best_items = _items(result)
        before = {**result.to_dict(), "step": 0, "round": 0}
        rd.log({"type": "eval", "step": 0, "round": 0, **result.to_dict()})
        rd.save_best(self._trainable(), before)
        return 0, before, before, 0.0

    def _check_scored(self, record: dict[str, Any], step: int, failed_steps: int) -> int:
        """Warn about a step whose candidates were all unscored; stop the run after
        ``MAX_UNSCORED_STEPS`` such steps in a row. Returns the new count of those steps."""
        if record["scores_ok"] > 0:
            return 0
        all_errors = record["scores_abstain"] == 0  # abstaining is a verdict; errors are not
        failed_steps = failed_steps + 1 if all_errors else 0
        message = (f"step {step + 1}: scorer {self.scorer_name!r} scored none of the step's candidates "
                   f"({record['scores_error']} errors, {record['scores_abstain']} abstentions; first: "
                   f"{record.get('first_score_problem')!r}); the step trained on nothing")
        self.dir.log({"type": "warning", "step": step + 1, "kind": "no_scores", "message": message})
        tqdm.write(f"warning: {message}")
        if failed_steps >= MAX_UNSCORED_STEPS:
            raise PluginError(f"scorer {self.scorer_name!r} scored no candidate in {failed_steps} steps in a "
                              f"row (last: {record.get('first_score_problem')!r}); stopping. The checkpoints are "
                              f"kept and failed scores are not: fix the scorer, then `tao run --resume {self.dir.root}`")
        return failed_steps

    def _run(self, resume: bool) -> RunResult:
        cfg, rd = self.cfg, self.dir
        total_steps = cfg.rounds * cfg.steps_per_round
        start, before, best, tuning_s = self._start(resume)
        stopped, done, failed_steps = False, start, 0
        bar = tqdm(total=total_steps, initial=start, desc="tao run", disable=not self.progress, unit="step")
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
                tqdm.write(f"warning: {w['message']}")
                stopped = stopped or cfg.guard.stop_on_collapse
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
                rd.save_checkpoint(done, self.trainer.state_dict(), state)
                self._best_steps = [*self._best_steps, best["step"]][-KEEP_CHECKPOINTS:]
            if stopped:
                tqdm.write("stopping: a collapse guard fired (guard.stop_on_collapse); keeping the best weights")
                break
        bar.close()
        self._restore_best(best["step"])
        fault_point("final.before")

        def final(tmp: Path) -> None:
            self.trainer.save_pretrained(tmp)
            write_file(tmp / "tao_run.json", json.dumps({"best": best, "before": before}, indent=2))

        write_dir(rd.root / "final", final)
        fault_point("final.after")
        rd.log({"type": "final", "step": best["step"], "before": before["value"], "after": best["value"],
                "tuning_seconds": tuning_s})
        return RunResult(str(rd.root), before, best, done, tuning_s, self.guard.messages(), stopped)

    def _sample_and_score(self, step: int, prompts: list[Prompt], part: int = 0):
        """Candidates and scores of ``prompts`` for ``step`` (``part`` > 0: a dynamic-sampling round),
        read back from the run directory when a resumed run already made them; (groups, scores,
        generate seconds, score seconds)."""
        rd = self.dir
        t0 = time.perf_counter()
        groups = rd.load_candidates(step, prompts, part)
        if groups is None:
            fault_point("generate.before")
            groups = self.generator.generate(prompts, self.sampling(step))
            rd.save_step_prompts(step, prompts, part)
            rd.save_candidates(step, groups, part)
            fault_point("generate.after")
        t1 = time.perf_counter()
        scores = rd.load_scores(step, groups, part)
        if scores is None:
            cache = rd.root / "score-cache" if self.cfg.score.cache else None
            fault_point("score.before")
            scores = score_groups(self.scorer, prompts, groups, cache=cache, limits=self.limits)
            if any(s.status != "error" for g in scores for s in g):  # a resume rescores a step that only failed
                rd.save_scores(step, scores, part)
            fault_point("score.after")
        return groups, scores, t1 - t0, time.perf_counter() - t1

    def _resample(self, step: int, prompts: list[Prompt], groups: list, scores: list) -> dict[str, Any]:
        """Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476): replace each group whose ok
        scores are all equal (no advantage, nothing learned) by the group of a fresh prompt whose
        scores differ, over at most ``generate.max_resample`` extra rounds; in place. Fresh prompts
        come from the pool in a seeded order per (step, round), so a resumed run draws the same."""
        flat = [i for i, g in enumerate(scores) if not self._trains(groups[i], g)]
        used, replaced, drawn = {p.id for p in prompts}, 0, 0
        for part in range(1, self.cfg.generate.max_resample + 1):
            if not flat:
                break
            pool = step_prompts(self.pool, self.cfg.seed * 7919 + part, step, min(len(self.pool), 2 * len(flat)))
            extra = [p for p in dict((p.id, p) for p in pool).values() if p.id not in used][: len(flat)]
            if not extra:
                break
            new_groups, new_scores, _, _ = self._sample_and_score(step, extra, part)
            used |= {p.id for p in extra}
            drawn += len(extra)
            good = [(p, g, sc) for p, g, sc in zip(extra, new_groups, new_scores, strict=True) if self._trains(g, sc)]
            for i, (p, g, sc) in zip(flat, good, strict=False):
                prompts[i], groups[i], scores[i] = p, g, sc
                replaced += 1
            flat = flat[len(good):]
        return {"resampled_prompts": drawn, "replaced_groups": replaced, "uninformative_groups": len(flat)}

    def _trains(self, candidates: list, scores: list) -> bool:
        """Whether a group will teach anything: after the gate, its scores of the candidates the
        trainer uses (off-policy ones only with ``train.off_policy = "importance"``) differ."""
        gated = gate_groups([scores], self.cfg.score.gate)[0][0]
        used = [s for c, s in zip(candidates, gated, strict=True)
                if self.cfg.train.off_policy == "importance" or not c.metadata.get("off_policy")]
        return _informative(used)

    def _one_step(self, step: int, round_index: int) -> tuple[dict[str, Any], float]:
        prompts = step_prompts(self.pool, self.cfg.seed, step, self.cfg.prompts_per_step)
        t0 = time.perf_counter()
        groups, scores, gen_s, score_s = self._sample_and_score(step, prompts)
        dynamic = self._resample(step, prompts, groups, scores) if self.cfg.generate.dynamic_sampling else {}
        t1 = t0 + gen_s
        t2 = time.perf_counter()
        label_free = self._label_free_stats(prompts, scores)
        train_scores, gated = gate_groups(scores, self.cfg.score.gate)  # the raw scores stay on disk
        if self.cfg.score.gate is not None and gated["gate_no_margin"] == gated["gate_groups"] and not self._warned_gate:
            self._warned_gate = True
            tqdm.write(f"warning: score.gate is set but scorer {self.scorer_name!r} reports no voter margin "
                       "(Score.details['margin']): the gate keeps every group")
        fault_point("train.before")
        params = self.sampling(step)
        metrics = self.trainer.step(prompts, groups, train_scores, max_new_tokens=params.max_new_tokens,
                                    policy_temperature=params.temperature if params.temperature > 0 else None)
        if self.teacher is not None:
            self.teacher.update()  # EMA voters follow the policy slowly (frozen ones stay)
        fault_point("train.after")
        t3 = time.perf_counter()
        cands = [c for g in groups for c in g]
        flat = [s for g in scores for s in g]
        new_tokens = sum(len(c.token_ids) for c in cands)
        record = {
            **{f"trainer_{k}" if k == "step" else k: v for k, v in metrics.items()},
            "type": "step", "step": step + 1, "round": round_index,
            "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
            "completion_len_mean": new_tokens / max(1, len(cands)),
            "generate_tokens_per_s": new_tokens / max(1e-9, t1 - t0),
            "scores_ok": sum(s.status == "ok" for s in flat),
            "scores_abstain": sum(s.status == "abstain" for s in flat),
            "scores_error": sum(s.status == "error" for s in flat),
            **label_free, **(gated if self.cfg.score.gate is not None else {}), **dynamic,
        }
        problem = next((s.reason for s in flat if s.status != "ok" and s.reason), None)
        if problem is not None:
            record["first_score_problem"] = problem[:200]
        return record, t3 - t0

    def _label_free_stats(self, prompts: list[Prompt], scores) -> dict[str, Any]:
        """The voter monitors of a step whose scorer reports majorities (``Score.details``)."""
        majorities = group_majorities(scores)
        if all(m is None for m in majorities):
            return {}
        seen = self.flips.observe([p.id for p in prompts], majorities)
        margins = [m for g in scores if (m := group_detail(g, "margin")) is not None]
        return {"flip_rate": seen["flip_rate"], "revisited": seen["revisited"],  # flip_rate None: nothing revisited
                "voter_margin_mean": sum(margins) / len(margins) if margins else None}

    def _evaluate_and_promote(self, done: int, round_index: int, best: dict[str, Any],
                              end_of_round: bool) -> tuple[dict[str, Any], bool]:
        cfg, rd = self.cfg, self.dir
        fault_point("eval.before")
        result = self.evaluate()
        fault_point("eval.after")
        rec = {**result.to_dict(), "step": done, "round": round_index}
        rd.log({"type": "eval", **rec})
        tqdm.write(f"step {done}: held-out {result.metric} = {result.value:.3f} "
                   f"[{result.ci_low:.3f}, {result.ci_high:.3f}] (best {best['value']:.3f})")
        warnings = self.guard.observe_eval(rec, best)
        for w in warnings:
            rd.log({"type": "warning", "step": done, **w})
            tqdm.write(f"warning: {w['message']}")
        stop = bool(warnings) and cfg.guard.stop_on_collapse
        items = _items(result)
        if self._best_items is not None:  # the promotion gate: no task regresses, by a paired test
            decision = decide({result.task: self._best_items}, {result.task: items},
                              alpha=cfg.guard.promote_alpha, tolerance=cfg.guard.promote_tolerance)
            promoted, gate = decision.promoted, decision.to_dict()["tasks"][result.task]
        else:  # resumed from a checkpoint that kept no per-item results: compare the means
            promoted, gate = result.value >= best["value"] - cfg.guard.promote_tolerance, None
        if promoted and result.value >= best["value"]:
            best, self._best_items = rec, items
            rd.save_best(self._trainable(), best, keep_steps=set(self._best_steps))
            fault_point("best.after")
        if end_of_round:
            write_dir(rd.round_model_dir(round_index), self.trainer.save_pretrained)
            fault_point("round.after-model")
            rolled_back = not promoted and cfg.guard.rollback
            if rolled_back:
                self._restore_best(best["step"])
            if self.teacher is not None and (rolled_back or (best["step"] == done and cfg.generate.voters == "frozen")):
                self.teacher.refresh()  # voters take the best weights: after a rollback, or frozen ones a new best
            rd.log({"type": "round", "step": done, "round": round_index, "value": result.value,
                    "promoted": promoted, "rolled_back": (not promoted) and cfg.guard.rollback,
                    "best_value": best["value"], "best_step": best["step"],
                    **({} if gate is None else {"gate_p_worse": gate["p_worse"], "gate_wins": gate["wins"],
                                                "gate_losses": gate["losses"], "gate_method": gate["method"]})})
        return best, stop


def _informative(scores) -> bool:
    """Whether a group's ok scores differ (at least two ok scores, not all equal): it has an advantage."""
    values = {s.value for s in scores if s.status == "ok"}
    return sum(s.status == "ok" for s in scores) >= 2 and len(values) > 1


def _items(result: EvalResult) -> list[dict[str, Any]]:
    """The per-item results the promotion gate pairs: ``prompt_id`` and ``value`` of each example."""
    return [{"prompt_id": r["prompt_id"], "value": r["value"]} for r in result.per_example]


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
