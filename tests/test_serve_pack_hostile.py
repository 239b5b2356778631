"""Hostile checks of `tao serve`'s packed weights (EngineConfig.pack_weights) and its passing threads.

- Many reload/rollback cycles on the real server with packed weights: every answer equals what an
  unpacked engine over its version's directory samples, and the packed cache holds one copy per linear
  weight once a swap settles (no copy of a dropped weight set is kept).
- Weight writes that PyTorch's version counter does not record (a fused AdamW step, ping-pong
  ``param.data = buffer`` swaps) are picked up after ``Engine.weights_changed()`` / ``PackedLinears.clear()``;
  a fresh tensor swapped in with ``.data =`` never passes for the old one, even at a reused address.
- Ctrl-C while `tao serve` loads the model: the command waits for the loading thread to end (a thread
  still inside torch at interpreter exit dies of SIGABRT, "terminate called without an active
  exception"), then exits with "Aborted!" and the table closed.
- A load error raised in the passing thread reaches the command with its type and closes the table; the
  flywheel's gate in its passing thread: a gate that raises is recorded as a rejected round naming the
  error, and a stop during the gate records the round as interrupted with no reload.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tao_core import onednn  # noqa: E402
from tao_core.engine import Engine, EngineConfig, EngineRequest  # noqa: E402
from tao_core.engine.linear import PackedLinears  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.app import create_app  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.types import SamplingParams  # noqa: E402
from tests.conftest import make_tiny_model_dir  # noqa: E402
from tests.test_serve import RecordingLogger, Running, on_loopback, wait_until  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "tao_home")
packing = pytest.mark.skipif(not onednn.packing_available(), reason="oneDNN weight packing not available here")

MODEL = "tiny"
ADMIN = "admin-token-for-tests"
PROMPT = [17, 43, 101, 7, 250, 66, 12, 90]
TOKENS = 12
SEEDS = range(6)


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return {"1": tiny_model_dir, "2": make_tiny_model_dir(tmp_path_factory.mktemp("pack-hostile") / "new", seed=1)}


@pytest.fixture(scope="module")
def offline(dirs) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """Per version, per seed: what an unpacked engine over that directory alone samples for PROMPT."""
    out = {}
    for version, d in dirs.items():
        lm = load_model(str(d))
        engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids, config=EngineConfig(pack_weights=False))
        results = engine.run([EngineRequest(PROMPT, SamplingParams(temperature=1.0, seed=s, max_new_tokens=TOKENS))
                              for s in SEEDS])
        out[version] = {s: (r.samples[0].token_ids, r.samples[0].logprobs) for s, r in zip(SEEDS, results, strict=True)}
    assert out["1"] != out["2"], "the two versions must sample differently for the test to mean anything"
    return out


def _linear_weights(model: torch.nn.Module) -> int:
    """Distinct weight tensors of the model's plain nn.Linear modules (the tied LM head counts once)."""
    return len({id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear})


@packing
def test_many_swap_cycles_serve_each_versions_tokens_and_keep_one_packed_copy_per_weight(dirs, offline):
    import httpx

    config = ServeConfig(served_model=MODEL, model_version="1", max_queue=16, max_tokens_limit=64,
                         default_max_tokens=16, pack_weights=True)
    logger = RecordingLogger()
    app = create_app(load_model(str(dirs["1"])), config, logger=logger, admin_token=ADMIN)
    with on_loopback(app) as (server, thread, port):
        s = Running(app, server, thread, port, logger)
        engine = s.state.loop.engine
        assert isinstance(engine.runner.linear, PackedLinears)
        weights = _linear_weights(engine.model)
        api = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(seed: int):
            return api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=1.0, seed=seed,
                                          logprobs=1)

        def check(answer, seed: int) -> None:  # whichever version answered, its tokens are that version's
            version = answer.system_fingerprint.removeprefix("tao-")
            tokens, logprobs = offline[version][seed]
            assert answer.choices[0].logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4), (version, seed)
            assert len(answer.choices[0].logprobs.tokens) == len(tokens)

        def settled() -> bool:
            return s.state.loop.running == s.state.loop.waiting == 0 and engine.weight_sets == ["policy"]

        with ThreadPoolExecutor(4) as pool:
            for cycle in range(6):
                for route, body, version in (("reload", {"model": str(dirs["2"]), "version": "2"}, "2"), ("rollback", None, "1")):
                    seeds = [(cycle + k) % len(SEEDS) for k in range(3)]
                    in_flight = [(pool.submit(complete, seed), seed) for seed in seeds]  # around the swap
                    r = httpx.post(f"{s.url}/admin/{route}", json=body, headers={"Authorization": f"Bearer {ADMIN}"},
                                   timeout=120)
                    assert r.status_code == 200, r.text
                    for f, seed in in_flight:
                        check(f.result(), seed)
                    wait_until(settled, f"swap {cycle}/{route} to settle")
                    after = complete(cycle % len(SEEDS))
                    assert after.system_fingerprint == f"tao-{version}"
                    check(after, cycle % len(SEEDS))
                    # one packed copy per linear weight: none of a dropped weight set's copies is kept
                    assert len(engine.runner.linear) == weights, (cycle, route, len(engine.runner.linear), weights)


