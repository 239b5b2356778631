"""Model versions in `tao serve`: `POST /admin/reload` and `/admin/rollback` on the real server (loopback,
the official `openai` client), and the `ModelVersions` Python API the flywheel calls.

Two tiny model directories of the same architecture with different seeds are the two versions. Their
greedy tokens are the same (a tiny random model repeats its last prompt token), so requests sample at
temperature 1 with a seed: a request's tokens then depend only on its seed and on the weights (the
engine's per-request random streams), and each logged row is compared with the tokens and log-probs of
an engine over the version's directory, run offline. A test that needs requests in flight during a swap
holds the engine loop's steps (:class:`SwapGate`) instead of relying on timing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tao_core.engine import Engine, EngineConfig, EngineRequest, SampleResult  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.app import create_app  # noqa: E402
from tao_core.serve.engine_loop import EngineLoop, Submission  # noqa: E402
from tao_core.serve.exchange import Exchanges  # noqa: E402
from tao_core.serve.metrics import Metrics  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.serve.versions import ModelVersions, VersionError  # noqa: E402
from tao_core.types import SamplingParams  # noqa: E402
from tests.conftest import make_tiny_model_dir  # noqa: E402
from tests.test_serve import RecordingLogger, Running, on_loopback, wait_until  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "tao_home")

MODEL = "tiny"
ADMIN = "admin-token-for-tests"
CONFIG = ServeConfig(served_model=MODEL, model_version="1", max_queue=16, max_tokens_limit=64, default_max_tokens=16)
PROMPT = [17, 43, 101, 7, 250, 66, 12, 90]
TOKENS = 16  # max_tokens of every request
SEEDS = range(8)


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The served model ("old"), another seed of it ("new"), a narrower model ("narrow")."""
    root = tmp_path_factory.mktemp("versions")
    return {"old": tiny_model_dir, "new": make_tiny_model_dir(root / "new", seed=1),
            "narrow": make_tiny_model_dir(root / "narrow", hidden=32)}


@pytest.fixture(scope="module")
def offline(dirs) -> dict[str, dict[int, SampleResult]]:
    """Per version, per seed: what an engine over that directory alone samples for PROMPT."""
    out = {}
    for name in ("old", "new"):
        lm = load_model(str(dirs[name]))
        engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids)
        results = engine.run([EngineRequest(PROMPT, SamplingParams(temperature=1.0, seed=s, max_new_tokens=TOKENS))
                              for s in SEEDS])
        out[name] = {s: r.samples[0] for s, r in zip(SEEDS, results, strict=True)}
    assert out["old"] != out["new"], "the two versions must sample differently for these tests to mean anything"
    return out


@contextmanager
def serving(model_dir: Path) -> Iterator[Running]:
    """The real server over a fresh copy of ``model_dir``'s model (a swap changes its parameters in place)."""
    logger = RecordingLogger()
    app = create_app(load_model(str(model_dir)), CONFIG, logger=logger, admin_token=ADMIN)
    with on_loopback(app) as (server, thread, port):
        yield Running(app, server, thread, port, logger)


def admin(s: Running, route: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{s.url}/admin/{route}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)


def client(s: Running):
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(s: Running, seed: int):
    return client(s).completions.create(model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=1.0, seed=seed)


def stream(s: Running, seed: int) -> list:
    return list(client(s).completions.create(model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=1.0,
                                             seed=seed, stream=True))


def check_answered_by(s: Running, request_id: str, fingerprint: str, version: str, sample: SampleResult) -> None:
    """The logged row names ``version``, as the response's fingerprint does, and holds that version's tokens."""
    row = s.logger.find(request_id)
    assert (row["status_code"], row["model_version"], row["policy_version"]) == (200, version, version)
    assert fingerprint == f"tao-{version}"
    assert row["completion_token_ids"] == [sample.token_ids]
    assert row["completion_logprobs"][0] == pytest.approx(sample.logprobs, abs=1e-4)


def settled(s: Running) -> bool:
    """Back to one copy of the weights: no weight set beside the model's own parameters."""
    return s.state.loop.running == s.state.loop.waiting == 0 and s.state.loop.engine.weight_sets == ["policy"]


