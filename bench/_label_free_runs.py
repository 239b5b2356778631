"""The processes of bench/label_free.py: `tao run` and the evaluation worker, each a child in its own process
group, and what a finished run directory says about one of its steps.

A child is started with ``start_new_session`` (its own process group, so the driver kills it and
everything it started with one ``killpg``) and ``PR_SET_PDEATHSIG`` (the kernel kills it when the
driver dies, even by SIGKILL). Every child, and every process a child starts, carries the
environment variable ``TAO_LABEL_FREE_OWNER`` naming the state directory; a driver that starts on a
state directory first kills the processes an earlier, killed driver left there (found by that variable
in ``/proc/<pid>/environ``), so a run directory is never locked by a leftover `tao run`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

OWNER = "TAO_LABEL_FREE_OWNER"
REPO = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1


class DriverError(Exception):
    """A problem the person running the driver must fix; the message says what and where."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Children:
    """The driver's one running child at a time; :meth:`kill` ends its whole process group."""

    def __init__(self, state_dir: Path, threads: int | None) -> None:
        self.owner = str(state_dir.resolve())
        self.threads = threads
        self.current: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {**os.environ, OWNER: self.owner}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return env

    def run(self, cmd: list[str], log: Path, stdout: Path | None = None) -> int:
        """Run ``cmd`` to its end (stderr, and stdout unless ``stdout`` is given, appended to ``log``)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err, open(stdout, "wb") if stdout else open(os.devnull, "wb") as out:
            err.write(f"\n$ {' '.join(cmd)}\n".encode())
            err.flush()
            self.current = subprocess.Popen(cmd, stdout=out if stdout else err, stderr=err, env=self.env(),
                                            cwd=REPO, start_new_session=True, preexec_fn=_die_with_parent)
            try:
                return self.current.wait()
            finally:
                self.kill()  # whatever the child started and left behind
                self.current = None

    def kill(self) -> None:
        """SIGKILL the current child's process group (a no-op when it has ended and left nothing)."""
        if self.current is not None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_leftovers(self) -> list[int]:
        """Kill the processes an earlier driver on this state directory left running; their pids."""
        mark = f"{OWNER}={self.owner}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue  # gone, or not ours to read
        deadline = time.monotonic() + 10
        while found and any(Path(f"/proc/{p}").exists() for p in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found


def tao_run_command(config: Path, run_dir: Path) -> tuple[list[str], str]:
    """The `tao run` that starts or continues ``run_dir``: (argv, "start" | "resume")."""
    if (run_dir / "config.json").exists():  # written before the first step: a started run
        return [sys.executable, "-m", "tao_core.cli", "run", "--resume", str(run_dir)], "resume"
    return [sys.executable, "-m", "tao_core.cli", "run", str(config), "--output-dir", str(run_dir)], "start"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run; the resume rewrites it
    return rows


def finished(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir() and any(r.get("type") == "final" for r in read_metrics(run_dir))


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in read_metrics(run_dir) if r.get("type") == "step"]
    return max(steps, default=0)


def round_model(run_dir: Path, step: int, steps_per_round: int) -> Path:
    """The weights at ``step`` (a round's end): written at the end of that round, before any rollback."""
    return run_dir / "rounds" / f"round-{step // steps_per_round:03d}" / "model"


def step_figures(run_dir: Path, step: int) -> dict[str, Any]:
    """What the run's metrics say up to ``step``: rounds and promotions, tuning seconds, warnings,
    the completion-length curve and the run's own held-out evaluation at that step."""
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r.get("type") == "step" and r["step"] <= step]
    rounds = [r for r in rows if r.get("type") == "round" and r["step"] <= step]
    warnings = Counter(r.get("kind", "?") for r in rows if r.get("type") == "warning" and r.get("step", 0) <= step)
    evals = [r for r in rows if r.get("type") == "eval" and r["step"] == step]
    curve = [[r["step"], round(r["completion_len_mean"], 2)] for r in steps if "completion_len_mean" in r]
    return {
        "rounds": len(rounds), "promoted_rounds": sum(bool(r.get("promoted")) for r in rounds),
        "steps_done": len(steps),
        "seconds": round(sum(r.get("generate_s", 0) + r.get("score_s", 0) + r.get("train_s", 0) for r in steps), 1),
        "warnings": dict(sorted(warnings.items())),
        "length_curve": curve,
        "len_first": curve[0][1] if curve else None,
        "len_last": curve[-1][1] if curve else None,
        "run_eval": evals[-1]["value"] if evals else None,
    }


# -- the evaluation worker (`label_free.py --eval-worker SPEC`, run as a child) -----------------------
def eval_worker(spec: dict[str, Any]) -> None:
    """Evaluate each of ``spec["models"]`` greedily; one JSON line per model on stdout.

    ``spec["evaluation"]``: "fresh" (bench/fresh_eval.py's held-out arithmetic problems, none of the
    run's guard evaluation) or "task" (the task's own held-out split, e.g. the SQL evaluation databases).
    """
    import torch
    from fresh_eval import fresh_examples

    from tao_core import evaluation
    from tao_core.models import load_model
    from tao_core.plugins import get_component
    from tao_core.sampler import sampler_for

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    options = spec.get("task_options") or {}
    if spec["evaluation"] == "fresh":
        task, examples = fresh_examples(spec["count"], level=options.get("level", "add2"))
    else:
        task = get_component("tasks", spec["task"])(**options)
        examples = task.eval_examples(spec["count"])
    for model in spec["models"]:
        start, cpu = time.perf_counter(), time.process_time()
        rows = evaluation.evaluate_rows(task, sampler_for(load_model(model)), examples)
        result = evaluation.summarize(task, rows)
        record = evaluation.eval_record(task, result)
        print(json.dumps({"model": model, "metric_name": result.metric, "value": result.value, "n": result.n, "ci_lo": result.ci_low,
                          "ci_hi": result.ci_high, "eval_seconds": round(time.perf_counter() - start, 1),
                          "eval_cpu_seconds": round(time.process_time() - cpu, 1),
                          "threads": torch.get_num_threads(),
                          # each task's result (a mixture) and the per-item values that the paired tests pair
                          "tasks": record.get("tasks"), "items": evaluation.gate_items(task, rows)}), flush=True)
