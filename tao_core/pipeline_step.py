"""One optimizer step of the pipeline: the step's prompts, candidates and scores (read back from the
run directory when a resumed run already made them), dynamic sampling, the training step and the
step's record for ``metrics.jsonl``.

:class:`StepStages` is the part of :class:`tao_core.pipeline.Pipeline` that runs inside one step; the
pipeline owns the loop, checkpoints, evaluation and promotion around it.
"""

from __future__ import annotations

import random
import time
from typing import Any

from tqdm.auto import tqdm

from tao_core.errors import PluginError
from tao_core.fsio import fault_point
from tao_core.monitors import gate_groups, group_detail, group_majorities
from tao_core.scoring import score_groups
from tao_core.types import Prompt

MAX_UNSCORED_STEPS = 3  # consecutive steps in which the scorer scored nothing before the run stops


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


class StepStages:
    """The stages of one step; mixed into :class:`~tao_core.pipeline.Pipeline`, whose attributes they use."""

    def _say(self, message: str) -> None:
        """A line for the person watching: rank 0's alone under several ranks."""
        if self.dist.is_main:
            tqdm.write(message)

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
        self._say(f"warning: {message}")
        if failed_steps >= MAX_UNSCORED_STEPS:
            raise PluginError(f"scorer {self.scorer_name!r} scored no candidate in {failed_steps} steps in a "
                              f"row (last: {record.get('first_score_problem')!r}); stopping. The checkpoints are "
                              f"kept and failed scores are not: fix the scorer, then `tao run --resume {self.dir.root}`")
        return failed_steps


    def _sample_and_score(self, step: int, prompts: list[Prompt], part: int = 0):
        """Candidates and scores of ``prompts`` for ``step`` (``part`` > 0: a dynamic-sampling round),
        read back from the run directory when a resumed run already made them; (groups, scores,
        generate seconds, score seconds)."""
        rd, d = self.dir, self.dist
        mine = d.shard(len(prompts))  # this rank's prompts (all of them in one process)
        t0 = time.perf_counter()
        groups = d.broadcast("stored candidates", rd.load_candidates(step, prompts, part) if d.is_main else None)
        if groups is None:
            fault_point("generate.before")
            groups = d.gather("candidates", self.generator.generate(prompts[mine.start:mine.stop], self.sampling(step)))
            rd.save_step_prompts(step, prompts, part)
            rd.save_candidates(step, groups, part)
            fault_point("generate.after")
        t1 = time.perf_counter()
        scores = d.broadcast("stored scores", rd.load_scores(step, groups, part) if d.is_main else None)
        if scores is None:
            cache = rd.root / "score-cache" if self.cfg.score.cache and d.is_main else None
            fault_point("score.before")
            scores = d.gather("scores", score_groups(self.scorer, prompts[mine.start:mine.stop], groups[mine.start:mine.stop],
                                                     cache=cache, limits=self.limits))
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
            self._say(f"warning: score.gate is set but no group of step {step} has a voter margin (Score.details"
                       f"['margin'], scorer {self.scorer_name!r}): the gate keeps groups without one (said once)")
        fault_point("train.before")
        params = self.sampling(step)
        metrics = self.trainer.step(prompts, groups, train_scores, max_new_tokens=params.max_new_tokens,
                                    policy_temperature=params.temperature if params.temperature > 0 else None,
                                    local=self.dist.shard(len(prompts)))
        if self.teacher is not None:
            self.teacher.update()  # EMA voters follow the policy slowly (frozen ones stay)
        fault_point("train.after")
        t3 = time.perf_counter()
        cands = [c for g in groups for c in g]
        flat = [s for g in scores for s in g]
        new_tokens = sum(len(c.token_ids) for c in cands)
        record = {
            **{f"trainer_{k}" if k == "step" else k: v for k, v in metrics.items()},
            "type": "step", "step": step + 1, "round": round_index, "world_size": self.dist.world_size,
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


def _informative(scores) -> bool:
    """Whether a group's ok scores differ (at least two ok scores, not all equal): it has an advantage."""
    values = {s.value for s in scores if s.status == "ok"}
    return sum(s.status == "ok" for s in scores) >= 2 and len(values) > 1
