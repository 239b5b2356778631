"""The test PostgreSQL server (tests/pg_server.py): finding or installing the binaries (apt-get faked
by a script on PATH), a real server's start and stop, its cleanup when the test process is killed,
and failing instead of skipping under CI=true."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import pg_server
from tests.pg_server import PostgresServer, PostgresUnavailable, ensure_bindir, find_bindir

REPO = Path(__file__).resolve().parents[1]


def _fake_bindir(folder: Path, names=pg_server.BINARIES) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_bin_override_is_the_only_place_looked_and_must_be_complete(tmp_path):
    full = _fake_bindir(tmp_path / "full")
    assert find_bindir({"TAO_TEST_POSTGRES_BIN": str(full), "PATH": ""}, tmp_path / "none") == full
    partial = _fake_bindir(tmp_path / "partial", names=("initdb", "pg_ctl"))
    with pytest.raises(PostgresUnavailable, match="TAO_TEST_POSTGRES_BIN=.*partial does not hold executable"):
        find_bindir({"TAO_TEST_POSTGRES_BIN": str(partial), "PATH": str(full)}, tmp_path / "none")


def test_path_first_then_the_newest_complete_system_version(tmp_path):
    system = tmp_path / "usr-lib-postgresql"
    for version in ("9.6", "13", "15"):
        _fake_bindir(system / version / "bin")
    _fake_bindir(system / "16" / "bin", names=("initdb",))
    assert find_bindir({"PATH": ""}, system) == system / "15" / "bin"
    on_path = _fake_bindir(tmp_path / "local")
    assert find_bindir({"PATH": f"/nonexistent:{on_path}"}, system) == on_path
    assert find_bindir({"PATH": ""}, tmp_path / "empty") is None


def test_nothing_is_installed_when_the_flag_says_so(tmp_path):
    with pytest.raises(PostgresUnavailable, match="TAO_TEST_POSTGRES_NO_INSTALL is set"):
        ensure_bindir({"PATH": "", "TAO_TEST_POSTGRES_NO_INSTALL": "1"}, tmp_path)


def _fake_apt_get(tmp_path: Path, system: Path, *, locates_after_update: bool) -> tuple[dict, Path]:
    """A PATH whose apt-get logs its arguments and, when the package is found, makes the binaries."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    make = " && ".join(f'touch {system}/15/bin/{n} && chmod +x {system}/15/bin/{n}' for n in pg_server.BINARIES)
    (bin_dir / "apt-get").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$DEBIAN_FRONTEND $*" >> {calls}
        if [ "$1" = update ]; then touch {tmp_path}/updated; exit 0; fi
        if [ -e {tmp_path}/updated ] && [ {int(locates_after_update)} = 1 ]; then
            mkdir -p {system}/15/bin && {make}; exit 0
        fi
        echo "E: Unable to locate package postgresql" >&2; exit 100
        """))
    (bin_dir / "apt-get").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}, calls


def test_a_fresh_machine_updates_the_package_lists_and_installs(tmp_path, monkeypatch):
    monkeypatch.setattr(pg_server.os, "geteuid", lambda: 0)
    system = tmp_path / "usr-lib-postgresql"
    env, calls = _fake_apt_get(tmp_path, system, locates_after_update=True)
    assert ensure_bindir(env, system) == system / "15" / "bin"
    install = "noninteractive install -y --no-install-recommends postgresql"
    assert calls.read_text().splitlines() == [install, "noninteractive update", install]


def test_a_failed_install_says_what_apt_get_said(tmp_path, monkeypatch):
    monkeypatch.setattr(pg_server.os, "geteuid", lambda: 0)
    env, _ = _fake_apt_get(tmp_path, tmp_path / "usr-lib-postgresql", locates_after_update=False)
    with pytest.raises(PostgresUnavailable, match="(?s)apt-get install.*failed.*Unable to locate package postgresql"):
        ensure_bindir(env, tmp_path / "usr-lib-postgresql")
    monkeypatch.setattr(pg_server.os, "geteuid", lambda: 1000)
    with pytest.raises(PostgresUnavailable, match="install it \\(Debian: apt-get install postgresql\\)"):
        ensure_bindir(env, tmp_path / "usr-lib-postgresql")


@pytest.fixture(scope="module")
def bindir() -> Path:
    """The real server's binaries (skipped, or failed under CI=true, as the table tests are)."""
    try:
        return ensure_bindir()
    except PostgresUnavailable as err:
        pg_server.give_up(err)


def test_a_server_serves_on_loopback_with_its_password_and_stops_without_a_trace(bindir):
    server = PostgresServer.start(bindir)
    pid = int((server.root / "data" / "postmaster.pid").read_text().split()[0])
    engine = sa.create_engine(server.url())
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_database(), host(inet_server_addr())").one() == (
                "taotest", "127.0.0.1")
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            sa.create_engine(server.url().replace(server.password, "wrong")).connect()
    finally:
        engine.dispose()
        server.stop()
    assert not server.root.exists() and _gone(pid)


def test_a_killed_test_process_leaves_no_server_behind(bindir):
    script = ("from pathlib import Path; from tests.pg_server import PostgresServer; import time\n"
              f"s = PostgresServer.start(Path({str(bindir)!r}))\n"
              "print(s.root, (s.root / 'data' / 'postmaster.pid').read_text().split()[0], flush=True)\n"
              "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        root, pid = child.stdout.readline().split()
        assert Path(root).exists() and not _gone(int(pid))
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 60
        while (Path(root).exists() or not _gone(int(pid))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(root).exists() and _gone(int(pid))
    finally:
        child.kill()


@pytest.mark.parametrize("ci", ["true", ""])
def test_no_server_fails_under_ci_and_skips_elsewhere(tmp_path, ci):
    (tmp_path / "test_needs_pg.py").write_text(
        "from tests.pg_server import postgres_url  # noqa: F401\n\n"
        "def test_needs_postgres(postgres_url):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": ci, "TAO_TEST_POSTGRES_BIN": str(tmp_path / "nothing"),
           "TAO_TEST_POSTGRES_NO_INSTALL": "1"}
    env.pop("TAO_TEST_POSTGRES_URL", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_needs_pg.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    reason = "PostgreSQL tests need a server: TAO_TEST_POSTGRES_BIN="
    assert reason in done.stdout
    if ci:
        assert done.returncode == 1 and "1 error" in done.stdout and "CI=true: failing instead of skipping" in done.stdout
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout
