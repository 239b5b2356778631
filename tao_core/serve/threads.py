"""Torch work that must not leave an OpenMP thread pool behind: run it in a thread that then exits.

GNU OpenMP (the runtime of PyTorch's Linux CPU wheels) gives every thread that starts a parallel region
a pool of worker threads of its own, kept until that thread exits. Once the process holds more pool
threads than CPUs, every pool's workers spin only briefly at a barrier before sleeping, so each of the
hundreds of small parallel regions of an engine step pays a futex wake-up. ``tao serve`` loads the
model on one thread and steps the engine on another: with the loading thread's pool alive, the engine's
``[32, 576] x [576, 1536]`` products took 460-580 us instead of 340-400 us (2-core AMD EPYC, 2 threads),
and the server reached 0.84 of the offline engine's tokens per second at 32 streams.

So the server does its torch work outside the engine thread (loading the model, building the engine,
reading a new version's weights) in a passing thread: its pool is freed when it returns, and the
engine thread's pool is the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def start_passing(fn: Callable[..., T], *args: object, name: str = "tao-passing") -> Future[T]:
    """Run ``fn(*args)`` in a new thread that exits when it returns; its result or exception comes back in
    the future (``await asyncio.wrap_future(f)`` from a coroutine)."""
    return _spawn(fn, args, name, daemon=True)[0]


def in_passing_thread(fn: Callable[..., T], *args: object, name: str = "tao-passing") -> T:
    """``fn(*args)`` run in a thread that exits before this returns (see the module docstring).

    Interrupted (Ctrl-C), it waits for the thread to finish before raising: a thread still inside torch
    when the interpreter exits aborts the process ("terminate called without an active exception")
    instead of exiting cleanly. The thread is not a daemon, so the interpreter also waits for it at exit
    when the interrupt lands before the wait below begins.
    """
    future, thread = _spawn(fn, args, name, daemon=False)
    try:
        return future.result()
    except BaseException:
        thread.join()
        raise


def _spawn(fn: Callable[..., T], args: tuple, name: str, *, daemon: bool) -> tuple[Future[T], threading.Thread]:
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, as an executor does
            future.set_exception(e)
        else:
            future.set_result(result)

    thread = threading.Thread(target=run, name=name, daemon=daemon)
    thread.start()
    return future, thread
