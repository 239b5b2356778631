"""The serving benchmark's subprocesses: the servers under test, the offline engine, the transformers venv.

Every subprocess starts in a session of its own with a parent-death signal (SIGKILL when the benchmark
dies, even by SIGKILL), and :class:`Proc` kills its whole process group on exit, error or not: no server
outlives the benchmark. Servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_VENV = Path(os.environ.get("TAO_BENCH_VENV", "/tmp/tao-bench-venv"))  # transformers serve lives here
VENV_SETUP = (  # (what, pip arguments): the CPU torch wheel first, or plain torch would pull CUDA
    ("torch", ["torch==2.13.*"]),
    ("transformers serve", ["transformers[serving]"]),
)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a subprocess that should use ``threads`` CPU threads, offline from any hub."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Proc:
    """A subprocess in its own process group, its output in ``log``; a context manager that kills the group."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str], stdin: int | None = None,
                 stdout: int | None = None) -> None:
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=stdin, stdout=stdout or self._log_file,
                                      stderr=self._log_file, start_new_session=True, preexec_fn=_die_with_parent)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float) -> bool:
        """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout`` s; True when it exited by itself."""
        if self.popen.poll() is not None:
            return True
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def kill(self) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGKILL)
            self.popen.wait()
        self._log_file.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


def wait_ready(proc: Proc, base_url: str, deadline: float) -> None:
    """Poll ``/health`` until it answers 200; a clear error when the server exits or the deadline passes."""
    while time.perf_counter() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before it was ready; "
                               f"its log ({proc.log}) ends:\n{proc.tail()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name} was not ready within the time limit; its log ({proc.log}) ends:\n{proc.tail()}")


def tao_serve(model: str, port: int, table: Path, threads: int, max_tokens: int, log: Path) -> Proc:
    argv = [sys.executable, "-m", "tao_core.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--table", str(table), "--threads", str(threads), "--max-tokens-limit", str(max(max_tokens, 8))]
    return Proc("tao serve", argv, log, thread_env(threads))


def transformers_serve(venv: Path, model_dir: Path, port: int, threads: int, cb_args: list[str], log: Path) -> Proc:
    argv = [str(venv / "bin" / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--dtype", "float32", "--log-level", "warning", *cb_args]
    return Proc("transformers serve", argv, log, thread_env(threads))


def offline_engine(spec: dict, threads: int, log: Path, timeout: float) -> list[dict]:
    """Run ``_serve_offline.py`` on ``spec``; its levels' JSON (the levels it finished within ``timeout``)."""
    with Proc("offline engine", [sys.executable, str(BENCH / "_serve_offline.py")], log, thread_env(threads),
              stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            out, _ = proc.popen.communicate(json.dumps(spec).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.popen.communicate()
        levels = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        if proc.popen.returncode != 0 and not levels:
            raise RuntimeError(f"the offline engine exited with code {proc.popen.returncode}; "
                               f"its log ({log}) ends:\n{proc.tail()}")
        return levels


def count_logged(table: Path, prefix: str) -> int:
    """Rows of the inference table whose client request id starts with ``prefix``."""
    with sqlite3.connect(f"file:{table}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM exchanges WHERE client_request_id LIKE ?", (prefix + "%",)).fetchone()[0]


def hf_model_dir(model: str, out: Path) -> Path:
    """``model`` as a Hugging Face directory ``transformers serve`` loads: tao's dequantized cache entry with
    ``architectures`` named in its config (tao's GGUF import leaves it out); the weights are linked, not copied."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tao_core.models import resolve_model_path

    src = resolve_model_path(model)
    config = json.loads((src / "config.json").read_text())
    if not config.get("architectures"):
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json" and f.is_file():
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def venv_problem(venv: Path) -> str | None:
    """Why ``venv`` cannot run ``transformers serve``, or None."""
    if not (venv / "bin" / "transformers").exists():
        return (f"no transformers serve in {venv}: create it with `python bench/serve.py --setup-venv` "
                f"(or set TAO_BENCH_VENV / --venv to one that has transformers[serving])")
    return None


def venv_versions(venv: Path) -> str:
    code = "import torch, transformers; print(f'transformers {transformers.__version__} torch {torch.__version__}')"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def setup_venv(venv: Path, python: str = "python3.11") -> None:
    """Create ``venv`` with the CPU torch wheel and ``transformers[serving]`` (network: the package registry)."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    for what, args in VENV_SETUP:
        print(f"installing {what} into {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *args], check=True)
