"""Serving throughput: `tao serve` against tao's engine offline and `transformers serve`, at 1, 8 and 32 clients.

Every mode answers the same workload in one run: ``--clients`` levels of closed-loop clients, each sending
``--requests-per-client`` chat requests one after another (the prompts of bench/prompts.jsonl in a fixed
order), greedy decoding with the same ``--max-tokens``. Modes:

- ``tao-serve``: ``python -m tao_core.cli serve MODEL`` on a loopback port, logging to a fresh SQLite
  inference table; the clients stream over HTTP (httpx), so time to first token is measured. After its
  graceful shutdown the table's rows are counted per level (``logged_rows``; zero lost means = ``sent``).
- ``tao-engine-offline``: tao's engine in a process of its own, the same requests as the same number of
  concurrent streams, no HTTP (``_serve_offline.py``).
- ``transformers-serve-cb`` and ``transformers-serve-no-cb``: ``transformers serve`` with continuous
  batching on and off, from its own venv (``--setup-venv`` creates it), on the same dequantized model
  (tao's cache entry, linked into a directory whose config names its architecture).

Servers bind 127.0.0.1 and get ``--threads`` CPU threads (default: the CPUs this process may use). A
mode has ``--time-limit`` seconds, server start included: what is in flight then is cancelled, the level
is reported ``cut`` and later levels ``skipped``. Every subprocess is killed at the end, error or not.
``output_tokens`` are the tokens returned (the responses' usage; text chunks for a cut request), rates are
per second of the level's window (first request to last response, or to the time limit when cut);
latency and TTFT percentiles are over completed requests. CSV rows go to stdout (and ``--out``), then the
two target ratios at the largest level.

    python bench/serve.py --quick                                # smoke: 1 and 4 clients, short answers
    python bench/serve.py --clients 1,8,32 --requests-per-client 4 --max-tokens 128 --time-limit 900
    python bench/serve.py --setup-venv                           # create the transformers serve venv
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from math import ceil
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve_procs as procs  # noqa: E402
from _harness import append_csv  # noqa: E402
from _serve_load import LevelResult, Workload, run_http_level, summarize  # noqa: E402

MODES = ("tao-serve", "tao-engine-offline", "transformers-serve-cb", "transformers-serve-no-cb")
FIELDS = [
    "mode", "clients", "sent", "requests", "failed", "status", "seconds", "requests_per_s", "output_tokens",
    "output_tokens_per_s", "p50_latency_s", "p99_latency_s", "ttft_p50_s", "logged_rows", "max_tokens",
    "model", "cpu", "threads", "versions", "date", "errors",
]
TARGETS = (  # (numerator mode, denominator modes: the best of them, target ratio of output tokens/s)
    ("tao-serve", ("tao-engine-offline",), 0.85),
    ("tao-serve", ("transformers-serve-cb", "transformers-serve-no-cb"), 3.0),
)
SHUTDOWN_S = 60.0  # a server's graceful shutdown (drain, table flush) may take this long, then it is killed


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.uname().machine


def read_prompts(path: Path) -> list[str]:
    prompts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{path}: no prompts (one JSON object with a \"text\" field per line)")
    return prompts


def http_levels(base_url: str, model: str, work: Workload, clients: list[int], deadline: float,
                name: str) -> list[LevelResult]:
    """A warm-up request, then each level in turn until the deadline."""
    warm = asyncio.run(run_http_level(f"{base_url}/v1/chat/completions", model,
                                      Workload(work.prompts[:1], 1, 8), 1, deadline, "bench-warmup"))
    failed = [t.error for t in warm.traces if t.error]
    if failed or not warm.traces:
        raise RuntimeError(f"{name}: the warm-up request failed: {failed[0] if failed else 'no time left'}")
    levels = []
    for n in clients:
        if time.perf_counter() >= deadline:
            break
        print(f"{name}: {n} client(s)", file=sys.stderr, flush=True)
        levels.append(asyncio.run(run_http_level(f"{base_url}/v1/chat/completions", model, work, n, deadline,
                                                 f"bench-c{n}")))
    return levels


def run_tao_serve(args, work: Workload, tmp: Path, deadline: float) -> tuple[list[LevelResult], dict[int, int]]:
    port, table = procs.free_port(), tmp / "inference.db"
    with procs.tao_serve(args.model, port, table, args.threads, args.max_tokens, tmp / "tao-serve.log") as proc:
        procs.wait_ready(proc, f"http://127.0.0.1:{port}", deadline)
        levels = http_levels(f"http://127.0.0.1:{port}", args.model, work, args.clients, deadline, "tao-serve")
        if not proc.stop(SHUTDOWN_S):
            print(f"tao serve did not shut down within {SHUTDOWN_S:.0f} s and was killed", file=sys.stderr)
    return levels, {lv.clients: procs.count_logged(table, f"bench-c{lv.clients}-") for lv in levels}


def run_transformers(args, work: Workload, tmp: Path, deadline: float, cb: bool) -> list[LevelResult]:
    problem = procs.venv_problem(args.venv)
    if problem:
        raise RuntimeError(problem)
    model_dir = tmp / "hf-model"
    if not model_dir.exists():
        procs.hf_model_dir(args.model, model_dir)
    if cb:  # a paged cache sized to the workload: the default sizes it from the machine's RAM (slow to set up)
        blocks = max(args.clients) * ceil((256 + args.max_tokens) / 256) * 2
        cb_args = ["--continuous-batching", "--cb-num-blocks", str(blocks), "--cb-max-batch-tokens", "2048",
                   *args.cb_args.split()]
    else:
        cb_args = ["--no-continuous-batching"]
    port = procs.free_port()
    name = "transformers-serve-cb" if cb else "transformers-serve-no-cb"
    with procs.transformers_serve(args.venv, model_dir, port, args.threads, cb_args, tmp / f"{name}.log") as proc:
        procs.wait_ready(proc, f"http://127.0.0.1:{port}", deadline)
        levels = http_levels(f"http://127.0.0.1:{port}", str(model_dir), work, args.clients, deadline, name)
        proc.stop(SHUTDOWN_S)
    return levels


def run_mode(mode: str, args, work: Workload, tmp: Path) -> tuple[list[LevelResult], dict[int, int], str]:
    """One mode's levels, logged rows per level (tao serve) and the versions it ran."""
    deadline = time.perf_counter() + args.time_limit
    if mode == "tao-serve":
        levels, logged = run_tao_serve(args, work, tmp, deadline)
        return levels, logged, tao_versions()
    if mode == "tao-engine-offline":
        spec = {"model": args.model, "threads": args.threads, "prompts": work.prompts, "max_tokens": work.max_tokens,
                "requests_per_client": work.requests_per_client, "clients": args.clients,
                "time_left_s": args.time_limit}
        found = procs.offline_engine(spec, args.threads, tmp / "offline.log", args.time_limit + 30)
        return [LevelResult.from_json(x) for x in found], {}, tao_versions()
    levels = run_transformers(args, work, tmp, deadline, cb=mode == "transformers-serve-cb")
    return levels, {}, procs.venv_versions(args.venv)


