"""``tao table``: prune, delete, import and summarize the inference table (see docs/table.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from tao_core.errors import TaoInputError

TABLE_HELP = ("Inference table: a SQLite file path or a SQLAlchemy URL (postgresql+psycopg://...); "
              "default: $TAO_HOME/inference.db.")


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC (a date means its midnight)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TaoInputError(f"{option} {text!r}: not an ISO 8601 date or time; write e.g. 2025-01-31 or "
                            "2025-01-31T12:00:00+00:00") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@click.group("table")
def table_group() -> None:
    """The inference table of served exchanges and their feedback."""


@table_group.command("prune")
@click.option("--before", required=True, help="Delete exchanges (and their feedback) that arrived before this "
                                              "ISO 8601 date or time (UTC unless it names a zone).")
@click.option("--table", "url", default=None, help=TABLE_HELP)
def table_prune(before: str, url: str | None) -> None:
    """Delete the exchanges older than a date, with their feedback."""
    from tao_core.table import InferenceTable

    when = parse_time(before, "--before")
    with InferenceTable.open(url) as table:
        n = table.prune(when)
    click.echo(f"deleted {n} exchange(s) from before {when.isoformat()} from {table.url}")


@table_group.command("delete")
@click.argument("request_ids", nargs=-1, required=True)
@click.option("--table", "url", default=None, help=TABLE_HELP)
def table_delete(request_ids: tuple[str, ...], url: str | None) -> None:
    """Delete exchanges by request id, with their feedback."""
    from tao_core.table import InferenceTable

    with InferenceTable.open(url) as table:
        n = table.delete(request_ids)
    wanted = len(set(request_ids))
    click.echo(f"deleted {n} of {wanted} exchange(s) from {table.url}"
               + ("" if n == wanted else f"; {wanted - n} request id(s) were not in the table"))


@table_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["openai-chat", "gateway"]), required=True,
              help="openai-chat: rows of {\"messages\": [...]}; gateway: a Databricks AI Gateway inference-table export.")
@click.option("--tag", default=None, help="Tag every imported exchange (filter rounds with it).")
@click.option("--skip-bad-rows", is_flag=True, help="Import the good rows and list the bad ones instead of stopping.")
@click.option("--table", "url", default=None, help=TABLE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def table_import(file: str, fmt: str, tag: str | None, skip_bad_rows: bool, url: str | None, as_json: bool) -> None:
    """Import exchanges from a chat log or an AI Gateway export (rows already in the table are skipped)."""
    from tao_core.table import InferenceTable

    on_error = "skip" if skip_bad_rows else "raise"
    with InferenceTable.open(url) as table:
        if fmt == "openai-chat":
            report = table.import_openai_chat_log(file, tag=tag, on_error=on_error)
        else:
            report = table.import_gateway_export(file, tag=tag, on_error=on_error)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    for line, why in report.skipped:
        click.echo(f"skipped {file}:{line}: {why}", err=True)
    click.echo(f"imported {report.imported} exchange(s) from {file} into {table.url} "
               f"({report.already_present} already present, {len(report.skipped)} bad row(s) skipped)")


@table_group.command("stats")
@click.option("--table", "url", default=None, help=TABLE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def table_stats(url: str | None, as_json: bool) -> None:
    """What the table holds: exchanges, feedback, time range, rows per model and version."""
    from tao_core.table import InferenceTable

    with InferenceTable.open(url) as table:
        summary = table.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['url']} (schema version {summary['schema_version']})")
    click.echo(f"exchanges: {summary['exchanges']}  feedback: {summary['feedback']}")
    if summary["exchanges"]:
        click.echo(f"request_time: {summary['first_request_time']} .. {summary['last_request_time']}")
    for row in summary["per_model"]:
        click.echo(f"  {row['served_model'] or '-'} {row['model_version'] or '-'}: {row['exchanges']}")
