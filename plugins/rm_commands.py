"""``tao rm``: reward-model commands (``tao rm train``), registered through ``tao_register_commands``."""

from __future__ import annotations

import json

import click

from tao_core.config import PRECISIONS
from tao_core.errors import TaoError


@click.group("rm")
def rm_group() -> None:
    """Reward models: train a scalar reward model for the reward-model scorer."""


@rm_group.command("train")
@click.option("--pairs", default=None, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt" or "messages", "chosen", "rejected"} rows.')
@click.option("--from-table", "from_table", default=None, metavar="URL",
              help="Instead of --pairs: the preference pairs the feedback in this inference table makes "
                   "(a SQLAlchemy URL or SQLite file; `tao serve`'s default is $TAO_HOME/inference.db).")
@click.option("--rating-threshold", "rating_threshold", type=float, default=0.5, show_default=True,
              help="--from-table: a choice rated above it is preferred over one rated below it.")
@click.option("--base", required=True, help="Causal LM to start from: alias, cache name, GGUF file or HF directory.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write the reward model to.")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the training pairs.")
@click.option("--lr", type=float, default=1e-5, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", "batch_size", type=int, default=8, show_default=True, help="Pairs per optimizer step.")
@click.option("--max-length", "max_length", type=int, default=1024, show_default=True,
              help="Tokens per sequence; longer prompts are cut from the left.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the head, the held-out split and shuffling.")
@click.option("--eval-fraction", "eval_fraction", type=float, default=0.1, show_default=True,
              help="Share of pairs held out for pairwise accuracy.")
@click.option("--weight-decay", "weight_decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", "max_grad_norm", type=float, default=1.0, show_default=True,
              help="Clip the gradient norm to this; 0 disables clipping.")
@click.option("--device", default="cpu", show_default=True, help="Torch device to train on.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="As train.precision: auto = bf16 autocast on a bf16-capable GPU, fp32 on the CPU.")
@click.option("--micro-batch-tokens", "micro_batch_tokens", type=int, default=None,
              help="Padded tokens of one forward/backward (2 x pairs x longest sequence); default: the whole batch.")
@click.option("--log-every", "log_every", type=int, default=10, show_default=True,
              help="Optimizer steps between lines in metrics.jsonl.")
@click.option("--skip-bad-rows", "skip_bad_rows", is_flag=True, help="Leave out bad rows (listed) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def rm_train(pairs: str | None, from_table: str | None, rating_threshold: float, base: str, output: str,
             skip_bad_rows: bool, overwrite: bool, as_json: bool, **settings) -> None:
    """Train a Bradley-Terry reward model on preference pairs and report held-out pairwise accuracy."""
    import tempfile

    from tao_plugins.reward_training import RMTrainConfig, train_reward_model

    if (pairs is None) == (from_table is None):
        raise click.UsageError("give --pairs FILE or --from-table URL (one of them)")
    with tempfile.TemporaryDirectory(prefix="tao-rm-pairs-") as tmp:
        try:
            if from_table is not None:
                pairs = _table_pairs(from_table, rating_threshold, tmp)
            result = train_reward_model(pairs, base, output, RMTrainConfig(**settings), skip_bad_rows=skip_bad_rows,
                                        overwrite=overwrite, progress=not as_json)
        except TaoError as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if from_table is not None:
        click.echo(f"{result.n_train + result.n_eval} preference pairs from the feedback in {from_table}")
    for line, why in result.skipped:
        click.echo(f"skipped {pairs}:{line}: {why}", err=True)

    def pct(x: float | None) -> str:
        return "n/a (no held-out pairs)" if x is None else f"{100 * x:.1f}%"

    click.echo(f"trained on {result.n_train} pairs ({len(result.skipped)} skipped) in {result.seconds:.1f}s; "
               f"final loss {result.final_loss:.4f}")
    click.echo(f"held-out pairwise accuracy ({result.n_eval} pairs): {pct(result.accuracy_before)} before -> "
               f"{pct(result.accuracy)} after")
    click.echo(f"wrote {result.output}  (use it with the reward-model scorer: path={result.output})")


def _table_pairs(url: str, rating_threshold: float, tmp: str) -> str:
    """The feedback of inference table ``url`` as a pairs JSONL file in ``tmp``; an error when it makes none."""
    from tao_core.errors import TaoInputError
    from tao_core.table import preference_pairs
    from tao_core.types import write_jsonl

    rows = preference_pairs(url, rating_threshold)
    if not rows:
        raise TaoInputError(f"{url}: its feedback makes no preference pair (a preferred choice of a request with "
                            f"n > 1, or two choices rated above and below {rating_threshold}); send feedback to "
                            "POST /v1/feedback first")
    path = f"{tmp}/pairs.jsonl"
    write_jsonl(path, rows)
    return path
