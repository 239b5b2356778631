"""Sampling throughput: tao's engine vs Hugging Face ``generate`` on the same model and prompts.

Both providers get the same prompt token ids (bench/prompts.jsonl through the chat template), the
same sampling settings (temperature 1, no truncation) and exactly ``new_tokens`` new tokens per
sample (end-of-sequence ignored). The engine starts every run with an empty prefix index, as
``generate`` does; within a run, prompts share the blocks of their common system prompt. Each provider is warmed up first; a timed run is one call, and
with ``--repeats N`` the providers take turns N times and the fastest run of each is reported (on a
shared machine the fastest run is the one least slowed by other processes). ``tokens_per_s``
counts new tokens only, per wall-clock second; ``cpu_tokens_per_s`` per second of this process's CPU
time, which other processes sharing the core do not inflate (with one thread it is the wall time
the run would take alone, up to cache and memory-bandwidth sharing). CSV rows go to stdout (and are
appended to ``--out``).

The ``matmul-bound`` row is not a provider: it times the decode step's matrix products alone (every
layer's projections and the LM head, on the model's own weights, through the engine's linear, at
the scenario's batch of rows; fastest of 5 steps) and reports the tokens/s a decode step would reach
if it cost nothing else: no attention, sampling, prefill or glue. No engine running these weights in
this dtype on this machine can beat it, so its ``speedup_vs_hf`` says how far a target is reachable.

    python bench/engine.py            # scenarios (a) 32 prompts x 128, (b) 8 prompts x n=16 x 128
    python bench/engine.py --quick    # smaller shapes, under 3 minutes on a CPU
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tao_core.engine import Engine, EngineConfig, EngineRequest
from tao_core.models import load_model
from tao_core.types import Prompt, SamplingParams, read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import append_csv  # noqa: E402

HERE = Path(__file__).parent
FIELDS = [
    "scenario", "provider", "device", "model", "dtype", "prompts", "n", "new_tokens",
    "tokens", "seconds", "tokens_per_s", "speedup_vs_hf", "cpu_seconds", "cpu_tokens_per_s", "cpu_speedup_vs_hf",
    "repeats", "all_seconds", "threads", "torch", "date",
]
# name -> (prompts, samples per prompt, new tokens)
SCENARIOS = {"a": (32, 1, 128), "b": (8, 16, 128)}
QUICK = {"a": (8, 1, 32), "b": (2, 8, 32)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"cpu {model} ({os.cpu_count()} cores)"


def run_engine(engine: Engine, prompts: list[list[int]], n: int, new_tokens: int) -> int:
    # start cold: no prompt blocks kept from an earlier run (Hugging Face recomputes its prompts
    # every call); blocks shared inside this call (the chat template's system prompt) still count
    engine.cache.invalidate()
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, seed=0)
    results = engine.run([EngineRequest(p, params, ignore_eos=True) for p in prompts])
    return sum(len(s.token_ids) for r in results for s in r.samples)


@torch.inference_mode()
def matmul_step_seconds(engine: Engine, rows: int, repeats: int = 5) -> float:
    """Fastest time of one decode step's matrix products alone for ``rows`` sequences."""
    r = engine.runner
    cfg = r.config
    x = torch.randn(rows, cfg.hidden_size, dtype=r.param_dtype, device=r.device)
    a = torch.randn(rows, r.num_heads * r.head_dim, dtype=r.param_dtype, device=r.device)
    m = torch.randn(rows, cfg.intermediate_size, dtype=r.param_dtype, device=r.device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        for layer in r.core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for module, inp in ((attn.q_proj, x), (attn.k_proj, x), (attn.v_proj, x), (attn.o_proj, a),
                                (mlp.gate_proj, x), (mlp.up_proj, x), (mlp.down_proj, m)):
                r.linear(module, inp)
        r.linear(r.lm_head, x)
        if r.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def run_hf(model, pad_id: int, prompts: list[list[int]], n: int, new_tokens: int) -> int:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    cfg = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, num_return_sequences=n, pad_token_id=pad_id,
    )
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=cfg)
    return (out.shape[1] - width) * out.shape[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (under 3 minutes on a CPU)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scenarios", default="a,b")
    ap.add_argument("--providers", default="engine,hf,bound", help="engine, hf, bound (the matmul-bound row)")
    ap.add_argument("--prompts", default=str(HERE / "prompts.jsonl"))
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per provider, taken in turns; the fastest is reported")
    ap.add_argument("--out", help="also append the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    pad_id = lm.tokenizer.pad_token_id
    all_ids = [lm.prompt_token_ids(p) for p in read_jsonl(args.prompts, Prompt)]
    # Hugging Face runs its own copy of the model as transformers loads it: the engine re-lays the
    # Linear weights of the model it is given (K-major, see tao_core.onednn.k_major_linears)
    hf_model = load_model(args.model, dtype=args.dtype, device=args.device).model if "hf" in args.providers else None
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids, config=EngineConfig(max_kv_tokens=32768))
    shapes = QUICK if args.quick else SCENARIOS
    common = {
        "device": device_name(lm.device), "model": args.model, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    rows = []
    for name in args.scenarios.split(","):
        n_prompts, n, new_tokens = shapes[name]
        prompts = all_ids[:n_prompts]
        fns = {}
        for provider in args.providers.split(","):
            if provider == "bound":
                continue
            if provider == "engine":
                fns[provider] = lambda ps, k, t: run_engine(engine, ps, k, t)  # noqa: E731
            else:
                fns[provider] = lambda ps, k, t: run_hf(hf_model, pad_id, ps, k, t)  # noqa: E731
            fns[provider](prompts[:2], 2, 4)  # warm-up
        times: dict[str, list[float]] = {p: [] for p in fns}
        cpu_times: dict[str, list[float]] = {p: [] for p in fns}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for provider, fn in fns.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                counts[provider] = fn(prompts, n, new_tokens)
                times[provider].append(time.perf_counter() - start)
                cpu_times[provider].append(time.process_time() - cpu_start)
        speed, cpu_speed = {}, {}
        for provider, ts in times.items():
            seconds, cpu_seconds, tokens = min(ts), min(cpu_times[provider]), counts[provider]
            speed[provider], cpu_speed[provider] = tokens / seconds, tokens / cpu_seconds
            row = {
                **common, "scenario": name, "provider": "tao-engine" if provider == "engine" else "hf-generate",
                "prompts": n_prompts, "n": n, "new_tokens": new_tokens, "tokens": tokens,
                "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                "speedup_vs_hf": "", "cpu_seconds": round(cpu_seconds, 2),
                "cpu_tokens_per_s": round(tokens / cpu_seconds, 1), "cpu_speedup_vs_hf": "", "repeats": args.repeats, "all_seconds": " ".join(f"{t:.2f}" for t in ts),
            }
            rows.append(row)
        if "engine" in speed and "hf" in speed:
            row = rows[-len(speed) + list(speed).index("engine")]
            row["speedup_vs_hf"] = round(speed["engine"] / speed["hf"], 2)
            row["cpu_speedup_vs_hf"] = round(cpu_speed["engine"] / cpu_speed["hf"], 2)
        if "bound" in args.providers.split(","):
            step = matmul_step_seconds(engine, n_prompts * n)
            tokens = n_prompts * n * new_tokens
            seconds = step * new_tokens
            row = {
                **common, "scenario": name, "provider": "matmul-bound", "prompts": n_prompts, "n": n,
                "new_tokens": new_tokens, "tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "speedup_vs_hf": round(tokens / seconds / speed["hf"], 2) if "hf" in speed else "",
                "cpu_seconds": "", "cpu_tokens_per_s": "", "cpu_speedup_vs_hf": "", "repeats": 5, "all_seconds": "",
            }
            rows.append(row)
            speed["bound"] = tokens / seconds
        for row in rows[-len(speed) :]:
            writer.writerow(row)
        sys.stdout.flush()
    if args.out:
        append_csv(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
