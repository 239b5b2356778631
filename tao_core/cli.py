"""The ``tao`` command line. Plugins add commands through ``tao_register_commands``."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from tao_core.errors import TaoError
from tao_core.plugins import KINDS, PluginManager, get_plugin_manager

RANKED_COMMANDS = {"run"}  # the commands that run on several ranks under torchrun (docs/distributed.md)


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

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        world = os.environ.get("WORLD_SIZE", "1").strip()
        if cmd is not None and name not in RANKED_COMMANDS and world not in ("", "1", "0"):
            raise TaoError(f"`tao {name}` runs in one process, but WORLD_SIZE={world} says a launcher (torchrun) "
                           f"started it on several ranks: start it without torchrun (only `tao run` runs on "
                           f"several ranks; see docs/distributed.md)")
        return name, cmd, rest

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
@click.option("--generator", "generator_name", default=None,
              help="A registered generator (tao plugins lists them) [default: none, plain samples from the model's sampler].")
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
    """``--set KEY=VALUE`` items as ``{dotted key: value}`` (:func:`tao_core.options.parse_key_values`)."""
    from tao_core.options import parse_key_values

    return parse_key_values(items, flag="--set")


def _print_tasks(before: dict, after: dict) -> None:
    """Each task's held-out value before and after, when the evaluations are per task (a mixture's ``tasks``)."""
    tasks = after.get("tasks", {})
    for name, b in before.get("tasks", {}).items():
        if name in tasks:
            a = tasks[name]
            click.echo(f"  {name} {b['metric']}: {b['value']:.3f} -> {a['value']:.3f} ({a['value'] - b['value']:+.3f}, "
                       f"n={a['n']})")


def _print_result(result) -> None:
    b, a = result.before, result.after
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"held-out {b['metric']} before: {b['value']:.3f}  [{b['ci_low']:.3f}, {b['ci_high']:.3f}]  (n={b['n']})")
    click.echo(f"held-out {a['metric']} after:  {a['value']:.3f}  [{a['ci_low']:.3f}, {a['ci_high']:.3f}]  "
               f"(best at step {a['step']})")
    _print_tasks(b, a)
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
    """Run TAO from a TOML config: rounds of generate -> score -> train -> evaluate.

    Under torchrun (`torchrun --nproc-per-node N -m tao_core.cli run CONFIG`) each process is one
    rank of a data-parallel run (docs/distributed.md)."""
    from tao_core import pipeline
    from tao_core.config import load_config
    from tao_core.distributed import main_process

    if resume_dir:
        if config or overrides:
            raise click.UsageError("--resume takes the run's saved config; give no CONFIG or --set")
        result = pipeline.resume(resume_dir)
        if main_process():
            _print_result(result)
        return
    if not config:
        raise click.UsageError("give a CONFIG file or --resume RUN_DIR")
    parsed = parse_overrides(overrides)
    if output_dir is not None:
        parsed["output_dir"] = output_dir
    cfg = load_config(config, parsed)
    result = pipeline.run(cfg)  # under torchrun: every rank runs, rank 0 alone prints
    if main_process():
        _print_result(result)
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
    _print_tasks(b, a)
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


DEMO_RECIPE = "arithmetic/demo"  # `tao demo` with no RECIPE (a documented alias: the README's demo)
LABEL_FREE_RECIPE = "arithmetic/label-free"  # `tao demo --label-free`


@cli.command("demo")
@click.argument("recipe", required=False, default=None, metavar="[RECIPE]")
@click.option("--label-free", is_flag=True, help=f"Alias of RECIPE = {LABEL_FREE_RECIPE}.")
@click.option("--list", "list_only", is_flag=True, help="List the recipes of the installed tasks and exit.")
@click.option("--output-dir", default=None,
              help="Run directory [default: the recipe's output_dir]; one an earlier `tao demo` made is "
                   "replaced, any other non-empty one refused.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None,
              help="Optimizer steps in all, a multiple of the recipe's rounds [default: the recipe's].")
@click.option("--scorer", default=None, help="Alias of --set score.scorer=NAME.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=1e-5 (value parsed as TOML).")
def demo_cmd(recipe: str | None, label_free: bool, list_only: bool, output_dir: str | None, steps: int | None,
             scorer: str | None, overrides: tuple[str, ...]) -> None:
    """Run a named recipe of a task plugin on the embedded model [default RECIPE: arithmetic/demo].

    `tao demo` is TAO with a verifier on two-digit addition (held-out accuracy before and after);
    `tao demo label-free` (or --label-free) the same without any answer checked. `tao demo --list`
    shows every installed recipe; `tao run FILE` runs a recipe's file as any config.
    """
    from tao_core.recipes import find_recipe

    if list_only:
        if recipe or label_free or steps or scorer or overrides or output_dir:
            raise click.UsageError("--list takes no other argument")
        _list_recipes()
        return
    if label_free:
        if recipe is not None:
            raise click.UsageError("--label-free names the recipe; give no RECIPE with it")
        if scorer is not None:
            raise click.UsageError("--label-free sets its own scorer; leave out --scorer")
    found = find_recipe(LABEL_FREE_RECIPE if label_free else recipe or DEMO_RECIPE)
    parsed = parse_overrides(overrides)
    if scorer is not None:
        parsed["score.scorer"] = scorer
    if output_dir is not None:
        parsed["output_dir"] = output_dir
    _run_recipe(found, parsed, steps)


def _list_recipes() -> None:
    from tao_core.recipes import list_recipes

    recipes, problems = list_recipes(with_problems=True)
    for r in recipes:
        click.echo(f"{r.qualified:<28} {r.path}\n    {r.summary()}")
    for problem in problems:
        click.echo(f"skipped: {problem}", err=True)


def _run_recipe(found, parsed: dict, steps: int | None) -> None:
    """Check the recipe's config (with overrides) and load the model, then replace an earlier demo's
    directory and run: nothing on disk changes before both succeeded."""
    from tao_core import pipeline
    from tao_core.config import load_config
    from tao_core.models import load_model
    from tao_core.report import write_report
    from tao_core.rundir import RunDir

    cfg = load_config(found.path, parsed)
    if steps is not None:
        if "steps_per_round" in parsed:
            raise click.UsageError("give --steps or --set steps_per_round, not both")
        if steps % cfg.rounds:
            raise click.UsageError(f"--steps {steps} is not a multiple of the recipe's {cfg.rounds} rounds")
        cfg = load_config(found.path, {**parsed, "steps_per_round": steps // cfg.rounds})
    lm = load_model(cfg.model, sampler=cfg.generate.sampler)
    # Only now, with the config valid and the model loaded: empty the directory if an earlier
    # `tao demo` made it (its marker says so); any other non-empty directory is refused, never deleted.
    RunDir(cfg.output_dir).claim("run", replace=True, info={"recipe": "demo"}).release()
    click.echo(f"tao demo {found.qualified}: {cfg.task} on {cfg.model}, {cfg.rounds} round(s) x {cfg.steps_per_round} "
               f"steps of {cfg.prompts_per_step} prompts x {cfg.generate.n} candidates, scorer "
               f"{cfg.score.scorer or 'the task default'}, objective {cfg.train.objective or 'the task default'}")
    result = pipeline.run(cfg, lm=lm)
    _print_result(result)
    md, _ = write_report(cfg.output_dir)
    click.echo(f"report: {md}")


from tao_core.flywheel import flywheel_cmd  # noqa: E402 (torch, FastAPI and plugins load when it runs)
from tao_core.serve.cli import serve_cmd  # noqa: E402 (torch and FastAPI load when it runs)
from tao_core.serve.keys_cli import keys_group  # noqa: E402 (no torch or FastAPI)
from tao_core.table_cli import table_group  # noqa: E402 (its commands import the table lazily)

cli.add_command(serve_cmd)
cli.add_command(table_group)
cli.add_command(keys_group)
cli.add_command(flywheel_cmd)


def main() -> None:
    cli(prog_name="tao")


if __name__ == "__main__":
    main()
