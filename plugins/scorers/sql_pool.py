"""Worker processes that run untrusted SQL for ``sql-exec``, with limits that hold.

Queries never run in the caller's process. A :class:`SqlPool` keeps up to ``processes`` (2)
long-lived workers. Each is a fresh interpreter (``sys.executable -c``, as ``spawn`` starts one),
never a fork of a trainer holding gigabytes, and unlike multiprocessing's ``spawn`` and
``forkserver`` it does not re-import the caller's main module (a script without a
``__main__`` guard would run again). The defaults (:class:`SqlLimits`):

- **memory**: each worker sets ``RLIMIT_AS`` to its address space at start-up plus ``memory_mb``
  (512 MiB) where ``/proc/self/statm`` tells that size (Linux), so a big sort fails with "out of
  memory" inside the worker; temporary tables stay in that memory (``temp_store = MEMORY``), never
  on disk. (SQLite's ``hard_heap_limit`` is not used: its accounting doubles the cost of a query.)
- **time**: a progress handler stops a query after ``timeout_s`` (1 s) of wall time, checked
  between VM opcodes. Before each query the worker writes its index and start time to a page it
  shares with the caller; the caller kills the worker (``SIGKILL``, then reaps it) once a query
  has run ``timeout_s + 0.5 s``, which also stops one long C-level call (``instr`` over 200 KB
  strings) that never reaches an opcode boundary. A worker's soft ``RLIMIT_CPU`` is raised before
  each group to its CPU time so far + (``ceil(timeout_s)`` + 1 s) per query, so a worker whose
  caller died cannot spin on.
- **SQLite's own limits**: ``max_length`` (1,000,000 bytes in a string or blob),
  ``max_columns`` (100 in a result or table), ``max_sql_length`` (100,000 bytes of SQL), no
  attached databases; the file is opened read-only (``mode=ro``) and an authorizer allows only
  reads (see ``tao_plugins.scorers.sql``).
- **results**: at most ``max_rows`` (10,000) rows per query and ``max_result_bytes`` (32 MiB, as
  ``sys.getsizeof`` of the rows) for one group's results together; the query that would pass the
  budget stops there with an error, and its rows never leave the worker.

A group's queries go to one worker in one message and come back in one message, so the caller
wakes once per group, not once per query. A query the sandbox stopped (time limit, killed or
dead worker, memory, result budget) gives an :class:`ExecResult` with ``stopped=True``: its result
is unknown, which ``sql-exec`` reports as an error score, never as a 0. After a kill or a death
the group's other queries run again on a fresh worker. A group's wall time is at most its
number of queries x (``timeout_s`` + 0.5 s) plus worker start-ups (about 0.1 s each). Pools are
shared per process and (``processes``, ``memory_mb``), are thread-safe, and stop their workers at exit.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import resource
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import astuple, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_KILL_GRACE_S = 0.5  # the parent kills a worker this long after the progress handler should have fired
_START_TIMEOUT_S = 60.0  # a worker's start-up: a fresh interpreter importing this package, ~0.1 s when idle
_OPEN_CONNECTIONS = 16  # read-only connections a worker keeps open, least recently used closed first
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: RECURSIVE
# Pragmas that only read the schema, as statements (``PRAGMA table_info(t)``). Their table-valued
# forms (``pragma_table_info('t')``) are denied: their first use asks to update sqlite_master.
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer"}  # fts3_tokenizer returns (and sets) raw pointers


@dataclass(frozen=True)
class SqlLimits:
    """The sandbox limits of one query and of one group's queries (see the module docstring)."""

    timeout_s: float = 1.0  # wall time per query: progress handler, then a kill 0.5 s later
    max_rows: int = 10_000  # more rows than this is an error ("row cap")
    max_length: int = 1_000_000  # bytes in any string or blob (SQLITE_LIMIT_LENGTH)
    max_columns: int = 100  # columns in a result set or table (SQLITE_LIMIT_COLUMN)
    max_sql_length: int = 100_000  # bytes of SQL text (SQLITE_LIMIT_SQL_LENGTH)
    max_result_bytes: int = 32 << 20  # bytes of rows (sys.getsizeof) for one group's queries together
    progress_every: int = 10_000  # VM instructions between deadline checks
    memory_mb: int = 512  # a worker's RLIMIT_AS above its start-up address space
    processes: int = 2  # worker processes of the pool these limits use

    def __post_init__(self) -> None:
        bad = [f"{k}={v!r}" for k, v in zip(self.__dataclass_fields__, astuple(self), strict=True) if not v > 0]
        if bad:
            raise ValueError(f"sql-exec: limits must be > 0, got {', '.join(bad)}")


