"""The ``tao`` command line. Plugins add commands through ``tao_register_commands``."""

from __future__ import annotations

import json
import sys
import time

import click

from tao_core.errors import TaoError
from tao_core.plugins import KINDS, PluginManager, get_plugin_manager

# The README demo: sized to finish within 15 minutes on a 2-core CPU.
DEMO_STEPS = 40
DEMO_CONFIG = {
    "task": "arithmetic",
    "model": "smollm2-135m",
    "rounds": 2,
    "prompts_per_step": 8,
    "eval_limit": 128,
    "checkpoint_every": 10,
    "generate": {"n": 8, "temperature": 1.0, "max_new_tokens": 32},
    "train": {"objective": "grpo", "lr": 2e-5},
}
# `tao demo --label-free`: no answer is ever checked. Each prompt gets 4 on-policy samples under the
# task's own prompt (temperature 1) and 8 "voters": the same model asked under two structured
# prompts that spell out written addition (temperature 0.3). The voters' majority answer, when at
# least half of them agree, scores the on-policy samples (majority-vote with `voters`); the voters
# themselves are never trained on (off-policy).
STRUCTURED_TEMPLATES = {
    "tens": "{question} First add the tens, then add the ones, then add the two results. "
            "Give the final answer on the last line as 'Answer: <number>'.",
    "column": "{question} Add the numbers column by column, starting with the ones digits and carrying "
              "when needed. Give the final answer on the last line as 'Answer: <number>'.",
}
LABEL_FREE_CONFIG = {
    **DEMO_CONFIG,
    "prompts_per_step": 16,
    "generate": {
        "generator": "diverse", "n": 12, "temperature": 1.0, "max_new_tokens": 32,
        "options": {"templates": ["default", *STRUCTURED_TEMPLATES], "temperatures": [1.0],
                    "template_temperatures": {name: 0.3 for name in STRUCTURED_TEMPLATES},
                    "extra_templates": STRUCTURED_TEMPLATES},
    },
    "score": {"scorer": "majority-vote", "options": {"voters": list(STRUCTURED_TEMPLATES), "min_share": 0.5}},
    "train": {"objective": "grpo", "lr": 1e-5},
}
LABEL_FREE_STEPS = 20  # measured: the best held-out accuracy comes at step 10; the policy drifts after


class TaoGroup(click.Group):
    """Root group: built-in commands plus whatever plugins register, loaded on first lookup.

    A built-in command always wins: a plugin command of the same name is an error of that plugin,
    shown by ``tao plugins`` and at the end of ``tao --help`` with every other plugin problem.
    """

    def plugin_manager(self) -> PluginManager:
        """The process-wide plugin manager, with this group's built-in command names reserved."""
        pm = get_plugin_manager()
        pm.reserve("commands", self.commands, owner="a built-in tao command")
        return pm

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.plugin_manager().registry.names("commands")})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        builtin = super().get_command(ctx, name)
        if builtin is not None:
            return builtin
        entry = self.plugin_manager().registry.lookup("commands", name)  # a duplicate name raises
        return entry.obj if entry is not None else None

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        infos = self.plugin_manager().plugin_infos()
        problems = [(i.name, line) for i in infos for line in (i.error or "").splitlines()]
        if problems:
            with formatter.section("Plugin errors (details: tao plugins)"):
                formatter.write_dl(problems)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TaoError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=TaoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tao-core", prog_name="tao")
def cli() -> None:
    """tao: tune a language model from unlabeled prompts (generate, score, train, repeat)."""


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, version, hooks, registers[, error]}.")
def plugins_cmd(as_json: bool) -> None:
    """List installed plugins, their versions and what they register."""
    infos = cli.plugin_manager().plugin_infos()
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    for info in infos:
        click.echo(f"{info.name} {info.version or ''}".rstrip())
        for problem in (info.error or "").splitlines():
            click.echo(f"  FAILED: {problem}")
        for kind in KINDS:
            if info.registers.get(kind):
                click.echo(f"  {kind}: {', '.join(info.registers[kind])}")


