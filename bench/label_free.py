"""The label-free measurements of docs/results.md, resumable: the arithmetic figure, the SQL figure, the ablation.

    python bench/label_free.py --study arithmetic --out runs/lf-arith --threads 2 --plan
    python bench/label_free.py --study arithmetic --out runs/lf-arith --threads 2

A *unit* is one (variant, seed, step): the variant's run (a `tao run` of ``max(--steps)`` steps, one per
variant and seed, under ``OUT/runs/``) reaches the step, and the weights at that step (the round model
the pipeline keeps at each round's end, ``rounds/round-NNN/model``, before any rollback: not only the
promoted ``final/``) are evaluated greedily: on bench/fresh_eval.py's held-out problems for arithmetic
and the ablation, on the task's evaluation databases for SQL. The starting model is the unit
(start, -, 0). Each finished unit is one JSON line in ``OUT/results.jsonl``; running the same command
again skips finished units and continues an interrupted run with `tao run --resume`. Kill the driver at
any moment (SIGKILL included): its children die with it. At the end: CSV rows on stdout (also
``OUT/results.csv``), then the summary (``OUT/summary.md``): mean ± sd over seeds, the gain over the
starting model, and for the ablation each variant's difference from the full recipe.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import _label_free_runs as runs
import _label_free_studies as studies
from _label_free_report import (
    append_result,
    cpu_name,
    csv_text,
    merge_results,
    plan,
    read_results,
    summary,
    unit_key,
)
from _label_free_runs import DriverError

DRIVER_KEYS = ("rounds", "seed", "output_dir", "model", "threads")  # set by the driver's own flags


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. {flag} 0,1,2") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: the numbers must be distinct and not negative")
    return tuple(sorted(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Usage and the figures: docs/results.md, 'How the label-free figures are measured'.")
    ap.add_argument("--study", choices=studies.STUDIES, help="what to measure")
    ap.add_argument("--out", type=Path, help="state directory: results.jsonl, the runs, their logs")
    ap.add_argument("--plan", action="store_true", help="print the units and the CPU-hour budget; run nothing")
    ap.add_argument("--summary", action="store_true", help="print the CSV and summary of the finished units; run nothing")
    ap.add_argument("--results", type=Path, action="append", default=[], metavar="FILE",
                    help="with --summary: read the units from these results.jsonl files (repeatable; e.g. drivers run side "
                    "by side on other --out directories, one seed each) instead of OUT/results.jsonl")
    ap.add_argument("--seeds", type=lambda t: int_list(t, "--seeds"), help="run seeds (default: the study's)")
    ap.add_argument("--steps", type=lambda t: int_list(t, "--steps"),
                    help="steps whose weights are evaluated, each at a round's end (default: the study's)")
    ap.add_argument("--variants", help="comma-separated subset of the study's variants (default: all)")
    ap.add_argument("--threads", type=int, help="torch threads of every run and evaluation (default: torch's)")
    ap.add_argument("--model", help="the starting model of every variant (default: the configs', the embedded model)")
    ap.add_argument("--eval-count", type=int, help="held-out problems per evaluation (default: 256 for arithmetic, "
                    "every evaluation question for SQL)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every variant (value read as TOML)")
    ap.add_argument("--seconds-per-step", type=float, help="the budget's tuning seconds per step (default: measured "
                    "in OUT, else the figure docs/results.md gives for the variant)")
    ap.add_argument("--eval-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eval_worker:
        return args
    needed = (("--study", args.study),) + (() if args.summary and args.results else (("--out", args.out),))
    problems = [f"{flag} is required" for flag, value in needed if value is None]
    if args.results and not args.summary:
        problems.append("--results is read by --summary only: add --summary")
    problems += [f"{flag} must be at least 1, got {value}" for flag, value in
                 (("--threads", args.threads), ("--eval-count", args.eval_count)) if value is not None and value < 1]
    if args.seconds_per_step is not None and not args.seconds_per_step > 0:
        problems.append(f"--seconds-per-step must be a positive number of seconds, got {args.seconds_per_step}")
    if args.steps and 0 in args.steps:
        problems.append("--steps: step 0 is the starting model, measured as the unit (start, -, 0); give steps >= 1")
    if args.plan and args.summary:
        problems.append("give --plan or --summary, not both")
    if problems:
        ap.error("; ".join(problems))
    return args


class Setup:
    """The study as this command asks for it: the variants' run configs, the seeds, the steps, the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tao_core.errors import TaoInputError
        from tao_core.options import parse_key_values

        self.args, self.out = args, args.out.resolve() if args.out else None
        self.study = studies.study(args.study)
        try:
            self.sets = parse_key_values(args.sets, flag="--set")
        except TaoInputError as e:
            raise DriverError(str(e)) from None
        owned = sorted(k for k in self.sets if k in DRIVER_KEYS)
        if owned:
            raise DriverError(f"--set {', '.join(owned)}: set by the driver; use --steps, --seeds, --out, --model or --threads")
        self.variants = self._chosen_variants(args.variants)
        self.seeds = args.seeds or self.study.seeds
        reference = studies.read_toml(studies.TEACHER.base) if self.study.shape else None
        self.data = {v.name: self._data(v, reference) for v in self.variants}
        self.steps = args.steps or self.study.steps or self._config_steps()
        self.spr = {name: d.get("steps_per_round", 10) for name, d in self.data.items()}
        for name, spr in self.spr.items():
            off = [s for s in self.steps if s % spr]
            if off:
                raise DriverError(f"--steps {','.join(map(str, off))}: variant {name} has steps_per_round = {spr}, and only a "
                                  f"round's end keeps its weights (rounds/round-NNN/model): give multiples of {spr}, or "
                                  "--set steps_per_round=N")
        first = self.data[self.variants[0].name]
        if args.model and Path(args.model).exists():  # a path: the children run in the repository root
            args.model = str(Path(args.model).resolve())
        self.model = args.model or first.get("model", "smollm2-135m")
        self.task, self.task_options = first.get("task"), first.get("task_options", {})
        default_count = 256 if self.study.evaluation == "fresh" else None
        self.eval_count = args.eval_count or default_count
        self.identity = {"study": self.study.name, "steps": list(self.steps), "model": self.model, "sets": args.sets,
                         "threads": args.threads, "eval_count": self.eval_count}

    def _chosen_variants(self, text: str | None) -> tuple[studies.Variant, ...]:
        known = {v.name: v for v in self.study.variants}
        if not text:
            return self.study.variants
        names = [n.strip() for n in text.split(",")]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DriverError(f"--variants: {', '.join(unknown)} not in study {self.study.name}; its variants: {', '.join(known)}")
        return tuple(known[n] for n in names)

    def _data(self, variant: studies.Variant, reference: dict | None) -> dict[str, Any]:
        data = studies.variant_data(variant, reference, self.study.shape)
        for key, value in self.sets.items():
            try:
                studies.set_dotted(data, key, value)
            except ValueError as e:
                raise DriverError(f"--set {key}: {e}") from None
        return data

    def _config_steps(self) -> tuple[int, ...]:
        d = self.data[self.variants[0].name]
        return (d.get("rounds", 1) * d.get("steps_per_round", 10),)

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / "runs" / f"{variant}-s{seed}"

    def config_text(self, variant: str, seed: int) -> str:
        data = dict(self.data[variant])
        data.update(seed=seed, rounds=max(self.steps) // self.spr[variant], output_dir=str(self.run_dir(variant, seed)))
        if self.args.model:
            data["model"] = self.args.model
        if self.args.threads:
            data["threads"] = self.args.threads
        return studies.dump_toml(data)

    def check_configs(self) -> None:
        """Every variant's config through tao's own check (`tao run` would refuse the same)."""
        from tao_core.errors import TaoInputError

        with tempfile.TemporaryDirectory() as tmp:
            for v in self.variants:
                path = Path(tmp) / f"{v.name}.toml"
                path.write_text(self.config_text(v.name, self.seeds[0]))
                try:
                    studies.load_run_config(path)
                except TaoInputError as e:
                    raise DriverError(f"variant {v.name} (from {v.base}): {str(e).replace(str(path), 'its config')}") from None


def claim(setup: Setup) -> int:
    """Lock OUT for this driver and check it was started with the same settings; the lock's fd."""
    out = setup.out
    if out.exists() and not out.is_dir():
        raise DriverError(f"--out {out} is a file; give a directory (it is made if absent)")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DriverError(f"{out} is in use by another bench/label_free.py (pid {(out / '.driver.lock').read_text() or '?'});"
                          " wait for it or kill it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    path = out / "driver.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in setup.identity.items() if before.get(k) != v]
        if changed:
            raise DriverError(f"{out} was started with other settings ({'; '.join(changed)}); rerun with the same "
                              "settings (seeds and variants may differ) or choose another --out")
    else:
        path.write_text(json.dumps(setup.identity, indent=2) + "\n")
    return fd


def say(message: str) -> None:
    print(f"[label_free] {message}", file=sys.stderr, flush=True)


# -- running the units --------------------------------------------------------------------------------
def evaluate(setup: Setup, children: runs.Children, models: list[str], log_name: str) -> list[dict[str, Any]]:
    spec = {"evaluation": setup.study.evaluation, "task": setup.task, "task_options": setup.task_options,
            "count": setup.eval_count, "models": models, "threads": setup.args.threads}
    out = setup.out / "logs" / f"{log_name}.eval.jsonl"
    rc = children.run([sys.executable, __file__, "--eval-worker", json.dumps(spec)], setup.out / "logs" / f"{log_name}.log", out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if rc != 0 or len(rows) != len(models):
        raise DriverError(f"evaluation of {', '.join(models)} failed (exit {rc}); see {setup.out / 'logs' / (log_name + '.log')}"
                          "; rerun the same command once it is fixed (finished units are kept)")
    return rows


def unit_row(setup: Setup, variant: str, seed: int | None, step: int, result: dict[str, Any],
             figures: dict[str, Any]) -> dict[str, Any]:
    threads = setup.args.threads or result["threads"]
    return {"study": setup.study.name, "variant": variant, "seed": seed, "step": step, "metric_name": result["metric_name"],
            "metric": result["value"],
            "n": result["n"], "ci_lo": result["ci_lo"], "ci_hi": result["ci_hi"], **figures, "cpu": cpu_name(),
            "threads": threads, "model": result["model"], "eval_seconds": result["eval_seconds"],
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tasks": result.get("tasks"), "items": result.get("items")}


def train(setup: Setup, children: runs.Children, variant: str, seed: int) -> Path:
    """Start or continue the variant's run for this seed until it has written ``final/``."""
    run_dir = setup.run_dir(variant, seed)
    if runs.finished(run_dir):
        return run_dir
    config = setup.out / "configs" / f"{variant}-s{seed}.toml"
    if not (run_dir / "config.json").exists():  # not started: (re)write its config whole
        config.parent.mkdir(parents=True, exist_ok=True)
        tmp = config.with_suffix(".tmp")
        tmp.write_text(setup.config_text(variant, seed))
        os.replace(tmp, config)
    cmd, how = runs.tao_run_command(config, run_dir)
    log = setup.out / "logs" / f"{variant}-s{seed}.log"
    say(f"{variant} seed {seed}: {'resuming the run after step ' + str(runs.last_step(run_dir)) if how == 'resume' else 'starting the run'}"
        f" ({max(setup.steps)} steps; log {log})")
    rc = children.run(cmd, log)
    if rc != 0 or not runs.finished(run_dir):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise DriverError(f"`tao run` of {variant} seed {seed} failed (exit {rc}) in {run_dir}: {' | '.join(tail)}; "
                          f"full log {log}; fix it and rerun the same command (the run resumes from its last checkpoint)")
    return run_dir


def run_units(setup: Setup, children: runs.Children) -> None:
    """Every unit not in results.jsonl; the starting model is evaluated with the first run's weights
    (one evaluation process fewer), or alone when no run is left."""
    done = read_results(setup.out)
    start = unit_key("start", None, 0) not in done
    for v in setup.variants:
        for seed in setup.seeds:
            pending = [s for s in setup.steps if unit_key(v.name, seed, s) not in done]
            if not pending:
                say(f"{v.name} seed {seed}: every step already measured; skipped")
                continue
            run_dir = train(setup, children, v.name, seed)
            models = {s: runs.round_model(run_dir, s, setup.spr[v.name]) for s in pending}
            missing = [s for s, m in models.items() if not m.is_dir()]
            if missing:
                raise DriverError(f"{run_dir}: no weights kept for step(s) {missing} (the run stopped at step "
                                  f"{runs.last_step(run_dir)}; a guard with stop_on_collapse?); see its metrics.jsonl")
            results = evaluate(setup, children, [setup.model] * start + [str(models[s]) for s in pending], f"{v.name}-s{seed}")
            if start:
                record_start(setup, results.pop(0))
                start = False
            for step, result in zip(pending, results, strict=True):
                append_result(setup.out, unit_row(setup, v.name, seed, step, result, runs.step_figures(run_dir, step)))
                say(f"{v.name} seed {seed} step {step}: {result['value']:.3f} (n={result['n']})")
    if start:
        record_start(setup, evaluate(setup, children, [setup.model], "start")[0])


def record_start(setup: Setup, result: dict[str, Any]) -> None:
    append_result(setup.out, unit_row(setup, "start", None, 0, result, {}))
    say(f"the starting model {setup.model}: {result['value']:.3f} (n={result['n']})")


def report(setup: Setup) -> None:
    rows = list(merge_results(setup.args.results).values() if setup.args.results else read_results(setup.out).values())
    text = csv_text(rows)
    table = summary(setup, rows)
    if setup.out and setup.out.is_dir() and not setup.args.results:
        (setup.out / "results.csv").write_text(text)
        (setup.out / "summary.md").write_text(table)
    sys.stdout.write(text + "\n" + table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.eval_worker:
        runs.eval_worker(json.loads(args.eval_worker))
        return 0
    try:
        setup = Setup(args)
        if args.plan or args.summary:
            if args.plan:
                setup.check_configs()
                print(plan(setup))
            else:
                report(setup)
            return 0
        setup.check_configs()
        claim(setup)
        children = runs.Children(setup.out, args.threads)
        left = children.kill_leftovers()
        if left:
            say(f"killed {len(left)} process(es) an earlier, killed driver left running: {left}")

        def stop(signum, frame):
            children.kill()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        run_units(setup, children)
        report(setup)
    except DriverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
