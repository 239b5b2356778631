"""The serving benchmark's offline mode: tao's engine in this process, the same workload with no HTTP.

``bench/serve.py`` runs this file as a subprocess (so the benchmark's own process never loads torch and
every mode gets a process of its own), with a JSON spec on stdin; it prints one JSON line per level
(``_serve_load.LevelResult.to_json``) on stdout. The engine has the settings ``tao serve`` gives it by
default (``ServeConfig.max_kv_tokens``, ``max_running`` and ``pack_weights``), and one engine serves every level, as one
server does. A level keeps ``clients`` requests in flight, each client submitting its next request when
its previous one finishes, as the HTTP clients do; a request's chat prompt is tokenized as the server
tokenizes a chat request (``LoadedModel.prompt_token_ids``), and decoding is greedy with the same
``max_tokens``. The spec's ``time_left_s`` counts from this process's start, model loading included.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

from tao_core.engine import Engine, EngineConfig, EngineRequest  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.types import Prompt, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_load import CUT, LevelResult, Trace, Workload  # noqa: E402


def run_level(engine: Engine, prompt_ids, work: Workload, clients: int, deadline: float) -> LevelResult:
    """``clients`` closed-loop streams of requests on ``engine`` until done or ``deadline``."""
    level = LevelResult(clients)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=work.max_tokens)
    t0 = time.perf_counter()
    live: dict[int, tuple[int, int, Trace]] = {}  # engine id -> (client, request index, trace)

    def submit(c: int, j: int) -> None:
        trace = Trace(start=time.perf_counter() - t0)
        level.traces.append(trace)

        def on_token(_rid: int, _sample: int, _token: int, _logprob: float) -> None:
            trace.tokens += 1
            if trace.first_token is None:
                trace.first_token = time.perf_counter() - t0

        rid = engine.add_request(EngineRequest(prompt_ids(c, j), params, on_token=on_token))
        live[rid] = (c, j, trace)

    for c in range(clients):
        submit(c, 0)
    while engine.has_unfinished() or live:
        if time.perf_counter() >= deadline and not level.cut:
            level.cut = True
            for rid in list(live):
                engine.abort(rid)
        for result in engine.step():
            c, j, trace = live.pop(result.request_id)
            sample = result.samples[0] if result.samples else None
            if level.cut and (sample is None or sample.finish_reason == "abort"):
                trace.error = CUT
            elif result.error is not None or sample is None or sample.finish_reason == "error":
                trace.error = result.error or "the engine failed the request"
            else:
                trace.end = time.perf_counter() - t0
                trace.tokens = len(sample.token_ids)
            if not level.cut and j + 1 < work.requests_per_client:
                submit(c, j + 1)
    level.cut = level.cut or len(level.traces) < clients * work.requests_per_client
    ends = [t.end for t in level.traces if t.end is not None]
    level.seconds = deadline - t0 if level.cut else max(ends, default=time.perf_counter() - t0)
    return level


def main() -> None:
    spec = json.load(sys.stdin)
    deadline = START + spec["time_left_s"]
    torch.set_num_threads(spec["threads"])
    work = Workload(spec["prompts"], spec["requests_per_client"], spec["max_tokens"])
    lm = load_model(spec["model"])
    defaults = ServeConfig()
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids,
                    config=EngineConfig(max_kv_tokens=defaults.max_kv_tokens, max_running=defaults.max_running,
                                       pack_weights=defaults.pack_weights))
    ids = {text: lm.prompt_token_ids(Prompt(id="bench", messages=[{"role": "user", "content": text}]))
           for text in dict.fromkeys(work.prompts)}

    def prompt_ids(c: int, j: int) -> list[int]:
        return ids[work.prompt(c, j)]

    # the warm-up the HTTP modes get too: one short request (native kernels built, caches touched)
    engine.run([EngineRequest(prompt_ids(0, 0), SamplingParams(n=1, temperature=0.0, max_new_tokens=8))])
    for clients in spec["clients"]:
        if time.perf_counter() >= deadline:
            break
        print(f"tao-engine-offline: {clients} client(s)", file=sys.stderr, flush=True)
        level = run_level(engine, prompt_ids, work, clients, deadline)
        print(json.dumps(level.to_json()), flush=True)


if __name__ == "__main__":
    main()
