"""A throwaway PostgreSQL server for the tests: found (or installed from the Debian package), given a
cluster of its own in a fresh temp dir, started on a free loopback port, and stopped and removed at
the end of the session. The session fixture ``postgres_url`` is registered in tests/conftest.py.

- ``TAO_TEST_POSTGRES_URL``: use that (empty) database instead; nothing is installed or started.
- ``TAO_TEST_POSTGRES_BIN``: the folder holding ``initdb``, ``pg_ctl`` and ``postgres``; only there.
  Without it: the folder of ``pg_ctl`` on ``PATH``, else the newest ``/usr/lib/postgresql/*/bin``.
- ``TAO_TEST_POSTGRES_NO_INSTALL=1``: never run ``apt-get`` (otherwise, as root with apt-get and no
  server found, ``apt-get install postgresql`` runs once, bounded in time).
- ``CI=true``: a server that cannot be found, installed or started fails the tests that need it;
  elsewhere they are skipped with the reason.

The server runs as the ``postgres`` user when we are root (postgres refuses to run as root), listens
on 127.0.0.1 only, and takes a password generated for the session (scram-sha-256); its unix socket
lies in the temp dir. A watchdog process holds a pipe from this one: when the pipe closes (the
session ends, fails, is interrupted or killed) it stops the server (``pg_ctl stop -m fast``) and
removes the dir, so no server outlives the test run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import pytest

ENV_URL = "TAO_TEST_POSTGRES_URL"
ENV_BIN = "TAO_TEST_POSTGRES_BIN"
ENV_NO_INSTALL = "TAO_TEST_POSTGRES_NO_INSTALL"
SYSTEM_ROOT = Path("/usr/lib/postgresql")  # the Debian package's /usr/lib/postgresql/<major>/bin
BINARIES = ("initdb", "pg_ctl", "postgres")
SERVER_USER = "postgres"  # the user the server runs as when we are root (the Debian package makes it)
DATABASE = "taotest"
INSTALL_TIMEOUT_S = 300  # per apt-get command; installing the package takes well under a minute
START_TIMEOUT_S = 60  # initdb, and pg_ctl start waiting until the server accepts connections
STOP_TIMEOUT_S = 30  # pg_ctl stop -m fast; the postmaster is killed after it


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found, installed or started; the message says why."""


def is_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _complete(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in BINARIES)