# weight writes the packed cache does not see ------------------------------------------------------------

def _fused_adamw_step(lin: torch.nn.Linear) -> None:
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    with torch.enable_grad():
        lin(torch.randn(4, lin.in_features)).square().sum().backward()
    opt.step()


def _ping_pong_buffers(lin: torch.nn.Linear) -> None:
    """Weights loaded into a spare buffer, then swapped in with ``.data =`` (double-buffered weight sync):
    the tensor's data pointer returns to one the cache has seen, and ``.data =`` leaves ``_version`` as it was."""
    first = lin.weight.data
    lin.weight.data = torch.empty_like(first)  # the other buffer is served meanwhile
    first.copy_(torch.randn_like(first))  # the next weights land in the first buffer...
    lin.weight.data = first  # ...which is swapped back in


@packing
@pytest.mark.parametrize("write", [_fused_adamw_step, _ping_pong_buffers], ids=["fused-adamw", "ping-pong-data"])
def test_writes_the_version_counter_misses_are_seen_after_clear(write):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    fn, x = PackedLinears(), torch.randn(5, 64)
    with torch.no_grad():
        before = fn(lin, x)
    write(lin)
    fn.clear()  # what Engine.weights_changed() does
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
        assert not torch.allclose(want, before, atol=1e-3), "the write must change the output (test premise)"
        assert torch.allclose(fn(lin, x), want, atol=1e-5), "the packed engine multiplies by the old weights"


@packing
def test_a_fresh_tensor_swapped_in_never_passes_for_the_old_one():
    """``param.data = fresh`` leaves ``_version`` as it was; without the packed-from storage held, the
    allocator reused the old address about half the time and the stale copy was used."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    fn, x = PackedLinears(), torch.randn(5, 64)
    for _ in range(50):
        with torch.no_grad():
            fn(lin, x)
            lin.weight.data = torch.randn_like(lin.weight)
            assert torch.allclose(fn(lin, x), F.linear(x, lin.weight, lin.bias), atol=1e-5)


@packing
def test_a_packed_engine_samples_with_the_weights_after_a_fused_adamw_step(tiny_model_dir):
    """A fused AdamW step on CPU bumps no version counter: Engine.weights_changed() says so."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir))
    requests = lambda: [EngineRequest(PROMPT, SamplingParams(temperature=1.0, seed=s, max_new_tokens=8))  # noqa: E731
                        for s in range(3)]
    packed = Engine(model, eos_token_ids=[], config=EngineConfig(max_kv_tokens=1024, pack_weights=True))
    before = [lp for r in packed.run(requests()) for lp in r.samples[0].logprobs]  # packs every weight
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(torch.tensor([PROMPT])).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()
    reference = copy.deepcopy(model)  # an engine of its own, so nothing it does touches the packed engine's model
    plain = Engine(reference, eos_token_ids=[], config=EngineConfig(max_kv_tokens=1024, pack_weights=False))
    want = [lp for r in plain.run(requests()) for lp in r.samples[0].logprobs]
    assert want != pytest.approx(before, abs=1e-3), "the step must change what is sampled (test premise)"
    packed.weights_changed()
    got = [lp for r in packed.run(requests()) for lp in r.samples[0].logprobs]
    assert got == pytest.approx(want, abs=1e-4)


# tao serve's command: errors and Ctrl-C while the model loads in its passing thread ---------------------

