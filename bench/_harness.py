"""Shared harness of the kernel benchmarks: providers side by side, each in a fresh subprocess.

Each provider runs in its own process so that peak memory means the same thing for all of them:
on the CPU, peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs
exist and a tiny warm-up has loaded every library) minus the resident memory at that moment; on a GPU,
``torch.cuda.max_memory_allocated`` minus the memory allocated at that moment. Times are medians over
``--repeats`` forward + backward iterations (CUDA events on a GPU); ``ms_fwd`` is the forward part of
the same iterations. ``cpu_ms_fwd_bwd`` is the process CPU time (all threads) of a forward + backward,
a figure that other load on a shared machine disturbs much less than the wall time. One CSV row per provider goes to stdout (and is appended to ``--results``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

COLUMNS = "op,provider,device,dtype,N,H,V,ms_fwd,ms_fwd_bwd,peak_mem_mb,cpu_ms_fwd_bwd,device_name,torch,triton,date"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Provider:
    """``run(inputs)`` returns the loss to call ``.backward()`` on; ``unavailable(device)`` a reason or None."""

    run: Callable[[dict], torch.Tensor]
    unavailable: Callable[[str], str | None] = lambda device: None
    in_quick: bool = True  # part of --quick (the Triton interpreter and a cold torch.compile are not)


def importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def needs_cuda(device: str) -> str | None:
    return None if device == "cuda" else "needs a CUDA device"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} x{torch.get_num_threads()} threads".replace(",", " ")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not found in /proc/self/status (peak memory needs Linux)")


def append_csv(path: str | Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """Append ``rows`` to the CSV file at ``path``, writing the header first when the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


class _Clock:
    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, stop) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(stop)
        return (stop - start) * 1000.0


def _clear_grads(inputs: dict) -> None:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            value.grad = None


def worker(spec: dict, providers: dict[str, Provider], make_inputs: Callable[..., dict]) -> dict:
    """Measure one provider in this process (called in the subprocess)."""
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    provider = providers[spec["provider"]]
    tiny = make_inputs(16, 32, 256, dtype, device)
    provider.run(tiny).backward()  # imports, custom-op registration, thread pools: part of the baseline
    del tiny
    inputs = make_inputs(spec["N"], spec["H"], spec["V"], dtype, device)
    clock = _Clock(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    fwd, total, cpu = [], [], []
    for i in range(spec["warmup"] + spec["repeats"]):
        cpu_start = time.process_time()
        start = clock.mark()
        loss = provider.run(inputs)
        mid = clock.mark()
        loss.backward()
        stop = clock.mark()
        if i >= spec["warmup"]:
            fwd.append(clock.ms(start, mid))
            total.append(clock.ms(start, stop))
            cpu.append((time.process_time() - cpu_start) * 1000.0)
        del loss
        _clear_grads(inputs)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - baseline
    else:
        peak = status_mb("VmHWM") - baseline
    return {"ms_fwd": statistics.median(fwd), "ms_fwd_bwd": statistics.median(total), "peak_mem_mb": peak,
            "cpu_ms_fwd_bwd": statistics.median(cpu)}


def main(op: str, providers: dict[str, Provider], make_inputs: Callable[..., dict], quick_shape: tuple) -> None:
    """Command line of one benchmark file: ``--quick`` or a full run over the chosen providers."""
    parser = argparse.ArgumentParser(description=f"Benchmark {op}: providers side by side, CSV to stdout.")
    parser.add_argument("--quick", action="store_true", help=f"CPU providers only, one iteration, N,H,V={quick_shape}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "V"), default=None)
    parser.add_argument("--providers", nargs="*", default=None, help=f"subset of {sorted(providers)}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--results", type=Path, default=None, help="also append the rows to this CSV file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), providers, make_inputs)))
        return
    device = args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    gpu_shape = (16384, 4096, 128256)
    shape = tuple(args.shape) if args.shape else (quick_shape if args.quick or device != "cuda" else gpu_shape)
    repeats = args.repeats or (1 if args.quick else (20 if device == "cuda" else 3))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else (3 if device == "cuda" else 1))
    chosen = args.providers or [n for n, p in providers.items() if p.in_quick or not args.quick]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions = f"{torch.__version__},{_triton_version()}"
    print(f"# {op} on {device_name(device)}, torch {torch.__version__}, triton {_triton_version()}, {stamp}")
    print(COLUMNS, flush=True)
    rows = []
    for name in chosen:
        reason = providers[name].unavailable(device)
        if reason:
            print(f"# {name}: skipped ({reason})", flush=True)
            continue
        spec = dict(provider=name, device=device, dtype=dtype, N=shape[0], H=shape[1], V=shape[2],
                    repeats=repeats, warmup=warmup)
        proc = subprocess.run(
            [sys.executable, sys.argv[0], "--worker", json.dumps(spec)], capture_output=True, text=True,
            env=dict(os.environ),
        )
        if proc.returncode != 0:
            print(f"# {name}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})",
                  flush=True)
            continue
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        row = (f"{op},{name},{device},{dtype},{shape[0]},{shape[1]},{shape[2]},{m['ms_fwd']:.1f},"
               f"{m['ms_fwd_bwd']:.1f},{m['peak_mem_mb']:.1f},{m['cpu_ms_fwd_bwd']:.1f},{device_name(device)},"
               f"{versions},{stamp}")
        rows.append(row)
        print(row, flush=True)
    if args.results and rows:
        new = not args.results.exists()
        with args.results.open("a") as f:
            if new:
                f.write(COLUMNS + "\n")
            f.write("\n".join(rows) + "\n")
