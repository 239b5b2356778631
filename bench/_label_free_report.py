"""The results file of bench/label_free.py and what the driver prints from it: the plan, the CSV rows, the summary.

``OUT/results.jsonl`` holds one JSON line per finished unit (variant, seed, step); a torn last line (a
driver killed while writing it) is ignored and that unit done again. ``setup`` is bench/label_free.py's ``Setup``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path
from typing import Any

import _label_free_runs as runs
import _label_free_studies as studies

COLUMNS = ("variant", "seed", "step", "metric", "n", "ci_lo", "ci_hi", "promoted_rounds", "rounds", "seconds",
           "cpu", "threads", "len_first", "len_last", "warnings")
ALL_PROBLEMS = 100  # the budget's count for "every held-out problem" (the SQL task has 86)
EVAL_SECONDS_PER_PROBLEM = 0.4  # assumed until measured: the demo's 128-problem evaluations took 33-74 s on 2 threads



def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def unit_key(variant: str, seed: int | None, step: int) -> str:
    return f"{variant}/{'-' if seed is None else seed}/{step}"


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    return read_results_file(out / "results.jsonl")


def read_results_file(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line: that unit is redone
            done[unit_key(row["variant"], row["seed"], row["step"])] = row
    return done


def merge_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """The units of several results files (drivers run side by side on their own --out, one seed each). A unit
    in two files must have the same figure (the starting model, measured by each driver): else it is an error."""
    merged: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise runs.DriverError(f"--results {path}: no such file (give a results.jsonl that bench/label_free.py wrote)")
        for key, row in read_results_file(path).items():
            if key in merged and merged[key]["metric"] != row["metric"]:
                raise runs.DriverError(f"unit {key} is {merged[key]['metric']} in {where[key]} but {row['metric']} in {path}: "
                                       "were they measured with other settings? merge only files of the same study and settings")
            merged[key], where[key] = row, path
    return merged


def append_result(out: Path, row: dict[str, Any]) -> None:
    path = out / "results.jsonl"
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- plan and report ----------------------------------------------------------------------------------
def seconds_per_step(setup: Any, variant: studies.Variant) -> tuple[float, str]:
    if setup.args.seconds_per_step:
        return setup.args.seconds_per_step, "given (--seconds-per-step)"
    measured = []
    for seed in setup.seeds:
        for r in runs.read_metrics(setup.run_dir(variant.name, seed)):
            if r.get("type") == "step":
                measured.append(r.get("generate_s", 0) + r.get("score_s", 0) + r.get("train_s", 0))
    if measured:
        return statistics.fmean(measured), f"measured in {setup.out / 'runs'} ({len(measured)} steps)"
    return variant.seconds_per_step, variant.source


def run_eval_points(setup: Any, variant: str, after: int) -> int:
    """Held-out problems the run evaluates itself after step ``after``: at every round's end and every
    guard.eval_every steps (``eval_limit`` problems each), and once before tuning."""
    data, last = setup.data[variant], max(setup.steps)
    every = studies.get_dotted(data, "guard.eval_every", 0) or 0
    points = {s for s in range(after + 1, last + 1) if s % setup.spr[variant] == 0 or (every and s % every == 0)}
    return (len(points) + (after == 0)) * (data.get("eval_limit", 128) or ALL_PROBLEMS)


def plan(setup: Any) -> str:
    done = read_results(setup.out)
    lines = [f"# study {setup.study.name}: {setup.study.about}", f"# state directory {setup.out}; model {setup.model}; "
             f"evaluation: {setup.eval_count or 'all'} held-out problems ({setup.study.evaluation})", "variant,seed,step,status"]
    train_s = evals = run_problems = 0.0
    for v in setup.variants:
        per_step, source = seconds_per_step(setup, v)
        lines.append(f"# {v.name}: {v.about}")
        for seed in setup.seeds:
            pending = [s for s in setup.steps if unit_key(v.name, seed, s) not in done]
            run_dir = setup.run_dir(v.name, seed)
            left = 0 if runs.finished(run_dir) or not pending else max(setup.steps) - runs.last_step(run_dir)
            train_s += left * per_step
            if left:
                run_problems += run_eval_points(setup, v.name, runs.last_step(run_dir))
            evals += len(pending)
            for s in setup.steps:
                status = "done" if s not in pending else f"to run ({left} training steps left in its run)"
                lines.append(f"{v.name},{seed},{s},{status}")
        lines.append(f"# {v.name}: {per_step:.1f} s per step, {source}")
    start_done = unit_key("start", None, 0) in done
    evals += 0 if start_done else 1
    lines.insert(3, f"start,-,0,{'done' if start_done else 'to run'}")
    measured = [r["eval_seconds"] / max(1, r["n"]) for r in done.values() if r.get("eval_seconds")]
    per_problem = statistics.fmean(measured) if measured else EVAL_SECONDS_PER_PROBLEM
    eval_s = (evals * (setup.eval_count or ALL_PROBLEMS) + run_problems) * per_problem
    threads = setup.args.threads or os.cpu_count() or 1
    wall_h = (train_s + eval_s) / 3600
    for c in studies.components_off() if setup.study.name == "ablation" else []:
        lines.append(f"# no variant no-{c.name}: {studies.TEACHER.name} does not switch it on ({', '.join(c.keys)})")
    lines += [f"# budget: {train_s / 3600:.2f} h of tuning + {evals:.0f} evaluations x {setup.eval_count or 'all'} problems "
              f"and {run_problems:.0f} problems of the runs' own evaluations at {per_problem:.2f} s "
              f"({'measured' if measured else 'assumed'}): {eval_s / 3600:.2f} h = {wall_h:.2f} wall-clock hours on "
              f"{threads} threads = {wall_h * threads:.2f} CPU hours ({cpu_name()}); model loading not counted"]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        warnings = ";".join(f"{k}:{n}" for k, n in (r.get("warnings") or {}).items())
        values = {**r, "seed": "-" if r["seed"] is None else r["seed"], "warnings": warnings}
        writer.writerow([_fmt(values.get(c)) for c in COLUMNS])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def summary(setup: Any, rows: list[dict[str, Any]]) -> str:
    start = next((r["metric"] for r in rows if r["variant"] == "start"), None)
    ref = setup.study.reference
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["variant"] != "start":
            groups.setdefault((r["variant"], r["step"]), []).append(r)
    means = {k: statistics.fmean(r["metric"] for r in g) for k, g in groups.items()}
    head = "| variant | step | seeds | mean ± sd | gain over the start | rounds promoted | warnings | tuning min (mean) |"
    metric = next((r["metric_name"] for r in rows if r.get("metric_name")), "the metric")
    lines = [f"{setup.study.about} ({metric}); the starting model: " + ("not measured yet" if start is None else f"{start:.3f}"),
             f"on {', '.join(sorted({r.get('cpu') or 'unknown CPU' for r in rows})) or cpu_name()}, "
             f"threads {sorted({r['threads'] for r in rows})}", "",
             head + (f" vs {ref} |" if ref else ""), "|---" * (head.count("|") - 1 + bool(ref)) + "|"]
    for (variant, step), g in groups.items():
        values = [r["metric"] for r in g]
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        gain = "-" if start is None else f"{means[(variant, step)] - start:+.3f}"
        promoted = f"{sum(r.get('promoted_rounds', 0) for r in g)}/{sum(r.get('rounds', 0) for r in g)}"
        warnings: dict[str, int] = {}
        for r in g:
            for kind, n in (r.get("warnings") or {}).items():
                warnings[kind] = warnings.get(kind, 0) + n
        line = (f"| {variant} | {step} | {len(g)} | {means[(variant, step)]:.3f}{sd} | {gain} | {promoted} | "
                f"{', '.join(f'{k} {n}' for k, n in sorted(warnings.items())) or 'none'} | "
                f"{statistics.fmean(r.get('seconds', 0) for r in g) / 60:.1f} |")
        if ref:
            other = means.get((ref, step))
            line += " - |" if other is None else f" {means[(variant, step)] - other:+.3f} |"
        lines.append(line)
    if setup.study.paired:
        lines += ["", *paired_lines(rows)]
    if setup.study.name == "sql":
        lines += ["", "completion length (tokens, mean over seeds) by step:"]
        for (variant, step), g in groups.items():
            if step == max(setup.steps):
                by_step: dict[int, list[float]] = {}
                for r in g:
                    for s, length in r.get("length_curve") or []:
                        by_step.setdefault(s, []).append(length)
                lines.append(f"{variant}: " + ", ".join(f"{s}: {statistics.fmean(v):.1f}" for s, v in sorted(by_step.items())))
    return "\n".join(lines) + "\n"


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each task's gain over the starting model, unit by unit, with the one-sided paired test that the unit's
    weights are better on the same held-out items: the promotion gate's own pairing and test
    (``tao_core.promotion.decide``, exact McNemar for 0/1), asked whether the start is worse than the unit."""
    from tao_core.errors import TaoInputError
    from tao_core.promotion import decide

    start = next((r for r in rows if r["variant"] == "start"), None)
    if start is None or not start.get("items"):
        return ["per-task paired tests: the starting model's per-item results are not measured yet"]
    lines = ["per task against the starting model (paired on the same items; p: one-sided, the gain being chance):", "",
             "| variant | seed | step | task | n | start | after | gain (points) | wins / losses | p |", "|---" * 10 + "|"]
    for r in rows:
        if r["variant"] == "start" or not r.get("items"):
            continue
        try:
            verdicts = decide(r["items"], start["items"]).verdicts  # "old" is the unit: p_worse is P(start worse)
        except TaoInputError as e:
            lines.append(f"| {r['variant']} | {r['seed']} | {r['step']} | not paired: {e} | | | | | | |")
            continue
        gains = []
        for v in verdicts:
            gain = 100 * -v.test.diff + 0.0  # no "-0.0"
            gains.append(gain)
            lines.append(f"| {r['variant']} | {r['seed']} | {r['step']} | {v.task} | {v.test.n} | {v.test.new_mean:.3f} | "
                         f"{v.test.old_mean:.3f} | {gain:+.1f} | {v.test.losses} / {v.test.wins} | {v.test.p_worse:.3g} |")
        if len(gains) > 1:
            lines.append(f"| {r['variant']} | {r['seed']} | {r['step']} | mean over tasks | | | | "
                         f"{statistics.fmean(gains):+.1f} | | |")
    return lines