def test_a_load_error_in_the_passing_thread_keeps_its_type_and_closes_the_table(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tao_core.errors import ModelLoadError
    from tao_core.serve.cli import serve_cmd
    from tao_core.table import InferenceTable

    closed: list[str] = []
    close = InferenceTable.close
    monkeypatch.setattr(InferenceTable, "close", lambda self, *a, **k: (closed.append(self.url), close(self, *a, **k))[1])
    result = CliRunner().invoke(serve_cmd, [str(tmp_path / "no-such-model"), "--table", str(tmp_path / "t.db"),
                                            "--keys", str(tmp_path / "keys.json")])
    assert type(result.exception) is ModelLoadError, result.output  # `tao` prints it as `error: ...`, status 2
    assert "no-such-model" in str(result.exception) and "not found" in str(result.exception)
    assert len(closed) == 1


SLOW_LOAD = textwrap.dedent("""
    import sys, time, torch
    import tao_core.models, tao_core.table
    release = sys.argv[1]

    def slow_load(*args, **kwargs):  # torch work until the test releases it (or 120 s pass)
        print("LOADING", flush=True)
        a, deadline = torch.randn(600, 600), time.monotonic() + 120
        while time.monotonic() < deadline and not __import__("os").path.exists(release):
            a = torch.tanh(a @ a)
        raise SystemExit("the load was released")

    close = tao_core.table.InferenceTable.close
    def close_and_say(self, *args, **kwargs):
        print("TABLE-CLOSED", flush=True)
        return close(self, *args, **kwargs)

    tao_core.models.load_model = slow_load
    tao_core.table.InferenceTable.close = close_and_say
    from tao_core.serve.cli import serve_cmd
    serve_cmd(sys.argv[2:])
""")


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_while_the_model_loads_exits_cleanly_and_closes_the_table(tmp_path):
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, str(release), "tiny", "--table", str(tmp_path / "t.db"),
                             "--keys", str(tmp_path / "keys.json"), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        assert proc.stdout.readline().strip() == "LOADING"
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the command now waits for the load to end: end it
        release.touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "terminate called" not in out, out
    assert proc.returncode == 1, (proc.returncode, out)  # click's "Aborted!", not a signal's death
    assert "TABLE-CLOSED" in out, out


# the flywheel's gate in its passing thread ------------------------------------------------------------

@pytest.fixture
def controller(tmp_path, tiny_model_dir, monkeypatch):
    """A Controller whose round 'process' writes a final model at once (no training)."""
    from tao_core import flywheel_controller
    from tao_core.flywheel_config import load_flywheel_config
    from tao_core.flywheel_controller import Controller, Served, Trigger, read_history
    from tao_core.flywheel_gate import load_gate_scorer
    from tao_core.table import InferenceTable
    from tests.test_flywheel import SHORT, write_config

    class InstantRound:
        def __init__(self, config_path: Path, log_path: Path, threads: int | None) -> None:
            self.final = config_path.with_suffix("") / "final"
            self.pid = 1

        def start(self) -> None:
            self.final.mkdir(parents=True)

        def wait(self, stop: threading.Event, poll_s: float = 0.2) -> int:
            return 0

        def log_tail(self, n: int) -> str:
            return ""

    monkeypatch.setattr(flywheel_controller, "RoundProcess", InstantRound)
    cfg = load_flywheel_config(write_config(tmp_path, tiny_model_dir, SHORT, min_new_prompts=4))
    table = InferenceTable.open(cfg.table.url)
    reloads: list[tuple[str, str]] = []
    c = Controller(cfg, table, load_gate_scorer(cfg.gate), lambda d, v: reloads.append((d, v)),
                   served=Served(str(tiny_model_dir), "0"), history=read_history(tmp_path / "none.jsonl"))
    yield c, reloads, Trigger("prompts", 4)
    table.close()


def test_a_gate_that_raises_in_its_passing_thread_is_a_rejected_round(controller, monkeypatch):
    c, reloads, trigger = controller
    threads: list[threading.Thread] = []

    class JudgeBroke(RuntimeError):
        pass

    def gate(run, final):
        threads.append(threading.current_thread())
        raise JudgeBroke("the judge returned garbage")

    monkeypatch.setattr(c, "_gate", gate)
    record = c.run_round(trigger)
    assert threads and threads[0] is not threading.current_thread() and threads[0].name == "tao-flywheel-gate"
    assert record["status"] == "rejected" and not record["promoted"]
    assert "JudgeBroke: the judge returned garbage" in record["reason"]
    assert (record["version"], reloads) == ("0", [])


def test_a_stop_during_the_gate_records_an_interrupted_round_and_reloads_nothing(controller, monkeypatch):
    c, reloads, trigger = controller

    def gate(run, final):  # the flywheel is stopped while the gate judges; the gate itself says promote
        c.stop()
        return {"prompts": 8, "judged": 8, "promoted": True, "reason": "better"}

    monkeypatch.setattr(c, "_gate", gate)
    record = c.run_round(trigger)
    assert record["status"] == "interrupted" and not record["promoted"], record
    assert reloads == [] and record["version"] == "0"
