"""One flywheel round as a process of its own: ``python -m tao_core.flywheel_round rounds/round-NNN.toml``,
which is ``tao run rounds/round-NNN.toml`` ending with the flywheel's process.

The round runs in its own process group (so terminating it also ends anything it started), with
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and the run config's ``threads`` set to ``round_threads``, and
its stdout and stderr appended to ``rounds/round-NNN.log``. The controller waits for it while watching
its stop event; :meth:`RoundProcess.terminate` sends SIGTERM to the group, then SIGKILL after a grace
period, and reaps it: no process outlives the flywheel's shutdown. A flywheel killed outright
(SIGKILL, the OOM killer) cannot do that, so the round watches its parent itself: when the flywheel's
process is gone the round's process group gets SIGTERM (on Linux the kernel signals the round at once,
``PR_SET_PDEATHSIG``; elsewhere a thread notices within a second). A round nobody will gate must not go
on taking the cores a restarted flywheel's round needs.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TERMINATE_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


class RoundProcess:
    """``tao run CONFIG`` in a child process; see the module docstring."""

    def __init__(self, config_path: Path, log_path: Path, threads: int | None) -> None:
        self.config_path, self.log_path, self.threads = config_path, log_path, threads
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        env = dict(os.environ)
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.setdefault("TQDM_MININTERVAL", "5")  # a progress line every few seconds in the log, not every step
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tao_core.flywheel_round", str(self.config_path),
                                          str(os.getpid())],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait(self, stop: threading.Event, poll_s: float = 0.2) -> int | None:
        """The exit status once the round ends; None when ``stop`` was set first (the round is terminated)."""
        assert self.proc is not None, "start() the round first"
        while True:
            try:
                return self.proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                if stop.is_set():
                    self.terminate()
                    return None

    def terminate(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """End the round's process group (SIGTERM, SIGKILL after ``grace_s``) and reap the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the child leads its own group (start_new_session)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_group(signum: int, frame: object) -> None:
    """SIGTERM to the round: the whole group goes (anything the run started, then the run)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    """End this round's process group when the process ``parent`` (the flywheel) is gone."""
    signal.signal(signal.SIGTERM, _end_group)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the spawning thread's exit
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="tao-round-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the watch was set
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """``python -m tao_core.flywheel_round CONFIG PARENT_PID``: ``tao run CONFIG`` that ends with PARENT_PID."""
    config, parent = argv
    _watch_parent(int(parent))
    sys.argv = ["tao", "run", config]
    runpy.run_module("tao_core.cli", run_name="__main__", alter_sys=True)  # not imported: the cli imports us


if __name__ == "__main__":
    main(sys.argv[1:])
