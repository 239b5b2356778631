"""The flywheel's controller: a thread that watches the inference table, runs rounds, gates and promotes.

Every ``trigger.poll_s`` seconds it flushes the table's writer and counts the distinct prompts (normalized
text) logged since the last round, with the round config's ``[table]`` filters. A round starts when they
reach ``trigger.min_new_prompts``, or when ``trigger.interval_s`` has passed since the last round and at
least one is new. Then, in order:

1. round N's run config is written to ``rounds/round-NNN.toml`` (the served model as ``model``, the
   table's rows since the last round as its prompts) and run as a process of its own
   (:class:`~tao_core.flywheel_round.RoundProcess`, log in ``rounds/round-NNN.log``);
2. a round that fails (non-zero exit) is recorded and changes nothing: the served model stays, its prompts
   stay in the next round's window, and no round starts for ``trigger.retry_s``;
3. a round that finished is gated (:mod:`tao_core.flywheel_gate`); promoted, its ``final/`` model is
   swapped into the server as version ``N`` (``reload(model_dir, version)``); rejected, nothing changes.

Every round's outcome is one line of ``flywheel.jsonl`` (:data:`RECORD_KEYS`), written before the next
round can start. A restart reads it back: round numbers go on, the next round's prompts start where the
last finished round's ended, and the last promoted model is served again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tao_core.flywheel_config import FlywheelConfig, round_config, round_dir, write_toml
from tao_core.flywheel_gate import answers, gate_table, held_out_prompts, judge, task_evaluation
from tao_core.flywheel_round import RoundProcess
from tao_core.fsio import append_line
from tao_core.serve.threads import in_passing_thread

log = logging.getLogger(__name__)

JOURNAL = "flywheel.jsonl"
# The keys of a flywheel.jsonl record (gate and task_eval are None when the round did not get that far).
RECORD_KEYS = ("round", "time", "trigger", "prompts", "since", "status", "promoted", "version", "model_dir",
               "round_dir", "log", "reason", "gate", "task_eval", "seconds")
ROUND_FILE = re.compile(r"round-(\d+)(?:\.toml|\.log)?")  # a round's directory, config and log
STATUSES = ("promoted", "rejected", "failed", "interrupted")


@dataclass
class Served:
    model_dir: str  # the model spec or directory the served weights came from
    version: str  # the version every logged exchange names


@dataclass
class History:
    """What flywheel.jsonl says about earlier runs of this flywheel."""

    rounds: int = 0  # the last round number used (failed and interrupted rounds included)
    since: datetime | None = None  # the next round's prompts start here (the last finished round's start)
    served: Served | None = None  # the model served after the last round


def read_history(path: Path) -> History:
    """The :class:`History` in ``path`` (a flywheel.jsonl); an unreadable line is skipped with a warning."""
    history = History()
    if not path.is_file():
        return history
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            history.rounds = max(history.rounds, int(r["round"]))
            if r["status"] in ("promoted", "rejected"):
                history.since = datetime.fromisoformat(r["time"])
            history.served = Served(str(r["model_dir"]), str(r["version"]))
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d: not a flywheel record, skipped", path, i)
    return history


def append_record(path: Path, line: str) -> None:
    """Append one record to the journal; a torn last line (a flywheel killed while appending) is ended
    first, so the new record is a line of its own that a restart reads back."""
    try:
        with open(path, "rb") as f:
            torn = f.seek(0, os.SEEK_END) > 0 and (f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n")
    except FileNotFoundError:
        torn = False
    append_line(path, "\n" + line if torn else line)


@dataclass
class Trigger:
    kind: str  # "prompts" (trigger.min_new_prompts reached) or "schedule" (trigger.interval_s passed)
    new_prompts: int  # distinct prompts logged since the last round


class Controller:
    """See the module docstring. ``reload(model_dir, version)`` swaps a model into the server (raises on failure)."""

    def __init__(self, cfg: FlywheelConfig, table: Any, scorer: Any, reload: Callable[[str, str], Any], *,
                 served: Served, history: History) -> None:
        self.cfg, self.table, self.scorer, self.reload = cfg, table, scorer, reload
        self.served = served
        self.since = history.since
        # a round the flywheel was killed in (no record) keeps its number: its directory is not reused
        # (its config and log are written before its process starts: they count, as its run directory does)
        used = [int(m[1]) for p in round_dir(cfg, 1).parent.glob("round-*") if (m := ROUND_FILE.fullmatch(p.name))]
        self.rounds = max([history.rounds, *used])
        first, _ = round_config(cfg, 1, model_dir=served.model_dir, table_url=table.url, since=None)
        self.filters = first.table  # the round's [table] filters and holdout
        self.first_since = first.table.since  # the gate reads the table from here on
        self.journal = Path(cfg.output_dir) / JOURNAL
        self.stop_event = threading.Event()
        self.round_process: RoundProcess | None = None
        self.last_round_at = time.monotonic()
        self.retry_at = 0.0
        self._held_out_seen: int | None = None  # the last too-small held-out count logged
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tao-flywheel-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a running round is terminated by the controller thread within a fraction of a second."""
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the controller thread (and the round it terminates); True when it ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        proc = self.round_process
        if proc is not None:
            proc.terminate()  # the thread stopped waiting for it (or never got to)
        return self._thread is None or not self._thread.is_alive()

    def _run(self) -> None:
        while not self.stop_event.wait(self.cfg.trigger.poll_s):
            try:
                self.step()
            except Exception:  # the server keeps serving; the next poll tries again
                log.exception("flywheel: the controller's step failed; trying again in %ss", self.cfg.trigger.poll_s)

    # -- one poll --------------------------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Check the trigger and, when it fires, run one round to its decision; the record, or None."""
        trigger = self.check_trigger()
        if trigger is None or not self._enough_held_out():
            return None
        return self.run_round(trigger)

    def _enough_held_out(self) -> bool:
        """Whether the table holds gate.min_prompts held-out prompts: a round the gate could not judge is not run."""
        n = len(held_out_prompts(gate_table(self.filters, self.table.url, self.first_since), self.cfg.gate.max_prompts))
        if n < self.cfg.gate.min_prompts and n != self._held_out_seen:
            log.info("flywheel: a round waits for held-out prompts to judge it: %d in the table, gate.min_prompts = %d",
                     n, self.cfg.gate.min_prompts)
        self._held_out_seen = n
        return n >= self.cfg.gate.min_prompts

    def check_trigger(self) -> Trigger | None:
        if time.monotonic() < self.retry_at:
            return None
        self.table.flush(timeout=10.0)
        new = self.new_prompts()
        t = self.cfg.trigger
        if t.min_new_prompts and new >= t.min_new_prompts:
            return Trigger("prompts", new)
        if t.interval_s and new >= 1 and time.monotonic() - self.last_round_at >= t.interval_s:
            return Trigger("schedule", new)
        return None

    def new_prompts(self) -> int:
        """Distinct prompts (normalized text) logged since the last round, with the round's filters."""
        from tao_core.table_prompts import normalize

        f = self.filters
        since = self.since or (datetime.fromisoformat(f.since) if f.since else None)
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        read = self.table.prompts(since=since, tag=f.tag, model=f.model, requester=f.requester).prompts
        return len({normalize(p.text) for p in read})

    # -- one round ---------------------------------------------------------------------------------
    def run_round(self, trigger: Trigger) -> dict[str, Any]:
        n, cutoff, started = self.rounds + 1, datetime.now(UTC), time.monotonic()
        self.rounds = n
        run, data = round_config(self.cfg, n, model_dir=self.served.model_dir, table_url=self.table.url,
                                 since=self.since)
        rdir = round_dir(self.cfg, n)
        rdir.parent.mkdir(parents=True, exist_ok=True)
        config_path, log_path = rdir.with_suffix(".toml"), rdir.with_suffix(".log")
        write_toml(config_path, data)
        record: dict[str, Any] = {
            "round": n, "time": cutoff.isoformat(), "trigger": trigger.kind, "prompts": trigger.new_prompts,
            "since": None if self.since is None else self.since.isoformat(), "round_dir": str(rdir),
            "log": str(log_path), "gate": None, "task_eval": None}
        proc = RoundProcess(config_path, log_path, self.cfg.round_threads)
        self.round_process = proc
        proc.start()
        log.info("flywheel: round %d started (pid %s, %s trigger, %d new prompts); log %s", n, proc.pid,
                 trigger.kind, trigger.new_prompts, log_path)
        code = proc.wait(self.stop_event)
        self.round_process = None
        seconds = {"round": round(time.monotonic() - started, 3)}
        if code is None:
            return self._record(record, "interrupted", "the flywheel stopped while the round ran", seconds)
        if code != 0:
            self.retry_at = time.monotonic() + self.cfg.trigger.retry_s
            return self._record(record, "failed", f"the round process exited with status {code}; nothing changed. "
                                f"Its log ({log_path}) ends: {proc.log_tail(600)}", seconds)
        if not (rdir / "final").is_dir():
            self.retry_at = time.monotonic() + self.cfg.trigger.retry_s
            return self._record(record, "failed", f"the round process exited with status 0 but wrote no model "
                                f"({rdir / 'final'}); nothing changed. Its log ({log_path}) ends: "
                                f"{proc.log_tail(600)}", seconds)
        self.since, self.last_round_at = cutoff, time.monotonic()  # these prompts had their round
        gate_started = time.monotonic()
        try:
            return self._decide(record, run, rdir, seconds)
        except Exception as e:  # the gate could not answer or judge: recorded, the served version stays
            log.exception("flywheel: gating round %d failed", n)
            return self._record(record, "rejected", f"the gate failed ({type(e).__name__}: {e}); the served "
                                "version stays", {**seconds, "gate": round(time.monotonic() - gate_started, 3)})

    def _decide(self, record: dict[str, Any], run: Any, rdir: Path, seconds: dict[str, float]) -> dict[str, Any]:
        g, started = self.cfg.gate, time.monotonic()
        final = (rdir / "final").resolve()
        task = task_evaluation(rdir)
        record["task_eval"] = task
        gate = in_passing_thread(self._gate, run, final, name="tao-flywheel-gate")  # no OpenMP pool left behind
        record["gate"] = gate
        seconds["gate"] = round(time.monotonic() - started, 3)
        if self.stop_event.is_set():  # no decision on a gate cut short, and no swap into a server going down
            return self._record(record, "interrupted", "the flywheel stopped before the decision", seconds)
        if not gate["promoted"]:
            return self._record(record, "rejected", f"the gate rejected it: {gate['reason']}", seconds)
        if g.task_eval and task is not None and not task["kept_new_weights"]:
            return self._record(record, "rejected", f"the run's own evaluation kept no new weights ({task['metric']} "
                                f"{task['before']} -> best at step 0)", seconds)
        version = str(record["round"])
        try:
            self.reload(str(final), version)
        except Exception as e:  # the server keeps the version it had
            log.exception("flywheel: reloading round %d failed", record["round"])
            return self._record(record, "rejected", f"the gate promoted it but the reload failed "
                                f"({type(e).__name__}: {e}); the served version stays", seconds)
        self.served = Served(str(final), version)
        return self._record(record, "promoted", gate["reason"], seconds)

    def _gate(self, run: Any, final: Path) -> dict[str, Any]:
        g = self.cfg.gate
        prompts = held_out_prompts(gate_table(run.table, self.table.url, self.first_since), g.max_prompts)
        if len(prompts) < g.min_prompts or self.stop_event.is_set():
            return {"prompts": len(prompts), "judged": 0, "promoted": False,
                    "reason": "the flywheel stopped" if self.stop_event.is_set() else
                    f"{len(prompts)} held-out prompts in the table, fewer than gate.min_prompts = {g.min_prompts}"}
        log.info("flywheel: the gate judges %d held-out prompts (the served model's answers, then the round's)",
                 len(prompts))
        kw = {"dtype": self.cfg.dtype, "device": self.cfg.device}
        old = answers(self.served.model_dir, prompts, g.max_new_tokens, **kw)
        if self.stop_event.is_set():
            return {"prompts": len(prompts), "judged": 0, "promoted": False, "reason": "the flywheel stopped"}
        new = answers(final, prompts, g.max_new_tokens, **kw)
        return judge(self.scorer, prompts, old, new, g)

    def _record(self, record: dict[str, Any], status: str, reason: str, seconds: dict[str, float]) -> dict[str, Any]:
        record.update(status=status, promoted=status == "promoted", version=self.served.version,
                      model_dir=self.served.model_dir, reason=reason, seconds=seconds)
        out = {k: record.get(k) for k in RECORD_KEYS}
        append_record(self.journal, json.dumps(out, ensure_ascii=False, default=str))
        level = logging.WARNING if status in ("failed", "interrupted") else logging.INFO
        log.log(level, "flywheel: round %d %s (serving version %s): %s", out["round"], status, out["version"], reason)
        return out
