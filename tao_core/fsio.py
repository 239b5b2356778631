"""Durable file writes through one seam, and named fault points for crash tests.

Every byte a run writes to its run directory (metrics lines, checkpoint files, manifests, the
``latest`` pointer, config and marker files) goes through :func:`write_file` or
:func:`append_line`, which both end in :func:`_write_all`: the one place a test injects write
errors (``ENOSPC``, ``EIO``) and the one place a torn write can be simulated.

Durability: :func:`write_file` writes a temporary name in the same directory, fsyncs it and
renames it over the target, so a reader sees the old or the new bytes, never a mix. Any
``OSError`` (``ENOSPC``, ``EIO``, ``EACCES``) becomes a :class:`~tao_core.errors.TaoWriteError`
naming the file; the temporary file is removed and the target keeps its old bytes. ``append_line`` fsyncs after each line; a kill mid-append leaves at most one torn last
line, which :meth:`tao_core.rundir.RunDir.read_metrics` tolerates.

Fault points: ``TAO_FAULT=NAME[:K]`` makes the K-th (default first) arrival of this process at
:func:`fault_point` ``NAME`` kill the process with ``SIGKILL``. It costs one dict lookup when
unset. ``NAME`` may also be a written file's name (``metrics.jsonl``), in which case the process
writes half of the bytes and then dies: a torn write. Tests use it to kill a run at fixed places
inside each stage; users never need it.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from tao_core.errors import TaoWriteError

_FAULT_ENV = "TAO_FAULT"
_arrivals: dict[str, int] = {}


def _fault_spec() -> tuple[str, int] | None:
    raw = os.environ.get(_FAULT_ENV)
    if not raw:
        return None
    name, _, count = raw.partition(":")
    return name, int(count) if count else 1


def _arrive(name: str) -> bool:
    spec = _fault_spec()
    if spec is None or spec[0] != name:
        return False
    _arrivals[name] = _arrivals.get(name, 0) + 1
    return _arrivals[name] == spec[1]


def fault_point(name: str) -> None:
    """Kill this process here when ``TAO_FAULT`` names this point (see the module docstring)."""
    if _arrive(name):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write every byte of ``data`` to ``fd``: the seam all tao file writes pass through."""
    if _arrive(path.name):  # a torn write: half the bytes reach the disk, then the process dies
        os.write(fd, data[: len(data) // 2])
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _failed(path: Path, e: OSError) -> TaoWriteError:
    code = errno.errorcode.get(e.errno or 0, "?")
    return TaoWriteError(e.errno, f"cannot write {path}: {e.strerror or e} [{code}]")


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` durably: a complete, fsynced temporary file renamed into place.

    ``mode`` (e.g. ``0o600`` for secrets) is the file's exact permission bits, whatever the umask;
    None creates it ``0o644`` less the umask."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    target = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all(fd, data, path)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(target, path)
        fsync_dir(path.parent)
    except OSError as e:
        target.unlink(missing_ok=True)
        raise _failed(path, e) from e


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) and fsync it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _write_all(fd, (line + "\n").encode("utf-8"), path)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _failed(path, e) from e
