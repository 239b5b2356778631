"""The inference table: every served exchange in a database, written off the request path.

The API a server uses (no web framework needed to import this module)::

    from tao_core.table import InferenceTable

    table = InferenceTable.open(url)   # None: SQLite $TAO_HOME/inference.db; a path; or any SQLAlchemy URL
    table.log({                          # returns at once and never raises; the writer thread stores it
        "request_id": "chatcmpl-1", "request_time": datetime.now(UTC), "status_code": 200,
        "execution_ms": 84.0, "request_json": body, "response_json": response,
        "served_model": "tiny", "model_version": "r3", "requester": "key-1", "tag": None,
        "client_request_id": None, "prompt_token_ids": [...],
        "completion_token_ids": [[...], ...], "completion_logprobs": [[...], ...], "policy_version": "r3",
    })
    table.log_feedback("chatcmpl-1", rating=1.0)   # or preferred_choice=2; TaoInputError on bad values
    table.stats()   # {"logged", "written", "queued", "dropped", "sampled_out", "rejected",
                    #  "rejected_reasons", "failed", "last_error", "batches"}
    table.close()                                  # at shutdown: writes everything still queued

A record's keys are the ``exchanges`` columns (:data:`~tao_core.table_schema.EXCHANGE_COLUMNS`), all but
``request_id`` optional; bodies are the parsed JSON objects, token columns hold one list per choice.
The table owns a record once it is logged: do not change it afterwards.

Writes: ``log`` puts the record on a bounded queue (``maxsize``) and returns; a full queue drops the
record and counts it (``stats()["dropped"]``), so logging never blocks or fails a request. One writer
thread takes up to ``batch_size`` records, or what arrived within ``flush_interval`` seconds of the
first, and writes them in one transaction. A malformed record is counted in ``stats()["rejected"]``
with its reason; a batch the database refuses (after three tries) is counted in ``"failed"``.

Loss bound: ``close()`` (and interpreter exit) writes everything queued. A process killed outright
(SIGKILL, OOM) loses only the rows not yet committed: those in the queue and the batch being written,
at most ``maxsize + batch_size`` rows; while the writer keeps up with the traffic that is the last
``flush_interval`` seconds of it plus one commit. Committed rows are whole: each batch is one
transaction. SQLite's ``synchronous=NORMAL`` in WAL mode keeps every commit through a process crash;
only a power loss or OS crash can also roll back the last commits before a checkpoint.

Feedback is rare and written synchronously beside its exchange. Reading (:func:`read_prompts`,
:func:`preference_pairs`), maintenance (``prune``, ``delete``) and importers are below; see
docs/table.md.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tao_core.errors import TaoInputError
from tao_core.table_import import ImportReport, import_gateway_export, import_openai_chat_log
from tao_core.table_read import (
    TablePrompts,
    choice_texts,
    decode_row,
    feedback_pairs,
    read_table_prompts,
    summarize,
)
from tao_core.table_rows import DEFAULT_MAX_BODY_BYTES, BodyPolicy, RejectedRecord, encode_record, sampled
from tao_core.table_schema import (
    ID_LENGTH,
    NAME_LENGTH,
    create_engine,
    exchanges,
    feedback,
    migrate,
    resolve_url,
    to_db_time,
    writing,
)
from tao_core.types import Prompt

__all__ = ["InferenceTable", "UnknownRequestError", "ImportReport", "TablePrompts", "read_prompts",
           "preference_pairs"]

WRITE_TRIES = 3  # tries of one batch before its rows are counted as failed
RETRY_SECONDS = 0.5  # wait before the second try; doubled before each later one
MAX_COMMENT_CHARS = 10_000  # feedback comment length
MAX_REASONS = 100  # distinct rejection reasons kept in stats(); later new ones count under "other"
DELETE_CHUNK = 500  # request ids per DELETE statement (under every dialect's bound-parameter limit)


class UnknownRequestError(TaoInputError):
    """Feedback names a request id the table does not hold (a 404 for the HTTP layer)."""


class _Flush:
    """A marker in the queue: the writer commits what it holds, then sets ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()  # the last item the writer takes


