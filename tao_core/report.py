"""``tao report RUN_DIR [--sft SFT_DIR ...]``: a Markdown + HTML report with PNG plots.

Everything comes from the run directories' ``metrics.jsonl`` and ``config.json``. A TAO run's
report shows reward and KL per step, the held-out metric per evaluation, time per stage, tokens per
second, the gain per hour of tuning, and held-out quality against tuning compute (candidates
generated so far, and tuning seconds). With ``--sft`` it adds a "TAO vs SFT" section comparing the
run with supervised fine-tuning runs (``tao sft``) on labeled examples. An SFT run directory can be
reported on its own too (its compute is labeled examples seen). Tuning time is always generate +
score + train seconds, evaluation and checkpoint writing excluded.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tao_core import report_plots as plots
from tao_core.errors import TaoInputError
from tao_core.records import read_json_object
from tao_core.rundir import MARKER, RunDir, run_kind


@dataclass
class RunData:
    """One run directory's config and metric lines, split by type."""

    root: Path
    cfg: dict[str, Any]
    kind: str  # "tao" or "sft" (config.json "kind"; TAO runs have none)
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None

    @property
    def tuning_s(self) -> float:
        return sum(sum(plots.stage_seconds(r)) for r in self.steps)

    @property
    def label(self) -> str:
        if self.kind == "sft":
            sft = self.cfg.get("sft", {})
            return f"SFT, {sft.get('examples')} labeled x {sft.get('epochs')} epoch(s)"
        return (f"TAO ({self.cfg.get('train', {}).get('objective')}, scorer "
                f"{self.cfg.get('score', {}).get('scorer') or 'task default'})")

    def after(self) -> dict[str, Any] | None:
        """The evaluation of the model the run hands over: TAO's promoted best, SFT's last epoch."""
        if not self.evals:
            return None
        if self.kind == "sft":
            return self.evals[-1]
        if self.final is not None:
            at_best = [e for e in self.evals if e["step"] == self.final["step"]]
            if at_best:
                return max(at_best, key=lambda e: e["value"])
        return max(self.evals, key=lambda e: e["value"])

    def compute_points(self) -> list[dict[str, Any]]:
        """Per evaluation: its step, round (or epoch), compute so far, tuning seconds so far, metric.

        Compute is candidates generated (a TAO step's scored + abstained + errored candidates,
        else ``prompts_per_step x generate.n``) or, for SFT, labeled examples seen.
        """
        per_step = self.cfg.get("prompts_per_step", 0) * self.cfg.get("generate", {}).get("n", 0)
        done: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
        compute = seconds = 0.0
        for r in self.steps:
            if self.kind == "sft":
                compute = float(r.get("examples_seen", compute))
            else:
                counted = sum(r.get(k, 0) for k in ("scores_ok", "scores_abstain", "scores_error"))
                compute += counted or per_step
            seconds += sum(plots.stage_seconds(r))
            done[r["step"]] = (compute, seconds)
        return [{"step": e["step"], "round": e.get("round", e.get("epoch")), "compute": done[e["step"]][0],
                 "tuning_s": done[e["step"]][1], **{k: e[k] for k in ("value", "ci_low", "ci_high", "n")}}
                for e in self.evals if e["step"] in done]

    def boundaries(self) -> list[tuple[str, float]]:
        """(label, compute) at the end of each round (TAO) or epoch (SFT)."""
        key = "epoch" if self.kind == "sft" else "round"
        ends: dict[Any, int] = {}
        for r in self.steps:
            ends[r.get(key)] = r["step"]
        at = {p["step"]: p["compute"] for p in self.compute_points()}
        return [(f"{key} {k}", at[s]) for k, s in ends.items() if k is not None and s in at]


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (TAO or SFT); an error when it has no metrics."""
    rd = RunDir(run_dir)
    if run_kind(rd.root) not in ("run", "sft"):
        raise TaoInputError(f"{run_dir}: not a tao run or SFT directory (no {MARKER}); tao report writes only "
                            "into directories tao made")
    metrics = rd.read_metrics()
    if not metrics:
        raise TaoInputError(f"{run_dir}: no metrics.jsonl to report on (is this a tao run directory?)")
    cfg = read_json_object(rd.root / "config.json") if (rd.root / "config.json").exists() else {}
    data = RunData(rd.root, cfg, cfg.get("kind", "tao"))
    for r in metrics:
        kind = r.get("type")
        bucket = {"step": data.steps, "eval": data.evals, "round": data.rounds, "warning": data.warnings}.get(kind)
        if bucket is not None:
            bucket.append(r)
        elif kind == "final":
            data.final = r
    return data


def _ci(e: dict[str, Any]) -> str:
    return f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _evaluations_table(run: RunData) -> list[str]:
    """Every evaluation's value, interval and n, and a column per task when the evaluations are per task
    (a mixture's eval lines carry ``tasks``: then ``value`` is the tasks' mean)."""
    tasks: dict[str, str] = {}  # task -> its metric, in order of first appearance
    for e in run.evals:
        for name, r in e.get("tasks", {}).items():
            tasks.setdefault(name, r.get("metric", ""))
    head = "".join(f" {name} {metric} |" for name, metric in tasks.items())
    lines = ["## Evaluations", ""]
    if tasks:
        lines += ["`value` is the mean of the tasks' metrics; each task's column is its own metric on its own "
                  "held-out examples (its n in parentheses).", ""]
    lines += [f"| step | {'epoch' if run.kind == 'sft' else 'round'} | value | 95% CI | n |{head}",
              "|---|---|---|---|---|" + "---|" * len(tasks)]
    for e in run.evals:
        per = e.get("tasks", {})
        cells = "".join(f" {per[t]['value']:.3f} ({per[t]['n']}) |" if t in per else " - |" for t in tasks)
        lines.append(f"| {e['step']} | {e.get('round', e.get('epoch'))} | {e['value']:.3f} | "
                     f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {e['n']} |{cells}")
    return lines


def _compute_section(run: RunData, add) -> list[str]:
    points = run.compute_points()
    unit = "labeled examples seen" if run.kind == "sft" else "candidates generated"
    metric = run.evals[0]["metric"]
    figure = add("quality_vs_compute.png", f"Held-out {metric} against tuning compute",
                 lambda axes: plots.quality_vs_compute(axes, points, metric, unit, run.boundaries()), panels=2)
    lines = ["## Held-out quality against tuning compute", ""]
    if run.kind != "sft":
        lines += [f"Compute is candidates generated so far ({run.cfg.get('prompts_per_step')} prompts x "
                  f"{run.cfg.get('generate', {}).get('n')} candidates per step, rounds marked in the plot) and "
                  "tuning seconds (generate + score + train).", ""]
    lines += [f"| step | {'epoch' if run.kind == 'sft' else 'round'} | {unit} | tuning min | held-out {metric} "
              "(95% CI) |", "|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['round']} | {p['compute']:.0f} | {p['tuning_s'] / 60:.1f} | {_ci(p)} |"
              for p in points]
    return lines + [""] + figure


def _comparison_section(run: RunData, sft_runs: list[RunData], add) -> list[str]:
    runs = [run, *sft_runs]
    lines = ["## TAO vs SFT", ""]
    for s in sft_runs:
        for key in ("task", "task_options", "model", "eval_limit"):
            if s.cfg.get(key) != run.cfg.get(key):
                lines.append(f"- **not comparable**: `{s.root}` has {key} = `{s.cfg.get(key)}`, the TAO run "
                             f"`{run.cfg.get(key)}`")
    for s in sft_runs:
        if s.kind != "sft":
            lines.append(f"- `{s.root}` is not an SFT run directory (no kind = \"sft\" in its config.json)")
    if lines[-1] != "":
        lines.append("")
    lines += ["| method | labeled examples used | prompts seen | held-out before (95% CI) | after (95% CI) | "
              "tuning min | torch threads |", "|---|---|---|---|---|---|---|"]
    rows = []
    for r in runs:
        before, after = (r.evals[0] if r.evals else None), r.after()
        if before is None or after is None:
            lines.append(f"| {r.label} | - | - | no evaluation | - | - | - |")
            continue
        if r.kind == "sft":
            sft = r.cfg.get("sft", {})
            labeled = str(sft.get("examples"))
            prompts = f"{sft.get('examples')} labeled x {sft.get('epochs')} epoch(s)"
        else:
            labeled = "0"
            prompts = (f"{len(r.steps) * r.cfg.get('prompts_per_step', 0)} unlabeled, "
                       f"{r.compute_points()[-1]['compute']:.0f} candidates")
        lines.append(f"| {r.label} | {labeled} | {prompts} | {_ci(before)} | {_ci(after)} "
                     f"(step {after['step']}) | {r.tuning_s / 60:.1f} | {r.cfg.get('threads') or 'default'} |")
        rows.append({"before": before, "after": after, "short": "TAO" if r.kind == "tao" else
                     f"SFT {r.cfg.get('sft', {}).get('epochs')} ep"})
    lines += ["", "TAO's after is its promoted (best non-regressing) evaluation, SFT's the last epoch's. "
              "TAO uses no labels: its scorer judges sampled candidates; SFT imitates the task's reference "
              "responses (`Task.reference`). Tuning minutes are wall-clock and exclude evaluation; they compare "
              "only between runs made with the same threads on an equally loaded machine.", ""]
    lines += ["Every evaluation (compute: candidates generated for TAO, labeled examples seen for SFT):", "",
              "| method | step | round / epoch | compute | tuning min | held-out (95% CI) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.label} | {p['step']} | {p['round']} | {p['compute']:.0f} | {p['tuning_s'] / 60:.1f} | {_ci(p)} |"
              for r in runs for p in r.compute_points()]
    lines.append("")
    befores = sorted({f"{row['before']['value']:.3f}" for row in rows})
    if len(befores) > 1:
        lines += [f"The starting model's held-out value differs between the runs ({', '.join(befores)}): compare "
                  "each run's gain over its own before value.", ""]
    if rows:
        metric = run.evals[0]["metric"] if run.evals else "metric"
        curves = [(r.label, r.compute_points()) for r in runs if r.evals]
        lines += add("tao_vs_sft.png", f"TAO vs SFT: held-out {metric}",
                     lambda axes: plots.methods_compared(axes, rows, curves, metric), panels=2)
    return lines


def write_report(run_dir: str | Path, sft_dirs: list[str | Path] | None = None) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.md``, ``report.html`` and ``plots/*.png``; return the two paths."""
    run = load_run(run_dir)
    sft_runs = [load_run(d) for d in sft_dirs or []]
    plot_dir = run.root / "plots"
    plot_dir.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []

    def add(name: str, title: str, draw, panels: int = 1) -> list[str]:
        """Save a figure; list it at the end of the report, and return its Markdown for inline use."""
        plots.save_figure(plot_dir / name, draw, panels)
        figures.append((title, f"plots/{name}"))
        return [f"![{title}](plots/{name})", ""]

    def inline(name: str, title: str, draw, panels: int = 1) -> list[str]:
        """Save a figure shown inside its section (not listed again at the end)."""
        lines = add(name, title, draw, panels)
        figures.pop()
        return lines

    steps, evals, cfg = run.steps, run.evals, run.cfg
    if steps and any("reward_mean" in r for r in steps):
        add("reward_kl.png", "Reward and KL per step", lambda ax: plots.reward_kl(ax, steps))
    if steps:
        add("stage_times.png", "Time per stage", lambda ax: plots.stage_times(ax, steps))
        add("tokens_per_s.png", "Tokens per second", lambda ax: plots.throughput(ax, steps))
    if evals:
        metric = evals[0]["metric"]
        add("heldout.png", f"Held-out {metric} (95% Wilson interval)", lambda ax: plots.heldout(ax, evals, metric))
        points = run.compute_points()
        add("gain_per_hour.png", "Held-out gain against tuning compute",
            lambda ax: plots.gain_per_hour(ax, points, metric))

    tuning_s = run.tuning_s
    lines = [f"# tao {'SFT ' if run.kind == 'sft' else ''}run report: `{run.root}`", ""]
    if cfg:
        lines.append(f"- method: {run.label}; task: `{cfg.get('task')}`, model: `{cfg.get('model')}`")
        if run.kind == "sft":
            lines.append(f"- {cfg.get('sft', {}).get('batch_size')} examples per step, {len(steps)} steps, "
                         f"lr {cfg.get('train', {}).get('lr')}")
        else:
            lines.append(f"- {cfg.get('prompts_per_step')} prompts x {cfg.get('generate', {}).get('n')} candidates "
                         f"per step, {len(steps)} steps")
    g, s, t = (sum(plots.stage_seconds(r)[i] for r in steps) for i in range(3))
    stages = f"train {t:.0f} s" if run.kind == "sft" else f"generate {g:.0f} s, score {s:.0f} s, train {t:.0f} s"
    lines.append(f"- tuning time: {tuning_s / 60:.1f} min ({stages}; evaluation excluded)")
    if evals:
        first, best = evals[0], run.after()
        gain = best["value"] - first["value"]
        per_hour = gain / (tuning_s / 3600) if tuning_s else 0.0
        lines += [f"- held-out {first['metric']}: {first['value']:.3f} before, {best['value']:.3f} after (step "
                  f"{best['step']}; {gain:+.3f}; {per_hour:+.3f} per hour of tuning)", ""]
        lines += _evaluations_table(run) + [""] + _compute_section(run, inline)
    if sft_runs:
        lines += _comparison_section(run, sft_runs, inline)
    if run.rounds:
        lines += ["", "## Rounds", "", "| round | value | promoted | rolled back |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['value']:.3f} | {r['promoted']} | {r['rolled_back']} |" for r in run.rounds]
    if run.kind != "sft":
        lines += ["", "## Guard warnings", ""]
        lines += [f"- step {w['step']}: **{w['kind']}**: {w['message']}" for w in run.warnings] or ["- none"]
    lines.append("")
    for title, rel in figures:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    md = "\n".join(lines)
    md_path = run.root / "report.md"
    md_path.write_text(md)
    html_path = run.root / "report.html"
    html_path.write_text(_to_html(md))
    return md_path, html_path


def _to_html(md: str) -> str:
    """A small Markdown subset (headings, lists, tables, images) to standalone HTML."""
    out, table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not table else "td"
            if not table:
                out.append("<table>")
                table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("</table>")
            table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](")
            out.append(f'<img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    if table:
        out.append("</table>")
    style = "body{font-family:sans-serif;max-width:900px;margin:auto}td,th{border:1px solid #ccc;padding:4px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>tao report</title><style>{style}</style></head><body>{''.join(out)}</body></html>"
