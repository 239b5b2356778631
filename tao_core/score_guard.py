"""One guarded scorer call: a prompt's group in, exactly one :class:`~tao_core.types.Score` per
candidate out, whatever the scorer does.

- **Errors are scores.** An exception, a wrong-length list or a non-``Score`` item becomes an
  ``error`` score for each candidate of the group, naming the scorer; the run goes on.
- **Hangs are stopped.** With ``isolation="thread"`` (the default) the call runs in a daemon
  thread and is *abandoned* once ``timeout_s`` passes: its candidates get ``error`` scores at
  once, but Python cannot kill a thread, so a scorer that truly never returns keeps one thread
  (and whatever it holds) until the process exits. That suits I/O-bound and cooperative scorers
  (an HTTP judge, a SQLite query with its own progress handler). ``isolation="process"`` runs
  each group call in a forked child that is killed at the deadline: hard isolation for CPU-bound
  or untrusted scorers, at the price of a fork per group and picklable scores.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import traceback
from collections.abc import Callable
from typing import Any

from tao_core.scorer import ScorerLimits, scorer_id
from tao_core.types import Candidate, Prompt, Score


def score_group(scorer: Any, prompt: Prompt, candidates: list[Candidate],
                limits: ScorerLimits | None = None) -> list[Score]:
    """Score one group safely: always one Score per candidate, with prompt_id and index set."""
    limits = limits or ScorerLimits()
    name, version = scorer_id(scorer)
    n = len(candidates)
    if n == 0:
        return []
    try:
        if limits.isolation == "process":
            result = _run_process(scorer, prompt, candidates, limits.timeout_s)
        elif limits.timeout_s is None:
            try:
                result = scorer.score(prompt, candidates)
            except Exception as e:
                raise _Raised(e, traceback.format_exc()) from None
        else:
            result = _run_thread(lambda: scorer.score(prompt, candidates), limits.timeout_s, name)
        scores = _validate(result, name, version, n)
    except _Timeout:
        how = "killed" if limits.isolation == "process" else "abandoned"
        scores = group_errors(f"scorer {name!r} timed out after {limits.timeout_s:g} s on prompt "
                              f"{prompt.id!r} (call {how})", name, version, n)
    except _Raised as e:
        scores = group_errors(f"scorer {name!r} raised {type(e.exc).__name__}: {e.exc} on prompt {prompt.id!r}",
                              name, version, n, traceback=e.tb)
    for s in scores:
        s.prompt_id = prompt.id
    return scores


def group_errors(reason: str, name: str, version: str, n: int, **details: Any) -> list[Score]:
    """``n`` error scores of scorer ``name``, one per candidate, with the same reason and details."""
    return [Score.error(reason, scorer=name, version=version, index=i, details=dict(details)) for i in range(n)]


def _validate(result: Any, name: str, version: str, n: int) -> list[Score]:
    """Check a scorer's return value; fill in scorer/version/index on copies of its scores."""
    if not isinstance(result, list | tuple):
        return group_errors(
            f"scorer {name!r} returned {type(result).__name__}, expected a list of {n} Score objects",
            name, version, n)
    if len(result) != n:
        return group_errors(f"scorer {name!r} returned {len(result)} scores for {n} candidates", name, version, n)
    bad = [i for i, s in enumerate(result) if not isinstance(s, Score)]
    if bad:
        return group_errors(
            f"scorer {name!r} returned a {type(result[bad[0]]).__name__} at position {bad[0]}, "
            f"expected Score (Score.ok / Score.abstain / Score.error)", name, version, n)
    return [dataclasses.replace(s, scorer=s.scorer or name, version=s.version or version, index=i,
                                details=dict(s.details)) for i, s in enumerate(result)]


class _Timeout(Exception):
    """The call passed its deadline."""


class _Raised(Exception):
    """The scorer raised ``exc``; ``tb`` is its traceback as text."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        super().__init__(str(exc))
        self.exc, self.tb = exc, tb


def _run_thread(fn: Callable[[], Any], timeout: float | None, label: str) -> Any:
    """``fn()`` in a daemon thread, abandoned after ``timeout`` seconds."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported as the group's error score
            box["exc"], box["tb"] = e, traceback.format_exc()
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name=f"tao-scorer-{label}").start()
    if not done.wait(timeout):
        raise _Timeout
    if "exc" in box:
        raise _Raised(box["exc"], box["tb"])
    return box["value"]


def _run_process(scorer: Any, prompt: Prompt, candidates: list[Candidate], timeout: float | None) -> Any:
    """``scorer.score`` in a forked child, killed after ``timeout`` seconds; scores come back as dicts."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, scorer, prompt, candidates), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise _Timeout
        try:
            msg = recv.recv()
        except EOFError:
            proc.join(1.0)
            raise _Raised(RuntimeError(f"scorer process died (exit code {proc.exitcode})"), "") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5.0)
        recv.close()
    if msg[0] == "exc":
        raise _Raised(RuntimeError(msg[1]), msg[2])
    return [Score.from_dict(d) if isinstance(d, dict) else d for d in msg[1]]


def _child(conn: Any, scorer: Any, prompt: Prompt, candidates: list[Candidate]) -> None:
    """The child process of :func:`_run_process`: one call, its result (or exception) sent back."""
    try:
        out = scorer.score(prompt, candidates)
        payload: Any = ("ok", [s.to_dict() if isinstance(s, Score) else s for s in out]
                        if isinstance(out, list | tuple) else out)
        try:
            conn.send(payload)
        except Exception as e:  # an unpicklable return value
            conn.send(("exc", f"{type(e).__name__}: {e}", traceback.format_exc()))
    except BaseException as e:  # noqa: BLE001
        conn.send(("exc", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()
