"""``tao serve MODEL``: the OpenAI-compatible server on uvicorn, logging every exchange to the inference table."""

from __future__ import annotations

import click

from tao_core.errors import TaoInputError
from tao_core.serve.auth import check_binding
from tao_core.serve.keys import KeyStore, LiveKeys, parse_rate_limit
from tao_core.serve.settings import ServeConfig

_D = ServeConfig  # the defaults shown by --help are the dataclass's


@click.command("serve")
@click.argument("model")
@click.option("--host", default=_D.host, show_default=True,
              help="Address to bind (loopback: this machine only; any other needs an API key in the key store).")
@click.option("--port", type=int, default=_D.port, show_default=True)
@click.option("--max-queue", type=int, default=_D.max_queue, show_default=True,
              help="Requests waiting for the engine at most; one more is answered 429 with Retry-After.")
@click.option("--max-tokens-limit", type=int, default=_D.max_tokens_limit, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--threads", type=int, default=None, help="CPU threads for the engine (torch.set_num_threads).")
@click.option("--served-model", default=None, help="Model id clients send (default: MODEL as given).")
@click.option("--model-version", default=_D.model_version, show_default=True,
              help="Version of MODEL, the first one served (POST /admin/reload serves the next); every logged "
                   "exchange names the version that answered it.")
@click.option("--max-n", type=int, default=_D.max_n, show_default=True, help="Largest n per request.")
@click.option("--default-max-tokens", type=int, default=_D.default_max_tokens, show_default=True,
              help="max_tokens of a chat request that gives none.")
@click.option("--max-body-bytes", type=int, default=_D.max_body_bytes, show_default=True,
              help="Larger request bodies are answered 413.")
@click.option("--max-kv-tokens", type=int, default=None, help="The engine's KV-cache capacity in tokens.")
@click.option("--pack-weights/--no-pack-weights", default=_D.pack_weights, show_default=True,
              help="float32 CPU: multiply by oneDNN-packed copies of the weights (a second copy in memory, about a "
                   "fifth less time per decode step).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Torch device of the model (cpu, cuda, cuda:1).")
@click.option("--table", "table_url", default=None,
              help="Inference table: a SQLite file path or a SQLAlchemy URL (default: $TAO_HOME/inference.db).")
@click.option("--no-table", is_flag=True, help="Log no exchanges.")
@click.option("--table-sample", type=float, default=1.0, show_default=True, help="Share of exchanges logged.")
@click.option("--table-no-bodies", is_flag=True, help="Log token ids and metadata, not request/response bodies.")
@click.option("--tag", default=None, help="Tag every logged exchange (e.g. an A/B arm).")
@click.option("--keys", "keys_path", default=None, help="The API key store (default: $TAO_HOME/keys.json; tao keys).")
@click.option("--rate-limit", default=f"{_D.rate_limit}/min", show_default=True,
              help="Requests per minute per API key (per client address when open), unless the key has its own; "
                   "0: unlimited.")
def serve_cmd(model: str, host: str, port: int, max_queue: int, max_tokens_limit: int, threads: int | None,
              served_model: str | None, model_version: str, max_n: int, default_max_tokens: int, max_body_bytes: int,
              max_kv_tokens: int | None, pack_weights: bool, dtype: str, device: str, table_url: str | None, no_table: bool,
              table_sample: float, table_no_bodies: bool, tag: str | None, keys_path: str | None,
              rate_limit: str) -> None:
    """Serve MODEL over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions) and continuous batching."""
    try:
        import uvicorn

        from tao_core.serve.app import create_app
    except ImportError as e:
        raise click.ClickException(f"tao serve needs the serve extra ({e.name} is missing): "
                                   "pip install 'tao-core[serve]'") from None
    import torch

    from tao_core.models import load_model
    from tao_core.serve.threads import in_passing_thread
    from tao_core.table import InferenceTable

    if threads is not None:
        if threads < 1:
            raise click.BadParameter("must be >= 1", param_hint="--threads")
        torch.set_num_threads(threads)
    config = ServeConfig(host=host, port=port, served_model=served_model or model, model_version=model_version,
                         tag=tag, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                         default_max_tokens=min(default_max_tokens, max_tokens_limit), max_n=max_n,
                         max_body_bytes=max_body_bytes, max_kv_tokens=max_kv_tokens, pack_weights=pack_weights, keys=keys_path,
                         rate_limit=_rate(rate_limit))
    store = KeyStore(keys_path)
    try:
        check_binding(host, store)  # before the model loads; create_app checks again
        keyed = LiveKeys(store).has_api_key()
    except TaoInputError as e:
        raise click.ClickException(str(e)) from None
    table = None if no_table else InferenceTable.open(table_url, sample_fraction=table_sample,
                                                      store_bodies=not table_no_bodies)
    try:  # torch work off the main thread, which then runs the event loop (tao_core.serve.threads)
        app = in_passing_thread(lambda: create_app(load_model(model, dtype=dtype, device=device), config,
                                                   logger=table), name="tao-serve-load")
    except BaseException:
        if table is not None:
            table.close()
        raise
    where = "no table" if table is None else f"table {table.url}"
    access = f"API keys of {store.path}" if keyed else f"open to this machine until {store.path} holds an API key"
    click.echo(f"serving {config.served_model!r} (version {model_version}) at http://{host}:{port}/v1; {where}; "
               f"{access}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(config.drain_timeout_s))


def _rate(text: str) -> int:
    try:
        return parse_rate_limit(text, "--rate-limit") or 0
    except TaoInputError as e:
        raise click.BadParameter(str(e), param_hint="--rate-limit") from None