@dataclass
class ExecResult:
    """One query's outcome: ``rows`` when it ran, else ``error``; ``stopped`` when the sandbox cut it short."""

    rows: list[tuple] | None
    error: str | None = None
    seconds: float = 0.0
    stopped: bool = False  # time, memory, result budget or a dead worker: the result is unknown


# ---------------------------------------------------------------------------------------------
# In the worker


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def open_readonly(path: str, limits: SqlLimits) -> sqlite3.Connection:
    """A read-only connection with SQLite's limits set and the authorizer installed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"database {path!r} not found")
    conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limits.max_length)
    conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, limits.max_columns)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, limits.max_sql_length)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorizer)
    return conn


def _address_space() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rows_size(rows: list[tuple]) -> int:
    return sum(sys.getsizeof(r) + sum(map(sys.getsizeof, r)) for r in rows)


def _run_query(conn: sqlite3.Connection, sql: str, limits: SqlLimits, budget: int) -> tuple[ExecResult, int]:
    """Run one query; returns its result and the bytes of rows it kept (counted against ``budget``)."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, limits.progress_every)
    rows: list[tuple] = []
    size = 0
    try:
        cur = conn.execute(sql)
        while chunk := cur.fetchmany(256):
            rows += chunk
            size += _rows_size(chunk)
            if len(rows) > limits.max_rows:
                return ExecResult(None, f"more than {limits.max_rows} rows (row cap)", time.monotonic() - start), 0
            if size > budget:
                return ExecResult(None, f"the group's results passed max_result_bytes={limits.max_result_bytes} "
                                  f"(result budget)", time.monotonic() - start, stopped=True), 0
        return ExecResult(rows, None, time.monotonic() - start), size
    except sqlite3.Error as e:
        msg, stopped = str(e), False
        if msg == "interrupted" and time.monotonic() > deadline:
            msg, stopped = f"time limit of {limits.timeout_s:g} s exceeded", True
        elif "out of memory" in msg:
            msg, stopped = f"{msg} (memory_mb={limits.memory_mb})", True
        return ExecResult(None, f"{type(e).__name__}: {msg}", time.monotonic() - start, stopped), 0
    except MemoryError:
        return ExecResult(None, f"MemoryError: out of memory (memory_mb={limits.memory_mb})",
                          time.monotonic() - start, stopped=True), 0
    except (OverflowError, ValueError) as e:
        return ExecResult(None, f"{type(e).__name__}: {e}", time.monotonic() - start), 0
    finally:
        conn.set_progress_handler(None, 0)
        if conn.in_transaction:
            conn.rollback()