def find_bindir(environ: Mapping[str, str] = os.environ, system_root: Path = SYSTEM_ROOT) -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None.

    Raises PostgresUnavailable when ``TAO_TEST_POSTGRES_BIN`` names a folder that lacks them."""
    if environ.get(ENV_BIN):
        folder = Path(environ[ENV_BIN])
        if not _complete(folder):
            raise PostgresUnavailable(f"{ENV_BIN}={folder} does not hold executable {', '.join(BINARIES)}; "
                                      f"point it at a PostgreSQL bin folder or unset it")
        return folder
    on_path = shutil.which("pg_ctl", path=environ.get("PATH", os.defpath))
    if on_path and _complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    versions = sorted(system_root.glob("*/bin"), reverse=True,
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])
    return next((folder for folder in versions if _complete(folder)), None)


def install_server(environ: Mapping[str, str] = os.environ, timeout_s: float = INSTALL_TIMEOUT_S) -> None:
    """``apt-get install -y --no-install-recommends postgresql``, after an ``apt-get update`` when
    the first try fails (a fresh machine has no package lists). Raises PostgresUnavailable."""
    env = {**environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    output = ""
    for cmd in (install, ["apt-get", "update"], install):
        try:
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PostgresUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s") from None
        output = (done.stdout + done.stderr)[-2000:]
        if done.returncode == 0 and cmd is install:
            return
        if done.returncode != 0 and cmd is not install:
            break
    raise PostgresUnavailable(f"`{' '.join(install)}` failed; its output ends:\n{output}")


def ensure_bindir(environ: Mapping[str, str] = os.environ, system_root: Path = SYSTEM_ROOT) -> Path:
    """find_bindir, installing the Debian package when allowed. Raises PostgresUnavailable."""
    found = find_bindir(environ, system_root)
    if found:
        return found
    missing = (f"no PostgreSQL server found ({', '.join(BINARIES)} neither beside pg_ctl on PATH nor in "
               f"{system_root}/*/bin)")
    if environ.get(ENV_NO_INSTALL, "") not in ("", "0"):
        raise PostgresUnavailable(f"{missing} and {ENV_NO_INSTALL} is set, so it is not installed")
    if os.geteuid() != 0 or not shutil.which("apt-get", path=environ.get("PATH", os.defpath)):
        raise PostgresUnavailable(f"{missing}; install it (Debian: apt-get install postgresql), set {ENV_BIN} "
                                  f"to its bin folder, or set {ENV_URL} to an empty database")
    install_server(environ)
    found = find_bindir(environ, system_root)
    if not found:
        raise PostgresUnavailable(f"apt-get installed postgresql, but still {missing}")
    return found


def _as_server_user() -> dict:
    """subprocess arguments that run a command as the server's user: postgres when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no {SERVER_USER!r} user to run the server "
                                  f"as (postgres refuses root); the Debian package postgresql creates it") from None
    return {"user": SERVER_USER, "group": SERVER_USER, "extra_groups": []}


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s, start_new_session=True, **_as_server_user())
    except subprocess.TimeoutExpired:
        raise PostgresUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise PostgresUnavailable(f"`{' '.join(cmd)}` exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_postmaster(pid_file: Path) -> int | None:
    """The pid of the server whose pid file this is; None when there is none (or a single-user
    backend of initdb, which writes its pid negated)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return pid if pid > 0 else None


def stop_and_remove(bindir: Path, root: Path, timeout_s: float = START_TIMEOUT_S + STOP_TIMEOUT_S) -> None:
    """Stop the server whose cluster lies in ``root/data`` (fast shutdown; its postmaster is killed
    when that fails) and remove ``root``, again while an interrupted initdb still writes into it."""
    deadline = time.monotonic() + timeout_s
    failed = None
    while root.exists() and time.monotonic() < deadline:
        pid = _running_postmaster(root / "data" / "postmaster.pid")
        if pid:
            try:
                _run([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S),
                      "stop"], root, STOP_TIMEOUT_S + 10)
            except PostgresUnavailable as err:
                failed = err
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            time.sleep(0.2)
    if root.exists():
        raise PostgresUnavailable(f"{root} could not be removed within {timeout_s:.0f} s")
    if failed:
        raise failed


class PostgresServer:
    """A PostgreSQL cluster of its own in a temp dir, served on 127.0.0.1:``port``; ``stop()`` ends
    it, and so does the end of this process, however it ends (the watchdog)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="tao-pg-"))
        self._watchdog = subprocess.Popen([sys.executable, __file__, "watch", str(bindir), str(self.root)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://{SERVER_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, bindir: Path, database: str = DATABASE) -> PostgresServer:
        """initdb a fresh cluster, start it, wait until it accepts connections, create ``database``.
        Raises PostgresUnavailable (and leaves nothing behind)."""
        server = cls(bindir)
        try:
            server._initdb()
            server._serve()
            server._create_database(database)
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self) -> None:
        user = _as_server_user()
        if user:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if user:
            shutil.chown(pwfile, SERVER_USER, SERVER_USER)
        _run([str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", SERVER_USER, "--pwfile", str(pwfile),
              "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C", "--no-sync",
              "--no-instructions"], self.root, START_TIMEOUT_S)
        pwfile.unlink()

    def _serve(self, tries: int = 3) -> None:
        """pg_ctl start on a free port (another one when a race took it), waiting until ready."""
        for attempt in range(tries):
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                       f"-c synchronous_commit=off -c full_page_writes=off")
            log = self.root / "server.log"
            try:
                _run([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(log), "-o", options,
                      "-w", "-t", str(START_TIMEOUT_S), "start"], self.root, START_TIMEOUT_S + 10)
                return
            except PostgresUnavailable as err:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                if "already in use" not in text or attempt == tries - 1:
                    raise PostgresUnavailable(f"{err}\nserver log ({log}) ends:\n{text}") from None

    def _create_database(self, database: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT",
                                  connect_args={"connect_timeout": 10})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
        except sa.exc.SQLAlchemyError as err:
            raise PostgresUnavailable(f"the server on 127.0.0.1:{self.port} started, but creating the database "
                                      f"{database!r} failed: {err}") from None
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Stop the server and remove its dir (the watchdog does it when its pipe closes)."""
        if self._watchdog.returncode is not None:
            return
        out, _ = self._watchdog.communicate(timeout=STOP_TIMEOUT_S + 30)
        if self._watchdog.returncode != 0:
            raise RuntimeError(f"stopping the test PostgreSQL server in {self.root} failed: {out.decode(errors='replace')}")


def _watch(bindir: Path, root: Path) -> int:
    """The watchdog: wait until the test process closes our stdin (or dies), then clean up."""
    sys.stdin.buffer.read()
    try:
        stop_and_remove(bindir, root)
    except Exception as err:  # reported through the exit status and, when someone reads it, stdout
        try:
            print(err, flush=True)
        except OSError:
            pass
        return 1
    return 0


def give_up(err: PostgresUnavailable) -> NoReturn:
    """Fail the test under ``CI=true``, skip it elsewhere, with the reason."""
    reason = f"PostgreSQL tests need a server: {err}"
    if is_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    """The SQLAlchemy URL of an empty PostgreSQL database for this session: ``TAO_TEST_POSTGRES_URL``
    when set, else a server this fixture starts (and stops at the end of the session). Skips with the
    reason when none can be had, or fails under ``CI=true``."""
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    try:
        server = PostgresServer.start(ensure_bindir())
    except PostgresUnavailable as err:
        give_up(err)
    try:
        yield server.url()
    finally:
        server.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    sys.exit(_watch(Path(sys.argv[2]), Path(sys.argv[3])))