class InferenceTable:
    """One database of exchanges and feedback; see the module docstring. Build with :meth:`open`."""

    def __init__(self, engine: sa.Engine, url: str, *, maxsize: int, batch_size: int, flush_interval: float,
                 sample_fraction: float, policy: BodyPolicy) -> None:
        self.engine, self.url = engine, url
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.sample_fraction, self.policy = sample_fraction, policy
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._last_error: str | None = None
        self._writer: threading.Thread | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        url: str | os.PathLike | None = None,
        *,
        maxsize: int = 10_000,  # records waiting for the writer; more are dropped (and counted)
        batch_size: int = 256,  # records per transaction at most
        flush_interval: float = 1.0,  # seconds a record waits at most for its batch to fill
        sample_fraction: float = 1.0,  # share of requests logged, chosen by a hash of the request id
        store_bodies: bool = True,  # False: no request/response JSON (token columns are still written)
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,  # a longer body is stored as {"truncated": true, "bytes": N}
    ) -> InferenceTable:
        """Open (creating or migrating) the table at ``url``; see :func:`tao_core.table_schema.resolve_url`."""
        checks = [(maxsize >= 1, "maxsize must be at least 1"), (batch_size >= 1, "batch_size must be at least 1"),
                  (flush_interval > 0, "flush_interval must be positive"),
                  (0.0 <= sample_fraction <= 1.0, "sample_fraction must be in [0, 1]"),
                  (max_body_bytes >= 64, "max_body_bytes must be at least 64")]
        for ok, message in checks:
            if not ok:
                raise TaoInputError(f"inference table options: {message}")
        resolved = resolve_url(url)
        engine = create_engine(resolved)
        shown = engine.url.render_as_string(hide_password=True)
        try:
            migrate(engine, where=shown)
        except sa.exc.SQLAlchemyError as e:
            engine.dispose()
            raise TaoInputError(f"{shown}: cannot open the inference table ({type(e).__name__}: {e.args[0]})") from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, shown, maxsize=maxsize, batch_size=batch_size, flush_interval=flush_interval,
                   sample_fraction=sample_fraction, policy=BodyPolicy(store_bodies, max_body_bytes))

    def __enter__(self) -> InferenceTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing exchanges -------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Queue ``record`` for the writer; return at once. Never blocks, never raises (see ``stats``)."""
        try:
            request_id = record.get("request_id") if isinstance(record, dict) else None
            if not isinstance(request_id, str) or not request_id:
                self._reject("missing request_id (a non-empty string)")
            elif not sampled(request_id, self.sample_fraction):
                self._count("sampled_out")
            else:
                self._enqueue(record)
        except Exception as e:  # noqa: BLE001 - logging must never fail a request
            self._reject(f"{type(e).__name__}: {e}")

    def _enqueue(self, record: dict[str, Any]) -> None:
        """Put on the queue under the lock ``close`` takes, so no record slips in behind the writer's stop."""
        with self._lock:
            if self._closed:
                self._counts["dropped"] += 1
                self._last_error = "log() after close(): the record was dropped"
                return
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="tao-inference-table-writer", daemon=True)
                self._writer.start()
                atexit.register(self.close)
            try:
                self._queue.put_nowait((record, time.time()))
                self._counts["logged"] += 1
            except queue.Full:
                self._counts["dropped"] += 1

    def stats(self) -> dict[str, Any]:
        """Counters since open: ``logged`` (accepted onto the queue), ``written`` (committed), ``queued`` (waiting
        now), ``dropped`` (queue full, or logged after close), ``sampled_out``, ``rejected`` (malformed; a count
        per reason in ``rejected_reasons``), ``failed`` (refused by the database; ``last_error``), ``batches``."""
        with self._lock:
            counts = {k: self._counts[k] for k in ("logged", "written", "dropped", "sampled_out", "rejected",
                                                   "failed", "batches")}
            return {**counts, "queued": self._queue.qsize(), "rejected_reasons": dict(self._reasons),
                    "last_error": self._last_error}

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged before this call is committed (or failed); False on timeout."""
        if self._writer is None or not self._writer.is_alive():
            return self._queue.empty()
        marker = _Flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued, stop the writer and release the database; True when nothing was left."""
        with self._lock:
            if self._closed:
                return self._queue.empty()
            self._closed = True
        atexit.unregister(self.close)
        deadline = None if timeout is None else time.monotonic() + timeout
        writer = self._writer
        if writer is not None and writer.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
                writer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Full:
                pass
        done = self._queue.empty() and (writer is None or not writer.is_alive())
        if done:
            self.engine.dispose()
        return done

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _reject(self, reason: str) -> None:
        with self._lock:
            self._counts["rejected"] += 1
            key = reason if reason in self._reasons or len(self._reasons) < MAX_REASONS else "other"
            self._reasons[key] += 1

    def _run(self) -> None:
        """The writer: batches of up to ``batch_size`` records or ``flush_interval`` seconds, one transaction each."""
        batch: list[tuple[Any, float]] = []
        deadline = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()) if batch else None)
            except queue.Empty:
                item = None
            if item is None or item is _STOP or isinstance(item, _Flush):
                self._write(batch)
                batch = []
                if item is _STOP:
                    return
                if isinstance(item, _Flush):
                    item.done.set()
                continue
            if not batch:
                deadline = time.monotonic() + self.flush_interval
            batch.append(item)
            if len(batch) >= self.batch_size:
                self._write(batch)
                batch = []

    def _write(self, batch: list[tuple[Any, float]]) -> None:
        """Encode and insert one batch; never raises (every record ends up written, rejected or failed)."""
        rows: dict[str, dict[str, Any]] = {}
        for record, received_at in batch:
            try:
                row = encode_record(record, received_at, self.policy, self.sample_fraction)
            except RejectedRecord as e:
                self._reject(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a record must not stop the writer
                self._reject(f"{type(e).__name__}: {e}")
                continue
            if row["request_id"] in rows:
                self._reject("request_id logged twice")
            else:
                rows[row["request_id"]] = row
        if not rows:
            return
        for attempt in range(WRITE_TRIES):
            try:
                with writing(self.engine) as conn:
                    conn.execute(sa.insert(exchanges), list(rows.values()))
                self._count("written", len(rows))
                self._count("batches")
                return
            except sa.exc.IntegrityError:
                self._write_one_by_one(list(rows.values()))
                return
            except Exception as e:  # noqa: BLE001 - the database may be down; retry, then count as failed
                self._last_error = f"{type(e).__name__}: {e}"
                if attempt + 1 < WRITE_TRIES:
                    time.sleep(RETRY_SECONDS * 2**attempt)
        self._count("failed", len(rows))

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        """A batch with a conflicting row: insert each row on its own so only the conflicting ones are left out."""
        for row in rows:
            try:
                with writing(self.engine) as conn:
                    conn.execute(sa.insert(exchanges), [row])
                self._count("written")
            except sa.exc.IntegrityError:
                self._reject("request_id already in the table")
            except Exception as e:  # noqa: BLE001
                self._last_error = f"{type(e).__name__}: {e}"
                self._count("failed")
        self._count("batches")

    # -- feedback ----------------------------------------------------------------------------------

    def log_feedback(self, request_id: str, rating: float | None = None, preferred_choice: int | None = None,
                     comment: str | None = None, source: str | None = None) -> int:
        """Store feedback on an exchange now; return its id. Bad values raise TaoInputError, an unknown id
        :class:`UnknownRequestError`. A rating rates choice ``preferred_choice`` when both are given, else
        choice 0; a preferred choice prefers that choice over every other choice of the request."""
        _check_feedback(request_id, rating, preferred_choice, comment, source)
        row = {"request_id": request_id, "time": to_db_time(datetime.now(UTC)),
               "rating": None if rating is None else float(rating), "preferred_choice": preferred_choice,
               "comment": comment, "source": source}
        for attempt in range(2):
            with writing(self.engine) as conn:
                found = conn.execute(sa.select(exchanges.c.response_json, exchanges.c.completion_token_ids)
                                     .where(exchanges.c.request_id == request_id)).first()
                if found is not None:
                    _check_choice(request_id, preferred_choice, found)
                    return int(conn.execute(sa.insert(feedback).values(**row)).inserted_primary_key[0])
            if attempt == 0 and not self.flush(timeout=self.flush_interval + 10.0):
                break  # the exchange may still be queued behind a stalled writer
        why = ("it was not logged: sample_fraction is " f"{self.sample_fraction}"
               if not sampled(request_id, self.sample_fraction) else
               "no exchange with this id was logged, or it was pruned or deleted")
        raise UnknownRequestError(f"feedback: unknown request_id {request_id!r} ({why})")

    # -- reading and maintenance -------------------------------------------------------------------

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The stored exchange, JSON columns parsed and times as aware UTC datetimes; None when absent."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(exchanges).where(exchanges.c.request_id == request_id)).first()
        return None if row is None else decode_row(row._mapping)

    def feedback_for(self, request_id: str) -> list[dict[str, Any]]:
        """The feedback rows of one exchange, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(feedback).where(feedback.c.request_id == request_id)
                                .order_by(feedback.c.id)).all()
        return [decode_row(r._mapping) for r in rows]

    def prompts(self, since: datetime | None = None, tag: str | None = None, model: str | None = None,
                requester: str | None = None, limit: int | None = None) -> TablePrompts:
        """:func:`read_prompts` on this table, with the rows left out and why."""
        return read_table_prompts(self.engine, since=since, tag=tag, model=model, requester=requester, limit=limit)

    def preference_pairs(self, rating_threshold: float = 0.5) -> list[dict[str, Any]]:
        """:func:`preference_pairs` on this table."""
        return feedback_pairs(self.engine, rating_threshold)

    def summary(self) -> dict[str, Any]:
        """What the table holds: counts, time range, rows per model and version, feedback, schema version."""
        return {"url": self.url, **summarize(self.engine)}

    def prune(self, before: datetime) -> int:
        """Delete exchanges (and their feedback) whose request_time is before ``before``; return how many."""
        if not isinstance(before, datetime):
            raise TaoInputError(f"prune: 'before' must be a datetime, got {type(before).__name__}")
        old = sa.select(exchanges.c.request_id).where(exchanges.c.request_time < to_db_time(before))
        with writing(self.engine) as conn:
            conn.execute(sa.delete(feedback).where(feedback.c.request_id.in_(old)))
            return conn.execute(sa.delete(exchanges).where(exchanges.c.request_time < to_db_time(before))).rowcount

    def delete(self, request_ids: Iterable[str]) -> int:
        """Delete these exchanges and their feedback (one transaction); return how many exchanges were found."""
        ids = list(dict.fromkeys(request_ids))
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise TaoInputError(f"delete: request ids must be strings, got {bad[:5]}")
        deleted = 0
        with writing(self.engine) as conn:
            for start in range(0, len(ids), DELETE_CHUNK):
                chunk = ids[start:start + DELETE_CHUNK]
                conn.execute(sa.delete(feedback).where(feedback.c.request_id.in_(chunk)))
                deleted += conn.execute(sa.delete(exchanges).where(exchanges.c.request_id.in_(chunk))).rowcount
        return deleted

    def import_openai_chat_log(self, path: str | os.PathLike, *, tag: str | None = None,
                               on_error: str = "raise") -> ImportReport:
        """Import a JSONL of ``{"messages": [...]}`` conversations; see :mod:`tao_core.table_import`."""
        return import_openai_chat_log(self.engine, self.policy, path, tag=tag, on_error=on_error)

    def import_gateway_export(self, path: str | os.PathLike, *, tag: str | None = None,
                              on_error: str = "raise") -> ImportReport:
        """Import a Databricks AI Gateway inference-table export; see :mod:`tao_core.table_import`."""
        return import_gateway_export(self.engine, self.policy, path, tag=tag, on_error=on_error)


def _check_feedback(request_id: Any, rating: Any, preferred_choice: Any, comment: Any, source: Any) -> None:
    def bad(message: str) -> TaoInputError:
        return TaoInputError(f"feedback: {message}")

    if not isinstance(request_id, str) or not request_id or len(request_id) > ID_LENGTH:
        raise bad(f"'request_id' must be a non-empty string of at most {ID_LENGTH} characters, got {request_id!r:.80}")
    if rating is None and preferred_choice is None:
        raise bad("give a 'rating' or a 'preferred_choice' (or both)")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int | float)
                               or not float("-inf") < rating < float("inf")):
        raise bad(f"'rating' must be a finite number, got {rating!r:.80}")
    if preferred_choice is not None and (isinstance(preferred_choice, bool) or not isinstance(preferred_choice, int)
                                         or preferred_choice < 0):
        raise bad(f"'preferred_choice' must be a choice index (an integer >= 0), got {preferred_choice!r:.80}")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS or "\x00" in comment):
        raise bad(f"'comment' must be text of at most {MAX_COMMENT_CHARS} characters without NUL")
    if source is not None and (not isinstance(source, str) or len(source) > NAME_LENGTH or "\x00" in source):
        raise bad(f"'source' must be text of at most {NAME_LENGTH} characters without NUL")


def _check_choice(request_id: str, preferred_choice: int | None, found: sa.Row) -> None:
    """A preferred choice must exist in the stored response (or its token columns) when either was stored."""
    if preferred_choice is None:
        return
    n = len(choice_texts(found.response_json)) or len(_loads_or(found.completion_token_ids, []))
    if n and preferred_choice >= n:
        raise TaoInputError(f"feedback: 'preferred_choice' {preferred_choice} is out of range: request "
                            f"{request_id!r} has {n} choice(s), numbered from 0")


def _loads_or(text: str | None, default: Any) -> Any:
    try:
        return default if text is None else json.loads(text)
    except ValueError:
        return default


def read_prompts(url: str | os.PathLike | None, since: datetime | None = None, tag: str | None = None,
                 model: str | None = None, requester: str | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts of the table's successful exchanges, oldest first, for a round (see :mod:`tao_core.table_read`)."""
    with InferenceTable.open(url) as table:
        return table.prompts(since=since, tag=tag, model=model, requester=requester, limit=limit).prompts


def preference_pairs(url: str | os.PathLike | None, rating_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Preference pairs from the table's feedback, as rows of the ``tao rm train --pairs`` JSONL file."""
    with InferenceTable.open(url) as table:
        return table.preference_pairs(rating_threshold)