def tao_versions() -> str:
    from importlib.metadata import version

    return f"tao-core {version('tao-core')} torch {version('torch')}"


def mode_rows(mode: str, args, common: dict, tmp: Path, work: Workload) -> list[dict]:
    print(f"{mode}: starting (time limit {args.time_limit:.0f} s)", file=sys.stderr, flush=True)
    try:
        levels, logged, versions = run_mode(mode, args, work, tmp)
        error = ""
    except Exception as e:  # the mode failed as a whole: its rows say why, the other modes still run
        levels, logged, versions, error = [], {}, "", f"{type(e).__name__}: {e}"
        print(f"{mode} failed: {error}", file=sys.stderr, flush=True)
    rows = []
    by_clients = {lv.clients: lv for lv in levels}
    for n in args.clients:
        row = {**common, "mode": mode, "clients": n, "versions": versions}
        if n in by_clients:
            lv = by_clients[n]
            row.update(summarize(lv), sent=len(lv.traces), status="cut" if lv.cut else "ok",
                       logged_rows=logged.get(n, ""))
        else:
            row.update(sent=0, requests=0, status="error" if error else "skipped",
                       errors=error.splitlines()[0][:300] if error else "time limit reached before this level")
        rows.append(row)
    return rows


def ratio_rows(rows: list[dict], clients: int) -> list[list]:
    """The target ratios of output tokens/s at ``clients``: (ratio, clients, value, target, met)."""
    # a cut level counts: its rate is the tokens returned within the time limit, per second of it; a mode
    # named twice in --modes ran twice, and its fastest run counts (the one least slowed by other load)
    measured: dict[str, dict] = {}
    for r in rows:
        if r["clients"] == clients and r["status"] in ("ok", "cut") and r.get("output_tokens_per_s") not in ("", None):
            if r["mode"] not in measured or r["output_tokens_per_s"] > measured[r["mode"]]["output_tokens_per_s"]:
                measured[r["mode"]] = r
    rate = {mode: r["output_tokens_per_s"] for mode, r in measured.items()}
    out = []
    for num, dens, target in TARGETS:
        present = [d for d in dens if d in rate]
        best = max(present, key=lambda d: rate[d]) if present else None
        name = f"{num} / {best or ' or '.join(dens)} output_tokens_per_s"
        if num in rate and best is not None and rate[best] > 0:
            value = rate[num] / rate[best]
            cut = [m for m in (num, best) if measured[m]["status"] == "cut"]
            met = ("yes" if value >= target else "no") + (f" ({', '.join(cut)} cut by the time limit)" if cut else "")
            out.append([name, clients, round(value, 3), target, met])
        else:
            out.append([name, clients, "", target, "not measured (a mode missing or failed)"])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: clients 1,4, 1 request each, 16 tokens, 180 s a mode")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (greedy decoding)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, run in this order, of {', '.join(MODES)}; one named twice runs twice")
    ap.add_argument("--time-limit", type=float, default=900.0, help="hard bound in seconds per mode, start included")
    ap.add_argument("--model", default="smollm2-135m", help="tao model spec: alias, cache name, GGUF or HF directory")
    ap.add_argument("--prompts", type=Path, default=Path(__file__).parent / "prompts.jsonl")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads of each server")
    ap.add_argument("--venv", type=Path, default=procs.DEFAULT_VENV,
                    help="venv with transformers[serving] (default $TAO_BENCH_VENV or /tmp/tao-bench-venv)")
    ap.add_argument("--cb-args", default="", help="extra flags for transformers serve --continuous-batching")
    ap.add_argument("--setup-venv", action="store_true", help="create --venv (CPU torch, transformers[serving]) and exit")
    ap.add_argument("--out", help="also append the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens, args.time_limit = "1,4", 1, 16, 180.0
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients: expected comma-separated integers, got {args.clients!r}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for name in ("requests_per_client", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.clients) < 1 or args.time_limit <= 0:
        ap.error("--clients must be >= 1 and --time-limit > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup_venv:
        procs.setup_venv(args.venv)
        print(procs.venv_versions(args.venv))
        return
    work = Workload(read_prompts(args.prompts), args.requests_per_client, args.max_tokens)
    common = {"max_tokens": args.max_tokens, "model": args.model, "cpu": cpu_name(), "threads": args.threads,
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    writer = csv.DictWriter(sys.stdout, FIELDS, extrasaction="ignore")
    writer.writeheader()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tao-bench-serve-") as tmp:
        for mode in args.modes:
            mode_rows_ = mode_rows(mode, args, common, Path(tmp), work)
            writer.writerows(mode_rows_)
            sys.stdout.flush()
            rows.extend(mode_rows_)
    if args.out:
        append_csv(args.out, FIELDS, rows)
    print()
    ratios = csv.writer(sys.stdout)
    ratios.writerow(["ratio", "clients", "value", "target", "met"])
    ratios.writerows(ratio_rows(rows, max(args.clients)))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups: no server outlives the benchmark
    main()
