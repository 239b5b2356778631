"""tao_core.serve.threads: torch work in a passing thread leaves no OpenMP pool behind.

Why it matters (measured in tao_core/serve/threads.py's docstring): a second pool alive beside the engine
thread's makes GNU OpenMP's workers sleep at every barrier, and the engine's steps slow down by a tenth
or more. The subprocess test shows both sides: a parallel torch op on the main thread leaves its worker
threads alive; the same op in a passing thread does not.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from tao_core.serve.threads import in_passing_thread, start_passing


def test_result_and_exception_come_back():
    assert in_passing_thread(lambda a, b: a + b, 2, 3) == 5

    def boom() -> None:
        raise ValueError("from the passing thread")

    with pytest.raises(ValueError, match="from the passing thread"):
        in_passing_thread(boom)


def test_the_thread_is_gone_after():
    seen: list[threading.Thread] = []
    start_passing(lambda: seen.append(threading.current_thread()), name="tao-test-passing").result()
    seen[0].join(5)
    assert seen[0].name == "tao-test-passing" and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in /proc")
def test_no_openmp_pool_left_behind():
    script = textwrap.dedent("""
        import os, time, torch
        from tao_core.serve.threads import in_passing_thread
        torch.set_num_threads(2)
        tasks = lambda: len(os.listdir("/proc/self/task"))
        def work():
            x = torch.ones(4_000_000)
            for _ in range(20):
                x.mul_(1.0001)  # far above torch's grain size: a parallel region on 2 threads
        base = tasks()
        in_passing_thread(work)
        time.sleep(0.2)
        after_passing = tasks()
        work()
        print(base, after_passing, tasks())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    base, after_passing, after_main = map(int, out.stdout.split())
    assert after_main > base, "the main thread's parallel op should leave its OpenMP workers (test premise)"
    assert after_passing == base, f"the passing thread left {after_passing - base} thread(s) behind"


INTERRUPTED_AT_START = textwrap.dedent("""
    import threading, time, torch
    from tao_core.serve.threads import in_passing_thread

    start = threading.Thread.start
    def start_then_interrupt(self):  # Ctrl-C landing after the thread starts, before the wait begins
        start(self)
        raise KeyboardInterrupt

    def torch_work():
        a, deadline = torch.randn(400, 400), time.monotonic() + 1.5
        while time.monotonic() < deadline:
            a = torch.tanh(a @ a)
        print("WORK-DONE", flush=True)

    threading.Thread.start = start_then_interrupt
    try:
        in_passing_thread(torch_work)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
""")


def test_an_interrupt_before_the_wait_still_lets_the_thread_finish_before_exit():
    """The interpreter waits for the passing thread at exit: a thread still in torch when the process
    tears down aborts it ("terminate called without an active exception", SIGABRT)."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_AT_START], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.index("INTERRUPTED") < out.index("WORK-DONE"), out
    assert "terminate called" not in out
