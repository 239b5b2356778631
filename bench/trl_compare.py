"""TAO against TRL's ``GRPOTrainer``: same model, task, group size, batch, token budget and lr.

Both sides train the embedded SmolLM2-135M-Instruct (from tao's safetensors cache, nothing from a
hub) on the ``arithmetic`` task (``add2``, two-digit addition) with the ``arithmetic-check``
verifier reward: ``--prompts`` prompts x ``--group`` samples per optimizer step, at most
``--max-new-tokens`` new tokens, temperature 1, no KL, the same learning rate, seed and thread
count, for ``--steps`` steps. Each side runs in its own process (``bench/_compare_sides.py``):

- ``tao``: the pipeline as ``tao demo`` runs it (engine sampling, shared-prefix packed GRPO update);
- ``trl``: ``GRPOTrainer`` in a separate virtual environment (``--venv``, created on first use with
  pip: the CPU torch and the transformers of this environment, ``trl``, and this repository
  installed editable), fed tao's prompts in tao's order and scored by tao's scorer.

Both are evaluated by ``tao_core.tasks.evaluate`` (greedy, 128 held-out problems) before and after.
Reported per side: seconds per optimizer step (median and mean over the steps after the first, the
first apart; evaluation, model loading and checkpoints excluded), CPU seconds per step (less
disturbed by other load on a shared machine), peak resident memory (``VmHWM``)
of the whole process and of the training steps alone, held-out accuracy before and after. CSV
rows go to stdout (and are appended to ``--out``), then the speed and memory ratios.

    .venv/bin/python bench/trl_compare.py --quick
    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/trl_compare.py --threads 1 --out results.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIDES = BENCH / "_compare_sides.py"
RESULT_PREFIX = "RESULT "  # the line each side prints last (see _compare_sides.py)
DEFAULT_VENV = Path.home() / ".cache" / "tao" / "trl-venv"
DEFAULT_TRL = "1.16.*"  # the version the TRL figures were measured with
DEMO_LR = 2e-5  # train.lr of the arithmetic demo recipe (plugins/tasks/recipes/demo.toml)
# pinned to this environment's versions, so both sides run the same arithmetic
SHARED_DISTS = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy")
# the rest of tao-core's runtime dependencies (installed unpinned; tao-core itself goes in with --no-deps)
TAO_DEPS = ("pluggy", "click", "tqdm", "gguf")
COLUMNS = ("provider,steps,s_per_step,s_per_step_mean,first_step_s,train_s,cpu_s_per_step,peak_rss_mb,train_peak_rss_mb,"
           "heldout_before,heldout_after,after_ci_low,after_ci_high,eval_n,reward_first,reward_last,lr,"
           "prompts,group,max_new_tokens,threads,objective,trl_version,torch,transformers,cpu,date")


class SetupError(RuntimeError):
    """The TRL environment could not be created or is unusable."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TAO vs TRL GRPOTrainer: time per step, peak memory, held-out accuracy.")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 10; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 steps and a 16-problem evaluation, to check the setup")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out problems (default 128; 16 with --quick)")
    p.add_argument("--lr", type=float, default=DEMO_LR, help=f"learning rate of both sides (default {DEMO_LR}, the demo's)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new-token budget of each sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--level", default="add2", help="arithmetic task level")
    p.add_argument("--model", default="smollm2-135m", help="tao model spec (alias, cache name or HF directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (and OMP_NUM_THREADS)")
    p.add_argument("--tao-objective", default="grpo", help="tao's objective (the demo's: grpo)")
    p.add_argument("--trl-loss-type", default="grpo",
                   help="GRPOTrainer loss_type; 'grpo' (per-sequence mean) is tao's grpo objective; TRL's own default is 'dapo'")
    p.add_argument("--trl-batch", type=int, default=None,
                   help="TRL per_device_train_batch_size (default prompts x group: one forward/backward per step, "
                        "no accumulation); smaller values use gradient accumulation")
    p.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                   help="GRPOTrainer gradient checkpointing (default on, TRL's GRPOConfig default: less memory, "
                        "one more forward per step)")
    p.add_argument("--trl-version", default=DEFAULT_TRL, help=f"pip version spec of trl (default {DEFAULT_TRL})")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the TRL environment (default {DEFAULT_VENV})")
    p.add_argument("--sides", nargs="+", choices=("tao", "trl"), default=["tao", "trl"], help="which sides to run")
    p.add_argument("--workdir", type=Path, default=None, help="keep the run directories here (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="also append the CSV rows to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars from the sides")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    args.eval_limit = args.eval_limit if args.eval_limit is not None else (16 if args.quick else 128)
    args.trl_batch = args.trl_batch or args.prompts * args.group
    for name in ("steps", "eval_limit", "prompts", "group", "max_new_tokens", "threads", "trl_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error(f"--group must be >= 2 (group-normalized advantages need two samples), got {args.group}")
    if (args.prompts * args.group) % args.trl_batch or args.trl_batch % args.group:
        p.error(f"--trl-batch {args.trl_batch} must divide prompts x group = {args.prompts * args.group} "
                f"and be a multiple of --group {args.group}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def side_spec(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The settings both sides receive, identical by construction."""
    return {
        "task": "arithmetic", "task_options": {"level": args.level}, "model": args.model,
        "steps": args.steps, "prompts": args.prompts, "group": args.group,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "eval_limit": args.eval_limit,
        "tao_objective": args.tao_objective, "trl_loss_type": args.trl_loss_type, "trl_batch": args.trl_batch,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing == "on",
        "workdir": str(workdir), "progress": not args.no_progress,
    }


def child_env(threads: int) -> dict[str, str]:
    """The sides' environment: pinned thread pools, no hub access, unbuffered output."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TRL_EXPERIMENTAL_SILENCE="1")
    return env


# -- the TRL environment ------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def shared_requirements() -> list[str]:
    """This environment's versions of the libraries both sides compute with, as pip pins."""
    out = []
    for dist in SHARED_DISTS:
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            raise SetupError(f"{dist} is not installed in this environment ({sys.executable}); "
                             "run scripts/setup.sh first") from None
        out.append(f"{dist}=={version.split('+')[0]}")  # 2.13.0+cpu -> 2.13.0: pip still prefers the +cpu wheel
    return out


_PROBE = """
import importlib.metadata as md, json, tao_core, trl
print(json.dumps({"trl": trl.__version__, "tao_core": tao_core.__file__,
                  **{d: md.version(d) for d in %r}}))
"""


def probe_env(python: Path) -> dict[str, str] | None:
    """Versions inside the TRL environment, or None when it lacks trl or tao-core."""
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", _PROBE % (SHARED_DISTS,)], capture_output=True, text=True,
                          env=child_env(1))
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def env_matches(found: dict[str, str] | None, pins: list[str], trl_spec: str) -> bool:
    """True when the environment has tao-core from this repository and the pinned versions."""
    if not found or not found["tao_core"].startswith(str(REPO)):
        return False
    for pin in pins:
        dist, version = pin.split("==")
        if found[dist].split("+")[0] != version:
            return False
    if trl_spec.endswith("*"):
        return found["trl"].startswith(trl_spec.rstrip("*"))
    return found["trl"] == trl_spec


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr + proc.stdout).splitlines() if "is ignored: it is neither" not in x]
        raise SetupError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n  " + "\n  ".join(lines[-8:])
            + "\nThis needs the package index (PyPI) and a CPU wheel of torch. Without network access, "
            "pass --venv an environment that already has trl, this torch and tao-core (editable) installed."
        )


