"""One flywheel round as a process of its own: ``python -m tao_core.cli run rounds/round-NNN.toml``.

The round runs in its own process group (so terminating it also ends anything it started), with
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and the run config's ``threads`` set to ``round_threads``, and
its stdout and stderr appended to ``rounds/round-NNN.log``. The controller waits for it while watching
its stop event; :meth:`RoundProcess.terminate` sends SIGTERM to the group, then SIGKILL after a grace
period, and reaps it: no process outlives the flywheel's shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
            self.proc = subprocess.Popen([sys.executable, "-m", "tao_core.cli", "run", str(self.config_path)],
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
