"""Held-out arithmetic accuracy on problems that no pipeline evaluation sees.

The pipeline's guards evaluate on the `arithmetic` task's 128 held-out problems and keep the best
checkpoint, so the accuracy they report of a run's `final/` carries a selection bias. This scores
models on 256 *other* held-out problems (the evaluation split drawn with another seed, minus the
guard's 128): greedy decoding, the task's prompt and check, as `tao eval`. CSV rows on stdout.

    TAO_HOME=/tmp/taohome python bench/fresh_eval.py smollm2-135m runs/demo/final runs/demo-label-free/final
"""

from __future__ import annotations

import argparse
import csv
import sys

from tao_plugins.tasks.arithmetic import ArithmeticTask

from tao_core.models import load_model
from tao_core.sampler import sampler_for
from tao_core.tasks import evaluate


def fresh_examples(count: int = 256, level: str = "add2"):
    """``count`` held-out problems of ``level`` that are not among the guard's 128 (seed 0)."""
    def key(e):
        return tuple(sorted(e.metadata["expression"].split(" + ")))

    guard = {key(e) for e in ArithmeticTask(level=level).eval_examples(128)}
    task = ArithmeticTask(level=level, eval_seed=1, n_eval=480)
    fresh = [e for e in task.eval_examples() if key(e) not in guard][:count]
    if len(fresh) < count:
        raise SystemExit(f"only {len(fresh)} held-out problems outside the guard's 128; ask for fewer")
    return task, fresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model aliases, GGUF files or Hugging Face dirs (a run's final/)")
    ap.add_argument("--count", type=int, default=256)
    args = ap.parse_args()
    task, examples = fresh_examples(args.count)
    out = csv.writer(sys.stdout)
    out.writerow(["model", "n", "accuracy", "ci_low", "ci_high"])
    for name in args.models:
        result = evaluate(task, sampler_for(load_model(name)), examples)
        out.writerow([name, result.n, f"{result.value:.3f}", f"{result.ci_low:.3f}", f"{result.ci_high:.3f}"])
        sys.stdout.flush()


if __name__ == "__main__":
    main()