def serve(read_fd: int, write_fd: int, state_fd: int, memory_mb: int) -> None:
    """A worker's life: set its limits, then answer each ``(path, sqls, limits)`` with a list of results
    as tuples (``limits`` None: the same as the last group's; tuples pickle 6x faster than dataclasses)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle; it stops us
    pipe = _Pipe(read_fd, write_fd)
    state = _State(state_fd)
    start_size = _address_space()
    if start_size is not None:
        cap = start_size + (memory_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    conns: OrderedDict[tuple, sqlite3.Connection] = OrderedDict()
    limits = SqlLimits()
    pipe.send("ready")
    while True:
        try:
            msg = pipe.recv()
        except EOFError:
            return
        if msg is None:
            return
        path, sqls, new_limits = msg
        limits = new_limits or limits
        key = (path, limits.max_length, limits.max_columns, limits.max_sql_length)
        if key not in conns:
            try:
                conns[key] = open_readonly(path, limits)
            except (OSError, sqlite3.Error) as e:
                pipe.send([(None, f"cannot open database: {e}", 0.0, False)] * len(sqls))
                continue
            if len(conns) > _OPEN_CONNECTIONS:
                conns.popitem(last=False)[1].close()
        conns.move_to_end(key)
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = math.ceil(used.ru_utime + used.ru_stime) + len(sqls) * (math.ceil(limits.timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu if cpu_hard == resource.RLIM_INFINITY else min(cpu, cpu_hard),
                                                 cpu_hard))
        budget = limits.max_result_bytes
        out = []
        for i, sql in enumerate(sqls):
            state.write(i, time.monotonic())
            result, size = _run_query(conns[key], sql, limits, budget)
            budget -= size
            out.append((result.rows, result.error, result.seconds, result.stopped))
        state.write(-1, 0.0)
        pipe.send(out)


# ---------------------------------------------------------------------------------------------
# In the caller


class _Pipe:
    """Two one-way connections over file descriptors, used as one duplex pipe."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader, self.writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
        self.send, self.recv, self.poll = self.writer.send, self.reader.recv, self.reader.poll

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class _State:
    """The index and start time (``time.monotonic``, one clock for all processes) of a worker's
    current query, in a page the caller and the worker share; index -1 between groups."""

    _FORMAT = struct.Struct("qd")

    def __init__(self, fd: int) -> None:
        self.map = mmap.mmap(fd, self._FORMAT.size)

    def write(self, index: int, started: float) -> None:
        self._FORMAT.pack_into(self.map, 0, index, started)

    def read(self) -> tuple[int, float]:
        while True:  # read until two reads agree: a write may land between the two fields
            first = self._FORMAT.unpack_from(self.map)
            if first == self._FORMAT.unpack_from(self.map):
                return first


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    """A fresh interpreter (never a fork of the caller, and it does not re-run the caller's main module)."""

    def __init__(self, memory_mb: int) -> None:
        down_r, down_w = os.pipe()  # caller -> worker
        up_r, up_w = os.pipe()  # worker -> caller
        with tempfile.TemporaryFile() as f:  # unlinked at once: the shared page needs no name
            os.ftruncate(f.fileno(), _State._FORMAT.size)
            self.state = _State(f.fileno())
            code = (f"from tao_plugins.scorers.sql_pool import serve; "
                    f"serve({down_r}, {up_w}, {f.fileno()}, {memory_mb})")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            try:
                self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(down_r, up_w, f.fileno()),
                                             env=env, stdin=subprocess.DEVNULL)
            finally:
                os.close(down_r)
                os.close(up_w)
        self.pipe = _Pipe(up_r, down_w)
        self.stopped = False
        self.sent_limits: SqlLimits | None = None  # the limits the worker holds
        if not self.pipe.poll(_START_TIMEOUT_S) or self._recv_or_none() != "ready":
            reason = self.stop()
            raise RuntimeError(f"sql-exec: a worker process did not start ({reason})")

    def _recv_or_none(self) -> Any:
        try:
            return self.pipe.recv()
        except EOFError:
            return None

    def run(self, path: str, sqls: list[str], limits: SqlLimits) -> list[ExecResult] | tuple[int, ExecResult]:
        """One result per query; or, when the worker was killed or died, the index of the query it
        was running and that query's result (the worker is then stopped and the others are lost)."""
        self.pipe.send((path, sqls, None if limits is self.sent_limits else limits))
        self.sent_limits = limits
        limit = limits.timeout_s + _KILL_GRACE_S
        wait = limit
        while not self.pipe.poll(wait):
            index, started = self.state.read()
            ran = time.monotonic() - started
            if index >= 0 and ran >= limit:
                self.stop()
                return index, ExecResult(None, f"time limit of {limits.timeout_s:g} s exceeded: the worker was "
                                         f"killed after {ran:.2f} s", ran, stopped=True)
            wait = limit - ran if index >= 0 else limit
        results = self._recv_or_none()
        if results is None:
            index, started = self.state.read()
            reason = self.stop()
            return max(index, 0), ExecResult(None, f"the sql worker process died running this query ({reason}; "
                                             f"memory_mb={limits.memory_mb})", time.monotonic() - started, True)
        return [ExecResult(*r) for r in results]

    @property
    def alive(self) -> bool:
        return not self.stopped and self.proc.poll() is None

    def stop(self, polite: bool = False) -> str:
        """End the process (a stop message when ``polite``, else SIGKILL), reap it, say how it ended."""
        self.stopped = True
        if polite and self.proc.poll() is None:
            try:
                self.pipe.send(None)
                self.proc.wait(1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        reason = _exit_reason(self.proc.wait())
        self.pipe.close()
        self.state.map.close()
        return reason


class SqlPool:
    """Up to ``processes`` reusable workers; :meth:`run` is thread-safe and never raises for a query."""

    def __init__(self, processes: int, memory_mb: int) -> None:
        self.processes = processes
        self.memory_mb = memory_mb
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0
        self._cond = threading.Condition()

    def pids(self) -> list[int]:
        """The process ids of the live workers (for tests and monitoring)."""
        with self._cond:
            return [w.proc.pid for w in [*self._idle, *self._busy]]

    def _checkout(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle and not self._idle[-1].alive:  # died while idle (killed from outside)
                    self._idle.pop().stop()
                if self._idle or len(self._busy) + self._starting < self.processes:
                    break
                self._cond.wait()
            if self._idle:
                w = self._idle.pop()
                self._busy.add(w)
                return w
            self._starting += 1
        try:
            w = _Worker(self.memory_mb)
        finally:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
        with self._cond:
            self._busy.add(w)
        return w

    def _checkin(self, w: _Worker) -> None:
        with self._cond:
            self._busy.discard(w)
            if w.alive:
                self._idle.append(w)
            self._cond.notify()

    def run(self, path: str, sqls: list[str], limits: SqlLimits) -> list[ExecResult]:
        """One result per query, run in order on one worker; after a kill or a death the others run
        again on a fresh worker, without the query that was running."""
        failed: dict[int, ExecResult] = {}
        while todo := [i for i in range(len(sqls)) if i not in failed]:
            try:
                w = self._checkout()
            except (OSError, RuntimeError) as e:
                error = ExecResult(None, f"sql-exec: cannot start a worker: {e}", stopped=True)
                return [failed.get(i, error) for i in range(len(sqls))]
            try:
                got = w.run(path, [sqls[i] for i in todo], limits)
            except OSError as e:  # the pipe broke before the worker took the group
                got = (0, ExecResult(None, f"the sql worker process failed: {e} ({w.stop()})", stopped=True))
            finally:
                self._checkin(w)
            if isinstance(got, list):
                results = dict(zip(todo, got, strict=True)) | failed
                return [results[i] for i in range(len(sqls))]
            failed[todo[got[0]]] = got[1]
        return [failed[i] for i in range(len(sqls))]

    def close(self) -> None:
        """Stop every worker: idle ones politely, busy ones (an abandoned call) by SIGKILL."""
        with self._cond:
            idle, busy = self._idle, list(self._busy)
            self._idle = []
        for w in idle:
            w.stop(polite=True)
        for w in busy:
            if w.alive:
                w.proc.kill()  # the thread that holds it sees the pipe close and reaps it


_POOLS: dict[tuple[int, int, int], SqlPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(limits: SqlLimits) -> SqlPool:
    """This process's pool for these limits' ``processes`` and ``memory_mb``. Keyed by process id too:
    a forked child (``isolation="process"``) starts its own workers instead of sharing its parent's pipes."""
    key = (os.getpid(), limits.processes, limits.memory_mb)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = SqlPool(*key[1:])
        return _POOLS[key]


@atexit.register
def close_pools() -> None:
    """Stop the workers of every pool (run at exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.close()
