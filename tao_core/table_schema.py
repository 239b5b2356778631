"""The inference table's schema, its migrations and the database engine (SQLAlchemy 2.0 Core).

Two tables, named after Databricks' AI Gateway inference tables where they overlap:

- ``exchanges``: one row per served request (see :data:`EXCHANGE_COLUMNS` for each column);
- ``feedback``: ratings and preferred choices that point at an exchange's ``request_id``.

Timestamps are stored as UTC without a zone (portable across SQLite and PostgreSQL) and handed back
as aware UTC ``datetime``s. JSON values (request and response bodies, token ids, log-probs) are
stored as JSON text, so every dialect stores them the same way and a reader gets back the very
bytes that were written.

Schema versions: the ``schema_version`` table holds one row, the version of the schema the database
was last migrated to. :data:`MIGRATIONS` lists ``(version, step)`` in order; opening a database runs
every step above its version in one transaction, so a failed migration leaves the old schema and its
rows untouched. A step only adds (tables, columns with a default, indexes): rows are never rewritten.
A database newer than this code is refused rather than written with an older schema.

Engines: ``sqlite:///PATH`` (a plain path is taken as a SQLite file) runs in WAL journal mode with
``synchronous=NORMAL``, foreign keys on and a 30 s busy timeout; each transaction starts with
``BEGIN`` (or ``BEGIN IMMEDIATE`` for a writer, so two writers queue on the busy timeout instead of
failing on a lock upgrade). Any other SQLAlchemy URL (``postgresql+psycopg://...``) is used as given;
the queries are SQLAlchemy Core expressions with no dialect-specific SQL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tao_core.errors import TaoInputError

DEFAULT_FILE = "inference.db"  # under $TAO_HOME
SQLITE_BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another writer's lock before failing
ID_LENGTH = 128  # request ids: the server's ids are ~40 characters; clients' ids are cut to this
NAME_LENGTH = 256  # model names, requester key ids, tags, feedback sources

metadata = sa.MetaData()

EXCHANGE_COLUMNS: dict[str, str] = {
    "request_id": "the server's id for the request (primary key), e.g. 'chatcmpl-...'",
    "client_request_id": "an id the client sent with the request, if any",
    "request_time": "when the request arrived (UTC)",
    "status_code": "the HTTP status answered",
    "execution_ms": "time from arrival to the last byte of the answer, in milliseconds",
    "request_json": "the request body as JSON text (NULL when bodies are not stored)",
    "response_json": "the response body as JSON text (for a stream: the assembled completion object)",
    "served_model": "the model name the request was served by",
    "model_version": "the served model's version (which promoted round answered)",
    "requester": "the API key id that made the request",
    "tag": "a free label for filtering rounds (e.g. an A/B arm or an import batch)",
    "prompt_token_ids": "JSON array of the prompt's token ids",
    "completion_token_ids": "JSON array with one array of token ids per choice",
    "completion_logprobs": "JSON array with one array per choice: each sampled token's log-prob",
    "policy_version": "the version of the weights that sampled the tokens (for off-policy training)",
    "sampling_fraction": "the share of requests that was being logged when this row was (schema v2)",
}

def _exchange_columns_v1() -> list[sa.Column]:
    """The ``exchanges`` columns of schema v1 (frozen: a later version adds columns by migration)."""
    return [
        sa.Column("request_id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("client_request_id", sa.String(NAME_LENGTH)),
        sa.Column("request_time", sa.DateTime(), nullable=False, index=True),
        sa.Column("status_code", sa.Integer),
        sa.Column("execution_ms", sa.Float),
        sa.Column("request_json", sa.Text),
        sa.Column("response_json", sa.Text),
        sa.Column("served_model", sa.String(NAME_LENGTH)),
        sa.Column("model_version", sa.String(NAME_LENGTH)),
        sa.Column("requester", sa.String(NAME_LENGTH)),
        sa.Column("tag", sa.String(NAME_LENGTH)),
        sa.Column("prompt_token_ids", sa.Text),
        sa.Column("completion_token_ids", sa.Text),
        sa.Column("completion_logprobs", sa.Text),
        sa.Column("policy_version", sa.String(NAME_LENGTH)),
    ]


def _feedback_table_v1(md: sa.MetaData) -> sa.Table:
    """The ``feedback`` table of schema v1; a row needs a rating or a preferred choice."""
    return sa.Table(
        "feedback", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(ID_LENGTH), sa.ForeignKey("exchanges.request_id"), nullable=False,
                  index=True),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("rating", sa.Float),
        sa.Column("preferred_choice", sa.Integer),
        sa.Column("comment", sa.Text),
        sa.Column("source", sa.String(NAME_LENGTH)),
        sa.CheckConstraint("rating IS NOT NULL OR preferred_choice IS NOT NULL", name="feedback_has_a_value"),
    )


def _sampling_fraction_column() -> sa.Column:
    return sa.Column("sampling_fraction", sa.Float, server_default=sa.text("1.0"))


# The current schema, which the queries use: v1 plus every column a later migration added.
exchanges = sa.Table("exchanges", metadata, *_exchange_columns_v1(), _sampling_fraction_column())
feedback = _feedback_table_v1(metadata)
schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))


def _v1_create(conn: sa.Connection) -> None:
    """v1: the exchanges table (without ``sampling_fraction``) and the feedback table."""
    v1 = sa.MetaData()
    sa.Table("exchanges", v1, *_exchange_columns_v1())
    _feedback_table_v1(v1)
    v1.create_all(conn)


def _v2_sampling_fraction(conn: sa.Connection) -> None:
    """v2: ``exchanges.sampling_fraction`` (rows logged before it count as fully sampled, 1.0)."""
    add_column(conn, "exchanges", _sampling_fraction_column())


def add_column(conn: sa.Connection, table: str, column: sa.Column) -> None:
    """``ALTER TABLE ... ADD COLUMN`` in the connection's dialect: keeps every row; old rows get the default."""
    ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {ddl}"))


