"""The run directory: every stage's artifacts, written so a kill at any moment loses at most one step.

Layout::

    RUN_DIR/
      tao-dir.json  .lock                                   # what made this directory; who holds it
      config.json  versions.json  metrics.jsonl
      steps/step-00012/{prompts,candidates,scores}.jsonl   # one directory per optimizer step
      checkpoints/step-00010/ step-00012/ latest           # the last two checkpoints (tao_core.checkpoint)
      best/step-00008.safetensors  best/pipeline.json       # the best held-out weights so far
      rounds/round-001/model/                               # a Hugging Face directory per round
      final/                                                # the promoted model at the end

Lifecycle, the same for ``tao run``, ``tao sft`` and ``tao rm train``: :meth:`RunDir.claim` takes
a directory that is absent, empty, or already marked with ``tao-dir.json`` of the same kind, and
holds an exclusive lock (``flock`` on ``.lock``) for the life of the process, so two processes never
write into one directory. Any other non-empty directory is refused: tao never writes into, or
deletes, a folder it did not make. Run directories from before the marker existed are adopted
when resumed.

Every write goes through :mod:`tao_core.fsio` (temporary name, fsync, rename; metrics lines are
appended and fsynced). Checkpoints are whole directories renamed into place; ``checkpoints/latest``
names the newest, and resume verifies each checkpoint's manifest, falling back to the previous one
with a warning. Whole directories (``final/``, round models) are written beside their place and
renamed in.

Under several ranks (:mod:`tao_core.distributed`) rank 0 alone writes: the others open the
directory with ``writes=False``, and every writing method (marked ``@_writer``) then returns
without touching the disk; what they need from it reaches them from rank 0.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tao_core import checkpoint
from tao_core.errors import TaoInputError
from tao_core.fsio import append_line, fault_point, fsync_dir, write_file
from tao_core.records import read_records
from tao_core.types import Candidate, Prompt, Score, read_jsonl, write_jsonl

MARKER = "tao-dir.json"
LOCK = ".lock"
KINDS = ("run", "sft", "rm")
KEEP_CHECKPOINTS = 2


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: metrics stay strict JSON that any tool reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_dir(dest: Path, fill: Callable[[Path], Any]) -> None:
    """Build directory ``dest`` whole: ``fill`` writes into a temporary directory beside it, which
    then replaces ``dest`` (see :func:`replace_dir`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    replace_dir(tmp, dest)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``, replacing an older ``dest`` (never half of either)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


MAX_SMALL_FILE = 64 * 1024  # markers and pointers are a few bytes; anything larger is not ours


def read_small(path: Path) -> bytes:
    """The bytes of a small regular file (a marker, a pointer); an error for a FIFO, a device or a huge file."""
    if not path.is_file():
        raise OSError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_SMALL_FILE + 1)
    if len(data) > MAX_SMALL_FILE:
        raise OSError(f"{path} is larger than {MAX_SMALL_FILE} bytes")
    return data


def _read_marker(root: Path) -> dict[str, Any] | None:
    path = root / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        marker = json.loads(read_small(path))
    except (OSError, ValueError) as e:
        raise TaoInputError(f"{path}: unreadable tao directory marker ({e}); this directory was not "
                            "made by this tao, or its marker was damaged: choose another directory") from None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS:
        raise TaoInputError(f"{path}: not a tao directory marker (expected a 'kind' of {', '.join(KINDS)})")
    return marker


# What each kind wrote before markers existed: a directory holding anything else is not one of ours.
_LEGACY_ENTRIES = {
    "run": {"config.json", "versions.json", "metrics.jsonl", "steps", "checkpoints", "best", "rounds", "final",
            "score-cache", "report.md", "report.html", "plots"},
    "rm": {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
           "added_tokens.json", "tao_rm.json", "metrics.jsonl"},
}
_LEGACY_ENTRIES["sft"] = _LEGACY_ENTRIES["run"]


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(read_small(path))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _legacy_kind(root: Path) -> str | None:
    """The kind of a directory written before markers existed, judged by its files (all of them)."""
    kind = None
    if (config := _json_object(root / "config.json")) is not None and (root / "metrics.jsonl").is_file():
        if config.get("kind") == "sft":
            kind = "sft"
        elif "task" in config and "train" in config:
            kind = "run"
    info = _json_object(root / "tao_rm.json")
    if kind is None and info is not None and {"base", "config", "n_train"} <= set(info):
        kind = "rm"
    if kind is None or any(p.name not in _LEGACY_ENTRIES[kind] for p in root.iterdir()):
        return None
    return kind