class SwapGate:
    """Lets the engine loop step only ``allow``-ed steps until a swap has registered the new weights; then
    every step. A held step returns without stepping, so the loop keeps applying its commands (the swap)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._step = engine.step
        self._permits = threading.Semaphore(0)
        self.steps = 0
        self.swapped = False

    def step(self):
        self.swapped = self.swapped or len(self.engine.weight_sets) > 1
        if not self.swapped and not self._permits.acquire(blocking=False):
            time.sleep(0.002)
            return []
        self.steps += 1
        return self._step()

    def allow(self, steps: int) -> None:
        for _ in range(steps):
            self._permits.release()


def test_requests_in_flight_finish_on_the_old_version_and_new_ones_get_the_new(dirs, offline):
    with serving(dirs["old"]) as s:
        engine = s.state.loop.engine
        gate = SwapGate(engine)
        engine.step = gate.step
        with ThreadPoolExecutor(8) as pool:
            old = [pool.submit(stream, s, seed) for seed in (0, 1, 2)] + [pool.submit(complete, s, 3)]
            wait_until(lambda: s.state.loop.waiting == 4, "the four requests to reach the engine")
            gate.allow(3)  # each old request samples its first tokens...
            wait_until(lambda: gate.steps == 3 and s.state.loop.running == 4, "three engine steps")
            reloaded = admin(s, "reload", {"model": str(dirs["new"])})  # ...and is still running at the swap
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json() == {"version": "2", "previous": "1", "model": str(dirs["new"].resolve())}
            assert s.state.versions.current == "2"
            new = [pool.submit(stream, s, seed) for seed in (4, 5)] + [pool.submit(complete, s, 6)]
            answers = [f.result() for f in old + new]
        for seed, answer, version in zip((0, 1, 2, 3, 4, 5, 6), answers, ["1"] * 4 + ["2"] * 3, strict=True):
            name = "old" if version == "1" else "new"
            if isinstance(answer, list):  # a stream: every chunk carries the version
                assert answer[-1].choices[0].finish_reason in ("stop", "length")
                assert {c.system_fingerprint for c in answer} == {f"tao-{version}"}
                text = "".join(c.choices[0].text for c in answer if c.choices)
                answer = answer[0]
            else:
                text = answer.choices[0].text
            check_answered_by(s, answer.id, answer.system_fingerprint, version, offline[name][seed])
            assert s.logger.find(answer.id)["response_json"]["choices"][0]["text"] == text
        wait_until(lambda: settled(s), "the old weights to be dropped")
        after = complete(s, 7)  # on the model's own parameters again, which now hold the new version
        check_answered_by(s, after.id, after.system_fingerprint, "2", offline["new"][7])


def test_a_request_is_logged_under_the_version_it_was_admitted_under_not_at_arrival(dirs, offline, monkeypatch):
    """A request that arrives before a reload but reaches the engine after it is answered by the new version."""
    with serving(dirs["old"]) as s:
        arrived, release = threading.Event(), threading.Event()
        begin = s.state.exchanges.begin

        def begin_and_tell(*args, **kwargs):
            ex = begin(*args, **kwargs)
            arrived.set()
            return ex

        monkeypatch.setattr(s.state.exchanges, "begin", begin_and_tell)

        def body() -> Iterator[bytes]:  # the body's second half is sent after the reload
            yield f'{{"model": "{MODEL}", "prompt": {json.dumps(PROMPT)}'.encode()
            release.wait(60)
            yield f', "max_tokens": {TOKENS}, "temperature": 1.0, "seed": 5}}'.encode()

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{s.url}/v1/completions", content=body(), timeout=120)
            assert arrived.wait(60)
            assert admin(s, "reload", {"model": str(dirs["new"])}).status_code == 200
            release.set()
            answer = pending.result().json()
        check_answered_by(s, answer["id"], answer["system_fingerprint"], "2", offline["new"][5])


def test_rollback_serves_the_previous_version_again(dirs, offline):
    with serving(dirs["old"]) as s:
        assert admin(s, "reload", {"model": str(dirs["new"]), "version": "round-1"}).status_code == 200
        r = complete(s, 0)
        check_answered_by(s, r.id, r.system_fingerprint, "round-1", offline["new"][0])
        assert httpx.get(f"{s.url}/health").json()["model_version"] == "round-1"
        assert [m.version for m in client(s).models.list().data] == ["round-1"]
        back = admin(s, "rollback")
        assert back.status_code == 200, back.text
        assert back.json() == {"version": "1", "previous": "round-1", "model": str(dirs["old"].resolve())}
        r = complete(s, 0)
        check_answered_by(s, r.id, r.system_fingerprint, "1", offline["old"][0])
        assert httpx.get(f"{s.url}/health").json()["model_version"] == "1"
        again = admin(s, "rollback")  # nothing before the first version
        assert again.status_code == 409 and again.json()["error"]["code"] == "no_previous_version"
        assert s.state.versions.current == "1"
        wait_until(lambda: settled(s), "the swap to settle")
        # the same directory may be served again under its own name; another directory may not take it
        assert admin(s, "reload", {"model": str(dirs["new"]), "version": "round-1"}).status_code == 200
        taken = admin(s, "reload", {"model": str(dirs["old"]), "version": "round-1"})
        assert taken.status_code == 400 and taken.json()["error"]["param"] == "version"


def _truncated(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    return dest


def test_a_refused_reload_is_a_400_naming_the_problem_and_changes_nothing(dirs, offline, tmp_path):
    cases = [
        ({"model": str(tmp_path / "nowhere")}, "model", "no such model directory"),
        ({"model": str(dirs["narrow"])}, "model", "hidden_size 32 (served: 64)"),
        ({"model": str(_truncated(dirs["new"], tmp_path / "cut"))}, "model", "cannot read the weights"),
        ({"model": str(dirs["new"]), "version": "1"}, "version", "is the one served"),
        ({"model": str(dirs["new"]), "version": ""}, "version", "non-empty printable string"),
        ({"model": 3}, "model", "path of a model directory"),
        ({"model": str(dirs["new"]), "weights": "x"}, "weights", "unknown field"),
    ]
    with serving(dirs["old"]) as s:
        for body, param, message in cases:
            r = admin(s, "reload", body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and message in error["message"], (body, error)
        assert httpx.post(f"{s.url}/admin/reload", json={"model": str(dirs["new"])}).status_code == 401
        assert s.state.versions.current == "1" and s.state.versions.history[-1].model_dir == dirs["old"].resolve()
        r = complete(s, 1)
        check_answered_by(s, r.id, r.system_fingerprint, "1", offline["old"][1])


def test_a_swap_the_engine_refuses_leaves_the_served_version(dirs, offline, monkeypatch):
    with serving(dirs["old"]) as s:
        engine = s.state.loop.engine

        def refuse(name, tensors):
            raise RuntimeError("out of device memory")

        monkeypatch.setattr(engine, "add_weight_set", refuse)
        r = admin(s, "reload", {"model": str(dirs["new"])})
        assert r.status_code == 500 and "version '1' is still served" in r.json()["error"]["message"]
        assert s.state.versions.current == "1" and engine.weight_sets == ["policy"]
        answer = complete(s, 2)
        check_answered_by(s, answer.id, answer.system_fingerprint, "1", offline["old"][2])
        monkeypatch.undo()
        assert admin(s, "reload", {"model": str(dirs["new"])}).json()["version"] == "2"


def test_concurrent_reloads_are_serialized(dirs, offline):
    with serving(dirs["old"]) as s, ThreadPoolExecutor(2) as pool:
        bodies = [{"model": str(dirs["new"]), "version": "a"}, {"model": str(dirs["old"]), "version": "b"}]
        results = [f.result().json() for f in [pool.submit(admin, s, "reload", b) for b in bodies]]
        first, second = sorted(results, key=lambda r: r["previous"] != "1")
        assert first["previous"] == "1" and second["previous"] == first["version"]
        assert s.state.versions.current == second["version"]
        assert [v.version for v in s.state.versions.history] == ["1", first["version"], second["version"]]
        r = complete(s, 3)
        check_answered_by(s, r.id, r.system_fingerprint, second["version"],
                          offline["new" if second["version"] == "a" else "old"][3])


def test_the_python_api_reloads_and_rolls_back_on_the_engine_loop(dirs, offline):
    """What the flywheel calls in the server's process: ModelVersions over an EngineLoop, no HTTP."""
    lm = load_model(str(dirs["old"]))
    loop = EngineLoop(Engine(lm.model, eos_token_ids=lm.eos_token_ids, config=EngineConfig(max_kv_tokens=2048)),
                      max_queue=4)
    exchanges = Exchanges(None, Metrics(), served_model=MODEL, model_version="0")
    versions = ModelVersions(loop, lm.model, version="0", model_dir=dirs["old"], exchanges=exchanges)

    async def sample(seed: int) -> tuple[str, list[int]]:
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=TOKENS)
        sub = Submission(EngineRequest(PROMPT, params), False, asyncio.get_running_loop())
        loop.submit(sub)
        finished = await sub.events.get()
        return sub.version, finished.result.samples[0].token_ids

    async def main() -> list:
        loop.start()
        try:
            seen = [await versions.reload(dirs["new"]), await sample(4), exchanges.model_version]
            with pytest.raises(VersionError, match="does not fit the served model"):
                await versions.reload(dirs["narrow"], version="narrow")
            return [*seen, versions.current, await versions.rollback(), await sample(4), versions.current]
        finally:
            await asyncio.to_thread(loop.shutdown, 60)

    reloaded, new, logged_as, current, rolled, old, after = asyncio.run(main())
    assert reloaded == {"version": "1", "previous": "0", "model": str(dirs["new"].resolve())}
    assert new == ("1", offline["new"][4].token_ids) and logged_as == current == "1"
    assert rolled == {"version": "0", "previous": "1", "model": str(dirs["old"].resolve())}
    assert old == ("0", offline["old"][4].token_ids) and after == "0"
