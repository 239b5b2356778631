"""``tao keys create|list|revoke``: the API keys ``tao serve`` accepts (:mod:`tao_core.serve.keys`)."""

from __future__ import annotations

import click

from tao_core.errors import TaoError
from tao_core.serve.keys import KeyStore, parse_rate_limit

_KEYS_HELP = "The key store file (default: $TAO_HOME/keys.json); the same as tao serve --keys."


@click.group("keys")
def keys_group() -> None:
    """API keys for tao serve: stored hashed; a running server sees changes at its next request."""


@keys_group.command("create")
@click.option("--name", required=True, help="Who or what the key is for (shown by tao keys list).")
@click.option("--admin", is_flag=True, help="An admin key: /admin/* as well as /v1/*.")
@click.option("--rate-limit", default=None,
              help="This key's requests per minute, N or N/min (0: unlimited; default: tao serve --rate-limit).")
@click.option("--keys", "keys_path", default=None, help=_KEYS_HELP)
def create_cmd(name: str, admin: bool, rate_limit: str | None, keys_path: str | None) -> None:
    """Make a key and print it once: only its hash is stored, so copy it now."""
    store = KeyStore(keys_path)
    try:
        limit = parse_rate_limit(rate_limit, "--rate-limit")
    except TaoError as e:
        raise click.BadParameter(str(e), param_hint="--rate-limit") from None
    try:
        entry, key = store.create(name, "admin" if admin else "api", limit)
    except TaoError as e:
        raise click.ClickException(str(e)) from None
    click.echo(key)
    click.echo(f"created {entry.role} key {entry.id} ({entry.name!r}) in {store.path}; the key above is shown only "
               "now: clients send it as 'Authorization: Bearer KEY'", err=True)


@keys_group.command("list")
@click.option("--keys", "keys_path", default=None, help=_KEYS_HELP)
def list_cmd(keys_path: str | None) -> None:
    """Show the stored keys: id, role, rate limit, created, status and name (never a key)."""
    store = KeyStore(keys_path)
    try:
        keys = store.load()
    except TaoError as e:
        raise click.ClickException(str(e)) from None
    if not keys:
        click.echo(f"no keys in {store.path} (tao keys create --name NAME makes one)", err=True)
        return
    click.echo(f"{'id':<17} {'role':<6} {'rate/min':<9} {'created':<26} {'status':<8} name")
    for k in keys:
        rate = "server" if k.rate_limit is None else ("none" if k.rate_limit == 0 else str(k.rate_limit))
        status = "active" if k.active else "revoked"
        click.echo(f"{k.id:<17} {k.role:<6} {rate:<9} {k.created:<26} {status:<8} {k.name}")


@keys_group.command("revoke")
@click.argument("key_id")
@click.option("--keys", "keys_path", default=None, help=_KEYS_HELP)
def revoke_cmd(key_id: str, keys_path: str | None) -> None:
    """Revoke KEY_ID (an id from tao keys list): a running server refuses it from its next request on."""
    store = KeyStore(keys_path)
    try:
        entry = store.revoke(key_id)
    except TaoError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"revoked {entry.id} ({entry.name!r}) at {entry.revoked} in {store.path}")