@cli.group("models")
def models_group() -> None:
    """Imported models and the embedded default."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    """List models in the cache ($TAO_HOME/models) and embedded aliases."""
    from tao_core.models import list_models, models_dir

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"# cache: {models_dir()}")
    for r in rows:
        size = f"{r['size_mb']} MB" if r["size_mb"] is not None else "-"
        click.echo(f"{r['name']:<24} {size:>10}  {r['source'] or r['path']}")


@models_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Name to load it by later (letters, digits, . _ -).")
@click.option("--overwrite", is_flag=True, help="Replace an existing import of the same name.")
def models_import(path: str, name: str, overwrite: bool) -> None:
    """Dequantize a GGUF file into the cache as safetensors + tokenizer."""
    from tao_core.models import import_gguf

    start = time.time()
    dest = import_gguf(path, name, overwrite=overwrite)
    click.echo(f"imported {path} as {name!r} -> {dest} ({time.time() - start:.1f}s)")


def sampling_options(f):
    """The SamplingParams fields as CLI flags (same names as the API and the TOML config)."""
    opts = [
        click.option("--n", type=int, default=1, show_default=True, help="Candidates per prompt."),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", "top_k", type=int, default=0, show_default=True, help="0 disables."),
        click.option("--top-p", "top_p", type=float, default=1.0, show_default=True),
        click.option("--min-p", "min_p", type=float, default=0.0, show_default=True),
        click.option("--max-new-tokens", "max_new_tokens", type=int, default=128, show_default=True),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop token id (repeatable)."),
        click.option("--seed", type=int, default=None),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command("generate")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True, help="Alias, cache name, GGUF file or HF dir.")
@click.option("--prompt", "texts", multiple=True, help="A prompt text (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), help="Prompt file (JSONL, CSV or Parquet).")
@click.option("--column", default=None, help="Column holding the prompt text in --prompts.")
@click.option("--generator", "generator_name", default="sample", show_default=True, help="Registered generator.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write candidates as JSONL here (default: stdout).")
@sampling_options
def generate_cmd(model_spec, texts, prompts_file, column, generator_name, output, **sampling) -> None:
    """Sample candidates from a model and print them as JSONL."""
    from tao_core.api import generate
    from tao_core.data import load_prompts
    from tao_core.types import Prompt, SamplingParams, write_jsonl

    prompts = [Prompt(id=f"p{i}", text=t) for i, t in enumerate(texts)]
    if prompts_file:
        prompts += load_prompts(prompts_file, column=column)
    if not prompts:
        raise click.UsageError("give at least one --prompt or a --prompts file")
    sampling["stop"], sampling["stop_token_ids"] = list(sampling["stop"]), list(sampling["stop_token_ids"])
    groups = generate(prompts, SamplingParams(**sampling), model=model_spec, generator=generator_name)
    cands = [c for g in groups for c in g]
    if output:
        write_jsonl(output, cands)
        click.echo(f"wrote {len(cands)} candidates to {output}", err=True)
    else:
        for c in cands:
            click.echo(json.dumps(c.to_dict(), ensure_ascii=False))


def parse_overrides(items) -> dict:
    """``--set KEY=VALUE`` items as ``{dotted key: value}``, each value parsed as TOML (else a string)."""
    import tomllib

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw
    return parsed


def _print_result(result) -> None:
    b, a = result.before, result.after
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"held-out {b['metric']} before: {b['value']:.3f}  [{b['ci_low']:.3f}, {b['ci_high']:.3f}]  (n={b['n']})")
    click.echo(f"held-out {a['metric']} after:  {a['value']:.3f}  [{a['ci_low']:.3f}, {a['ci_high']:.3f}]  "
               f"(best at step {a['step']})")
    click.echo(f"tuning time: {result.tuning_seconds / 60:.1f} min over {result.steps} steps "
               f"(generate + score + train; evaluation and checkpoints excluded)")
    for w in result.warnings:
        click.echo(f"warning: {w}")


@cli.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=1e-5 (value parsed as TOML).")
@click.option("--output-dir", default=None, help="Run directory (overrides output_dir).")
def run_cmd(config, resume_dir, overrides, output_dir) -> None:
    """Run TAO from a TOML config: rounds of generate -> score -> train -> evaluate."""
    from tao_core import pipeline
    from tao_core.config import load_config

    if resume_dir:
        if config or overrides:
            raise click.UsageError("--resume takes the run's saved config; give no CONFIG or --set")
        _print_result(pipeline.resume(resume_dir))
        return
    if not config:
        raise click.UsageError("give a CONFIG file or --resume RUN_DIR")
    parsed = parse_overrides(overrides)
    if output_dir is not None:
        parsed["output_dir"] = output_dir
    cfg = load_config(config, parsed)
    _print_result(pipeline.run(cfg))
    click.echo(f"report: tao report {cfg.output_dir}")


@cli.command("sft")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--examples", type=int, default=None,
              help="Labeled examples (default: the prompts the TAO run consumes, rounds x steps_per_round x "
                   "prompts_per_step).")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the examples.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=1e-5 (value parsed as TOML).")
@click.option("--output-dir", "-o", "output_dir", default=None,
              help="SFT run directory (default: the config's output_dir with '-sft' appended).")
@click.option("--eval-each-epoch/--no-eval-each-epoch", default=True, show_default=True,
              help="Evaluate on the held-out split after every epoch (always before and at the end).")
def sft_cmd(config, examples, epochs, overrides, output_dir, eval_each_epoch) -> None:
    """Supervised fine-tuning on labeled training prompts: the baseline TAO is compared against.

    Reads the same TOML config as `tao run` (task, model, train.lr, prompts_per_step as the batch,
    eval_limit, ...) and trains on the task's labeled responses; see `tao report RUN --sft SFT_DIR`.
    """
    from tao_core.api import sft

    result = sft(config, examples=examples, epochs=epochs, overrides=parse_overrides(overrides),
                 output_dir=output_dir, eval_each_epoch=eval_each_epoch)
    b, a = result.before, result.after
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"labeled examples: {result.examples} x {result.epochs} epoch(s), {result.steps} steps")
    click.echo(f"held-out {b['metric']} before: {b['value']:.3f}  [{b['ci_low']:.3f}, {b['ci_high']:.3f}]  (n={b['n']})")
    click.echo(f"held-out {a['metric']} after:  {a['value']:.3f}  [{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    click.echo(f"tuning time: {result.tuning_seconds / 60:.1f} min (training steps; evaluation excluded)")


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--sft", "sft_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="An SFT run directory (`tao sft`) to compare against (repeatable).")
def report_cmd(run_dir, sft_dirs) -> None:
    """Write RUN_DIR/report.md and report.html with PNG plots."""
    from tao_core.report import write_report

    md_path, html_path = write_report(run_dir, sft_dirs=list(sft_dirs))
    click.echo(f"wrote {md_path} and {html_path}")


@cli.command("demo")
@click.option("--output-dir", default=None,
              help="Run directory; one an earlier `tao demo` made is replaced, any other non-empty one "
                   "refused [default: runs/demo, runs/demo-label-free].")
@click.option("--steps", type=int, default=None,
              help=f"Optimizer steps, 2 rounds [default: {DEMO_STEPS}; {LABEL_FREE_STEPS} with --label-free].")
@click.option("--scorer", default="arithmetic-check", show_default=True,
              help="arithmetic-check (verifier) or majority-vote (naive label-free: collapses, see README).")
@click.option("--label-free", is_flag=True,
              help="No verifier: on-policy samples are scored by the model's own structured-prompt consensus.")
def demo_cmd(output_dir: str | None, steps: int | None, scorer: str, label_free: bool) -> None:
    """TAO on the embedded SmolLM2-135M: two-digit addition, held-out accuracy before and after."""
    from tao_core import pipeline
    from tao_core.config import RunConfig, from_dict, validate
    from tao_core.rundir import RunDir

    if label_free and scorer != "arithmetic-check":
        raise click.UsageError("--label-free sets its own scorer; leave out --scorer")
    base = LABEL_FREE_CONFIG if label_free else {**DEMO_CONFIG, "score": {"scorer": scorer}}
    if steps is not None and steps < 1:
        raise click.UsageError(f"--steps must be >= 1, got {steps}")
    if steps is None:
        steps = LABEL_FREE_STEPS if label_free else DEMO_STEPS
    if output_dir is None:
        output_dir = "runs/demo-label-free" if label_free else "runs/demo"
    cfg = from_dict(RunConfig, {**base, "output_dir": output_dir, "steps_per_round": max(1, steps // 2)})
    validate(cfg)
    # Only now, with the config valid: empty the directory if an earlier `tao demo` made it (its
    # marker says so); any other non-empty directory is refused, never deleted.
    RunDir(output_dir).claim("run", replace=True, info={"recipe": "demo"}).release()
    click.echo(f"tao demo: {cfg.task} on {cfg.model}, {cfg.rounds} rounds x {cfg.steps_per_round} steps of "
               f"{cfg.prompts_per_step} prompts x {cfg.generate.n} candidates, scorer {cfg.score.scorer}, "
               f"objective {cfg.train.objective}")
    result = pipeline.run(cfg)
    _print_result(result)
    from tao_core.report import write_report

    md, _ = write_report(output_dir)
    click.echo(f"report: {md}")


def main() -> None:
    cli(prog_name="tao")


if __name__ == "__main__":
    main()
