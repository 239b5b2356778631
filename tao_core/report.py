"""``tao report RUN_DIR``: a Markdown + HTML report with PNG plots, from the run's metrics.jsonl."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.rundir import RunDir


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    rd = RunDir(run_dir)
    metrics = rd.read_metrics()
    if not metrics:
        raise TaoInputError(f"{run_dir}: no metrics.jsonl to report on (is this a tao run directory?)")
    cfg = json.loads((rd.root / "config.json").read_text()) if (rd.root / "config.json").exists() else {}
    steps = [r for r in metrics if r["type"] == "step"]
    evals = [r for r in metrics if r["type"] == "eval"]
    rounds = [r for r in metrics if r["type"] == "round"]
    warnings = [r for r in metrics if r["type"] == "warning"]
    plots = rd.root / "plots"
    plots.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []

    def add(name: str, title: str, draw) -> None:
        _plot(plots / name, draw)
        figures.append((title, f"plots/{name}"))

    if steps:
        def reward_kl(ax):
            ax.plot(*_series(steps, "reward_mean"), label="reward (mean of ok scores)")
            xs, ys = _series(steps, "kl")
            if xs:
                ax.plot(xs, ys, label="KL to reference")
            ax.set_xlabel("step")
            ax.legend()
        add("reward_kl.png", "Reward and KL per step", reward_kl)

        def stage_times(ax):
            x = [r["step"] for r in steps]
            g = [r["generate_s"] for r in steps]
            s = [r["score_s"] for r in steps]
            t = [r["train_s"] for r in steps]
            ax.bar(x, g, label="generate")
            ax.bar(x, s, bottom=g, label="score")
            ax.bar(x, t, bottom=[a + b for a, b in zip(g, s, strict=True)], label="train")
            ax.set_xlabel("step")
            ax.set_ylabel("seconds")
            ax.legend()
        add("stage_times.png", "Time per stage", stage_times)

        def throughput(ax):
            ax.plot(*_series(steps, "generate_tokens_per_s"), label="generation tokens/s")
            ax.plot(*_series(steps, "tokens_per_s"), label="training tokens/s")
            ax.set_xlabel("step")
            ax.legend()
        add("tokens_per_s.png", "Tokens per second", throughput)

    if evals:
        metric = evals[0]["metric"]

        def heldout(ax):
            ax.errorbar([e["step"] for e in evals], [e["value"] for e in evals],
                        yerr=[[e["value"] - e["ci_low"] for e in evals], [e["ci_high"] - e["value"] for e in evals]],
                        marker="o", capsize=3)
            ax.set_xlabel("step")
            ax.set_ylabel(f"held-out {metric}")
        add("heldout.png", f"Held-out {metric} (95% Wilson interval)", heldout)

        cum, hours = 0.0, {0: 0.0}
        for r in steps:
            cum += r["generate_s"] + r["score_s"] + r["train_s"]
            hours[r["step"]] = cum / 3600

        def gain(ax):
            base = evals[0]["value"]
            pts = [(hours.get(e["step"]), e["value"] - base) for e in evals if e["step"] in hours]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_xlabel("tuning compute (hours: generate + score + train)")
            ax.set_ylabel(f"gain in held-out {metric}")
        add("gain_per_hour.png", "Held-out gain against tuning compute", gain)

    tuning_s = sum(r["generate_s"] + r["score_s"] + r["train_s"] for r in steps)
    lines = [f"# tao run report: `{rd.root}`", ""]
    if cfg:
        lines += [f"- task: `{cfg.get('task')}`, model: `{cfg.get('model')}`, objective: "
                  f"`{cfg.get('train', {}).get('objective')}`, scorer: `{cfg.get('score', {}).get('scorer')}`",
                  f"- {cfg.get('prompts_per_step')} prompts x {cfg.get('generate', {}).get('n')} candidates per step, "
                  f"{len(steps)} steps"]
    lines.append(f"- tuning time: {tuning_s / 60:.1f} min (generate {sum(r['generate_s'] for r in steps):.0f} s, "
                 f"score {sum(r['score_s'] for r in steps):.0f} s, train {sum(r['train_s'] for r in steps):.0f} s)")
    if evals:
        first, best = evals[0], max(evals, key=lambda e: e["value"])
        gain = best["value"] - first["value"]
        per_hour = gain / (tuning_s / 3600) if tuning_s else 0.0
        lines += [f"- held-out {first['metric']}: {first['value']:.3f} before, best {best['value']:.3f} at step "
                  f"{best['step']} ({gain:+.3f}; {per_hour:+.3f} per hour of tuning)", ""]
        lines += ["## Evaluations", "", "| step | round | value | 95% CI | n |", "|---|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['round']} | {e['value']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {e['n']} |"
                  for e in evals]
    if rounds:
        lines += ["", "## Rounds", "", "| round | value | promoted | rolled back |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['value']:.3f} | {r['promoted']} | {r['rolled_back']} |" for r in rounds]
    lines += ["", "## Guard warnings", ""]
    lines += [f"- step {w['step']}: **{w['kind']}**: {w['message']}" for w in warnings] or ["- none"]
    lines.append("")
    for title, rel in figures:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    md = "\n".join(lines)
    md_path = rd.root / "report.md"
    md_path.write_text(md)
    html_path = rd.root / "report.html"
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