Migration = Callable[[sa.Connection], None]
MIGRATIONS: list[tuple[int, Migration]] = [(1, _v1_create), (2, _v2_sampling_fraction)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: sa.Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(sa.select(schema_version.c.version)).scalar()
    return int(version or 0)


def migrate(engine: sa.Engine, target: int = SCHEMA_VERSION, where: str = "") -> int:
    """Bring the database up to ``target`` (every pending step in one transaction); return the version.

    Two processes opening a new database at once: on SQLite the immediate transaction makes the second
    wait for the first; elsewhere the loser's transaction fails and the version it then reads decides.
    """
    for attempt in range(2):
        try:
            with writing(engine) as conn:
                version = current_version(conn)
                if version > SCHEMA_VERSION:
                    raise TaoInputError(
                        f"{where}: the inference table has schema version {version}, but this tao knows "
                        f"versions up to {SCHEMA_VERSION}; upgrade tao to use this table")
                if version < target:
                    for step_version, step in MIGRATIONS:
                        if version < step_version <= target:
                            step(conn)
                    schema_version.create(conn, checkfirst=True)
                    conn.execute(sa.delete(schema_version))
                    conn.execute(sa.insert(schema_version).values(version=target))
                    version = target
                return version
        except sa.exc.DBAPIError:
            if attempt:
                raise
            with engine.connect() as conn:
                if current_version(conn) >= target:
                    return current_version(conn)
    raise AssertionError("unreachable")


def tao_home() -> Path:
    """``$TAO_HOME`` or ``~/.cache/tao``: the same root as :func:`tao_core.models.tao_home` (tested to agree),
    without importing torch with the model loader."""
    return Path(os.environ.get("TAO_HOME") or Path.home() / ".cache" / "tao")


def resolve_url(url: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL: the default SQLite file under ``$TAO_HOME``, a plain path as a SQLite file, or ``url``."""
    if url is None:
        url = tao_home() / DEFAULT_FILE
    text = os.fspath(url)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return text


def create_engine(url: str) -> sa.Engine:
    """An engine for ``url`` (see the module docstring); a bad URL or missing driver is a TaoInputError."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise TaoInputError(f"--table {url!r}: not a database URL or a file path; give a SQLite file path "
                            "or a SQLAlchemy URL such as postgresql+psycopg://user@host/db") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise TaoInputError(f"{shown}: an in-memory SQLite database is private to one connection, and the "
                            "table's writer thread has its own; give a file path")
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    except (ImportError, sa.exc.NoSuchModuleError) as e:
        raise TaoInputError(f"{shown}: cannot load the database driver ({e}); install it (for PostgreSQL: "
                            "pip install 'psycopg[binary]' and use postgresql+psycopg://...)") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: sa.Engine) -> None:
    """WAL, synchronous=NORMAL, foreign keys, busy timeout; transactions begun by us, not by pysqlite."""

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # pysqlite would otherwise BEGIN lazily and skip DDL
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("tao_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def writing(engine: sa.Engine):
    """``engine.begin()`` for a transaction that writes (``BEGIN IMMEDIATE`` on SQLite)."""
    return engine.execution_options(tao_write=True).begin()


def to_db_time(value: datetime) -> datetime:
    """An aware or naive-UTC ``datetime`` as naive UTC, the way the table stores it."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def from_db_time(value: datetime | None) -> datetime | None:
    """A stored timestamp as an aware UTC ``datetime``."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