def ensure_trl_env(venv: Path, trl_spec: str) -> dict[str, str]:
    """Create or update the TRL environment; return its versions."""
    python = venv_python(venv)
    pins = shared_requirements()
    found = probe_env(python)
    if env_matches(found, pins, trl_spec):
        return found
    print(f"# setting up the TRL environment in {venv} (trl=={trl_spec}, {', '.join(pins)})",
          file=sys.stderr, flush=True)
    if not python.exists():
        proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SetupError(f"could not create a virtual environment in {venv}: {proc.stderr.strip()}")
    _pip(python, *pins, f"trl=={trl_spec}", *TAO_DEPS)
    _pip(python, "--no-deps", "-e", str(REPO))
    found = probe_env(python)
    if not env_matches(found, pins, trl_spec):
        raise SetupError(f"the TRL environment in {venv} is still unusable after installing "
                         f"(found {found}); delete it and run again")
    return found


# -- running and reporting ---------------------------------------------------------------------

def run_side(python: Path, side: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one side in a subprocess (its progress on stderr) and return its result."""
    print(f"# {side}: running {spec['steps']} steps ({python})", file=sys.stderr, flush=True)
    proc = subprocess.run([str(python), str(SIDES), side, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env=child_env(spec["threads"]), cwd=str(REPO))
    results = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"the {side} side failed (exit {proc.returncode}); its error is on stderr above")
    return json.loads(results[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def csv_row(r: dict[str, Any], spec: dict[str, Any], stamp: str) -> str:
    """One CSV line (see COLUMNS) for one side's result."""
    rewards = [x for x in r["rewards"] if x is not None]
    values = [
        r["side"], spec["steps"], f"{r['s_per_step']:.2f}", f"{r['s_per_step_mean']:.2f}", f"{r['first_step_s']:.2f}",
        f"{r['train_s']:.1f}", f"{r['cpu_s_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}",
        f"{r['before']['value']:.4f}", f"{r['after']['value']:.4f}", f"{r['after']['ci_low']:.3f}",
        f"{r['after']['ci_high']:.3f}", r["after"]["n"],
        f"{rewards[0]:.3f}" if rewards else "nan", f"{rewards[-1]:.3f}" if rewards else "nan",
        f"{spec['lr']:g}", spec["prompts"], spec["group"], spec["max_new_tokens"], r["threads"], r["objective"],
        r.get("trl_version", "-"), r["torch"], r["transformers"], cpu_name(), stamp,
    ]
    return ",".join(str(v).replace(",", " ") for v in values)


def append_rows(path: Path, rows: list[str]) -> None:
    """Append rows to a CSV file, writing the header first when the file is new or empty."""
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if new:
            f.write(COLUMNS + "\n")
        f.write("\n".join(rows) + "\n")


def summary(tao: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """The comparison against the issue's goal: >= 2x faster per step, <= TRL's peak memory, accuracy >=."""
    speed = trl["s_per_step"] / tao["s_per_step"]
    cpu_speed = trl["cpu_s_per_step"] / tao["cpu_s_per_step"]
    mem = tao["train_peak_rss_mb"] / trl["train_peak_rss_mb"]
    mem_all = tao["peak_rss_mb"] / trl["peak_rss_mb"]
    acc = tao["after"]["value"] - trl["after"]["value"]
    return [
        f"# speed: tao {speed:.2f}x faster per step ({tao['s_per_step']:.2f} s vs {trl['s_per_step']:.2f} s, "
        f"median after the first step){' [goal >= 2x met]' if speed >= 2 else ' [goal >= 2x NOT met]'}",
        f"# CPU time: tao {cpu_speed:.2f}x less per step ({tao['cpu_s_per_step']:.2f} s vs "
        f"{trl['cpu_s_per_step']:.2f} s, all steps, all threads: robust to other load on the machine)",
        f"# memory: tao/TRL peak RSS of the training steps {mem:.2f} ({tao['train_peak_rss_mb']:.0f} vs "
        f"{trl['train_peak_rss_mb']:.0f} MB), whole process {mem_all:.2f} ({tao['peak_rss_mb']:.0f} vs "
        f"{trl['peak_rss_mb']:.0f} MB){' [goal <= 1 met]' if mem <= 1 else ' [goal <= 1 NOT met]'}",
        f"# held-out accuracy after {tao['after']['n']} problems: tao {tao['after']['value']:.3f} vs TRL "
        f"{trl['after']['value']:.3f} (before: {tao['before']['value']:.3f} / {trl['before']['value']:.3f}), "
        f"difference {acc:+.3f}{' [>= TRL]' if acc >= 0 else ' [below TRL]'}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pythons = {"tao": Path(sys.executable)}
    if "trl" in args.sides:
        try:
            versions = ensure_trl_env(args.venv.expanduser(), args.trl_version)
        except SetupError as e:
            print(f"error: could not set up the TRL environment: {e}", file=sys.stderr)
            return 2
        print(f"# TRL environment {args.venv}: trl {versions['trl']}, torch {versions['torch']}, "
              f"transformers {versions['transformers']}", file=sys.stderr, flush=True)
        pythons["trl"] = venv_python(args.venv.expanduser())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trl-compare-"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    results: dict[str, dict[str, Any]] = {}
    rows: list[str] = []
    print(COLUMNS, flush=True)
    try:
        for side in args.sides:
            spec = side_spec(args, workdir)
            try:
                results[side] = run_side(pythons[side], side, spec)
            except RuntimeError as e:
                print(f"# {side}: {e}", flush=True)
                continue
            rows.append(csv_row(results[side], spec, stamp))
            print(rows[-1], flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out and rows:
        append_rows(args.out, rows)
    if "tao" in results and "trl" in results:
        for line in summary(results["tao"], results["trl"]):
            print(line, flush=True)
    return 0 if len(results) == len(args.sides) else 1


if __name__ == "__main__":
    sys.exit(main())