def run_kind(root: Path) -> str | None:
    """The kind of tao directory ``root`` is (by its marker, else by a pre-marker layout), or ``None``."""
    try:
        marker = _read_marker(root) if root.is_dir() else None
    except TaoInputError:
        return None
    return marker["kind"] if marker else (_legacy_kind(root) if root.is_dir() else None)


def _writer(method: Callable) -> Callable:
    """A method that writes: in a RunDir opened with ``writes=False`` it returns None, touching nothing."""

    @functools.wraps(method)
    def wrapper(self: RunDir, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs) if self.writes else None

    return wrapper


class RunDir:
    def __init__(self, root: str | os.PathLike, *, writes: bool = True) -> None:
        self.root = Path(root)
        self.writes = writes  # False: a rank other than 0 of a distributed run (it reads what rank 0 sends)
        self._lock_fd: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def claim(self, kind: str, *, resume: bool = False, replace: bool = False,
              info: dict[str, Any] | None = None) -> RunDir:
        """Take this directory for a ``kind`` run and lock it; see the module docstring.

        ``resume`` accepts a directory that already holds a started run of ``kind``; ``replace``
        empties one (its marker must say ``kind``, and ``info`` must match the marker's: the demo
        replaces only its own runs). ``info`` is stored in a new marker.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.writes:
            return self
        root = self.root
        if root.exists() and not root.is_dir():
            raise TaoInputError(f"{root} is a file, not a directory; choose another output directory")
        marker = _read_marker(root) if root.is_dir() else None
        entries = {p.name for p in root.iterdir()} - {LOCK} if root.is_dir() else set()
        if marker is None and entries:
            legacy = _legacy_kind(root)
            if legacy == kind and (resume or (replace and kind == "rm")):
                marker = {"kind": kind, "format": 1, "adopted": True}
            elif legacy is not None:
                raise TaoInputError(f"{root} holds a tao {legacy} made before run directories were marked; "
                                    + ("resume it (`tao run --resume`) or " if legacy == "run" else "")
                                    + "choose another output directory (tao never deletes it for you)")
            else:
                raise TaoInputError(f"{root} is not empty and is not a tao directory (no {MARKER}); tao never "
                                    "writes into or deletes a folder it did not make: choose another output "
                                    "directory or empty this one yourself")
        if marker is not None and marker["kind"] != kind:
            raise TaoInputError(f"{root} holds a tao {marker['kind']} directory, not a {kind} one; choose another "
                                "output directory")
        started = bool(entries - {MARKER})
        if marker is not None and started and not (resume or replace):
            hint = f"resume it with `tao run --resume {root}` or " if kind == "run" else ""
            raise TaoInputError(f"{root} already holds a {kind}: {hint}choose another output directory")
        if replace and marker is not None and started:
            if any(marker.get(k) != v for k, v in (info or {}).items()):
                raise TaoInputError(f"{root} holds a {kind} that this command did not make "
                                    f"({MARKER}: {json.dumps(marker)}); choose another output directory")
        root.mkdir(parents=True, exist_ok=True)
        self._lock()
        if replace and started:
            for p in root.iterdir():
                if p.name not in (LOCK, MARKER):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if not (root / MARKER).exists():
            body = {"kind": kind, "format": 1, "created": round(time.time(), 3), **(info or {}),
                    **({k: v for k, v in marker.items() if k != "kind"} if marker else {})}
            write_file(root / MARKER, json.dumps(body, indent=2))
        return self

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = (self.root / LOCK).read_text(errors="replace").strip() or "?"
                raise TaoInputError(f"{self.root} is in use by another tao process (pid {holder}); wait for it "
                                    "to finish or stop it first") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    @_writer
    def remove_unstarted(self) -> None:
        """Remove this directory when it holds nothing but its marker and lock (a run that never began)."""
        if self.root.is_dir() and {p.name for p in self.root.iterdir()} <= {MARKER, LOCK}:
            for name in (MARKER, LOCK):
                (self.root / name).unlink(missing_ok=True)
            self.root.rmdir()

    def release(self) -> None:
        """Give up the lock (also released when the process exits, however it exits)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_dir(self, step: int, part: int = 0) -> Path:
        """Where a step's prompts, candidates and scores live; ``part`` > 0: its dynamic-sampling
        rounds (``step-00002-r1``, ...)."""
        return self.root / "steps" / (f"step-{step:05d}" + (f"-r{part}" if part else ""))

    def round_model_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / f"round-{round_index:03d}" / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.root / "best"

    # -- metrics -------------------------------------------------------------------------------
    @_writer
    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line (fsynced): steps, evaluations, rounds, warnings."""
        record = {"time": round(time.time(), 3), **record}
        append_line(self.metrics_path, json.dumps(_finite(record), ensure_ascii=False, allow_nan=False))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics line; a last line torn by a kill mid-write is dropped (its step is redone),
        a bad line anywhere else is an error naming its line."""
        if not self.metrics_path.exists():
            return []
        return [r for _, r in read_records(self.metrics_path, tolerate_torn_tail=True)]

    @_writer
    def truncate_metrics_after(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (they are redone after a resume)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        write_jsonl(self.metrics_path, kept)

    @_writer
    def write_text(self, name: str, text: str) -> None:
        """A small file of the run (``config.json``, ``versions.json``), written whole."""
        write_file(self.root / name, text)

    @_writer
    def write_dir(self, dest: Path, fill: Callable[[Path], Any]) -> None:
        """A whole directory of the run (``final/``, a round's model): :func:`write_dir`."""
        write_dir(dest, fill)

    # -- stage artifacts -----------------------------------------------------------------------
    @_writer
    def save_step_prompts(self, step: int, prompts: list[Prompt], part: int = 0) -> None:
        write_jsonl(self.step_dir(step, part) / "prompts.jsonl", prompts)

    @_writer
    def save_candidates(self, step: int, groups: list[list[Candidate]], part: int = 0) -> None:
        write_jsonl(self.step_dir(step, part) / "candidates.jsonl", [c for g in groups for c in g])

    def load_candidates(self, step: int, prompts: list[Prompt], part: int = 0) -> list[list[Candidate]] | None:
        path = self.step_dir(step, part) / "candidates.jsonl"
        if not path.exists():
            return None
        by_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
        for c in read_jsonl(path, Candidate):
            by_prompt[c.prompt_id].append(c)
        return [sorted(by_prompt[p.id], key=lambda c: c.index) for p in prompts]

    @_writer
    def save_scores(self, step: int, scores: list[list[Score]], part: int = 0) -> None:
        write_jsonl(self.step_dir(step, part) / "scores.jsonl", [s for g in scores for s in g])

    def load_scores(self, step: int, groups: list[list[Candidate]], part: int = 0) -> list[list[Score]] | None:
        path = self.step_dir(step, part) / "scores.jsonl"
        if not path.exists():
            return None
        flat = read_jsonl(path, Score)
        out, i = [], 0
        for g in groups:
            out.append(flat[i : i + len(g)])
            i += len(g)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    @_writer
    def save_checkpoint(self, step: int, trainer_state: dict[str, Any] | None, pipeline_state: dict[str, Any],
                        keep: int = KEEP_CHECKPOINTS, *, write: Callable[[Path, Any, dict[str, Any]], None] = checkpoint.write,
                        ) -> Path:
        """Write checkpoint ``step`` (see :mod:`tao_core.checkpoint`), point ``latest`` at it, keep the last ``keep``.

        ``write(tmp, trainer_state, pipeline_state)`` fills the new directory: a sharded
        checkpoint's writer (:func:`tao_core.dist_checkpoint.save`) gathers every rank's shards there."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:05d}"
        tmp = self.checkpoints / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp, trainer_state, pipeline_state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fault_point("checkpoint.before-rename")
        replace_dir(tmp, final)
        fault_point("checkpoint.before-latest")
        write_file(self.checkpoints / "latest", final.name)
        names = sorted(p.name for p in self.checkpoints.iterdir() if checkpoint.is_checkpoint_name(p.name))
        for old in names[:-keep]:
            shutil.rmtree(self.checkpoints / old, ignore_errors=True)
        for stale in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def checkpoint_dirs(self) -> list[Path]:
        """Checkpoint directories, the one ``latest`` names first, then the others newest first."""
        if not self.checkpoints.is_dir():
            return []
        found = sorted((p for p in self.checkpoints.iterdir() if checkpoint.is_checkpoint_name(p.name)),
                       key=lambda p: p.name, reverse=True)
        pointer = self.checkpoints / "latest"
        named = None
        if pointer.exists():
            try:
                named = read_small(pointer).decode("utf-8").strip()
            except (OSError, UnicodeDecodeError):
                named = None
        if named and checkpoint.is_checkpoint_name(named) and (self.checkpoints / named).is_dir():
            found.sort(key=lambda p: p.name != named)
        return found

    def load_checkpoint(self, read: Callable[[Path], tuple[Any, dict[str, Any]]] = checkpoint.read,
                        ) -> tuple[Path, Any, dict[str, Any], list[str]] | None:
        """The newest valid checkpoint: ``(dir, trainer_state, pipeline_state, warnings)``; ``read``
        verifies and loads one (:func:`tao_core.dist_checkpoint.read_lazy`: verified, rows left on disk).

        ``None`` when no checkpoint was ever written. A checkpoint that fails verification is
        skipped with a warning for the previous one; when checkpoints exist but none is valid, a
        :class:`TaoInputError` lists why each failed (a run never silently restarts).
        """
        problems: list[str] = []
        dirs = self.checkpoint_dirs()
        pointer = self.checkpoints / "latest"
        if dirs and pointer.exists() and not any(p.name == _safe_read(pointer) for p in dirs):
            problems.append(f"{pointer} names {_safe_read(pointer)!r}, which is not a checkpoint here; ignored")
        for d in dirs:
            try:
                trainer_state, pipeline_state = read(d)
            except checkpoint.CheckpointError as e:
                problems.append(str(e))
                continue
            return d, trainer_state, pipeline_state, [f"{p}; resumed from {d.name}" for p in problems]
        if dirs:
            raise TaoInputError(f"{self.checkpoints}: no valid checkpoint to resume from: " + "; ".join(problems))
        return None

    def latest_checkpoint(self) -> Path | None:
        """The newest finished checkpoint (its manifest written), or ``None``; cheap: nothing is hashed or
        read (a failing run names it; ``--resume`` verifies it and falls back to the previous one)."""
        return next((d for d in self.checkpoint_dirs() if (d / checkpoint.MANIFEST).is_file()), None)

    # -- best weights ----------------------------------------------------------------------------
    def best_path(self, step: int) -> Path:
        return self.best_dir / f"step-{step:05d}.safetensors"

    @_writer
    def save_best(self, trainable: dict[str, torch.Tensor], info: dict[str, Any], keep_steps: set[int] = frozenset()) -> None:
        """Store the best weights under their step; files of steps not in ``keep_steps`` | {this} are pruned."""
        from safetensors.torch import save

        self.best_dir.mkdir(parents=True, exist_ok=True)
        write_file(self.best_path(info["step"]), save({k: v.detach().cpu().contiguous() for k, v in trainable.items()}))
        write_file(self.best_dir / "pipeline.json", json.dumps(info, indent=2))
        keep = {self.best_path(s).name for s in {*keep_steps, info["step"]}}
        for old in self.best_dir.glob("step-*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def load_best(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.best_path(step)
        if not path.exists() and (self.best_dir / "trainable.safetensors").exists():
            path = self.best_dir / "trainable.safetensors"  # a run directory from before per-step files
        if not path.exists():
            raise TaoInputError(f"{path}: the best weights (step {step}) are missing from the run directory")
        return load_file(str(path))


def _safe_read(path: Path) -> str:
    try:
        return read_small(path).decode("utf-8", errors="replace").strip()[:40]
    except OSError:
        return ""
