"""`tao flywheel`: serve -> traffic -> a round from the table -> the gate -> a swap, on a tiny model.

The rounds are real `tao run` processes. What they train is chosen so a tiny random model learns it in
six steps: the round's reward is a `rules` score for short answers (the share of four length bounds an
answer stays under, whitespace counted), with an lr far above what a real model takes (5e-2), so the
round's model stops at once where the random starting model always fills its 12-token budget
(measured: every held-out answer goes from 12 characters to none, for seeds 1, 2 and 3). The gate is
the only thing that differs between the promote and the reject tests: a `rules` gate that prefers
short answers sees the round improve; one that prefers long answers (what the round trains away) sees
it regress on every held-out prompt, a significant paired regression.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tao_core.errors import TaoInputError  # noqa: E402
from tao_core.flywheel_config import load_flywheel_config, round_config, write_toml  # noqa: E402
from tao_core.flywheel_controller import Controller, Served, Trigger, read_history  # noqa: E402
from tao_core.flywheel_gate import load_gate_scorer  # noqa: E402
from tao_core.table import InferenceTable, read_prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def at_least(chars: int, negate: bool = False) -> str:
    """A `rules` rule (TOML): the answer has ``chars`` characters or more, whitespace included (``negate``:
    fewer). A `length` rule would strip the random model's newlines first."""
    return f"{{type = 'regex', pattern = '[\\s\\S]{{{chars}}}', negate = {str(negate).lower()}}}"


LONG = at_least(8)  # the gate of the reject test: what the round trains away
SHORT = at_least(8, negate=True)  # the gate of the promote test: under eight characters
# The round's reward: the share of these lengths an answer stays under.
REWARD = "[" + ", ".join(at_least(c, negate=True) for c in (2, 4, 8, 12)) + "]"
PROMPTS = [f"Question {i}: what is {i} plus {2 * i + 1}?" for i in range(32)]


def write_config(tmp_path: Path, model: Path, gate_rule: str, *, min_new_prompts: int = 32,
                 steps: int = 6, extra: str = "") -> Path:
    path = tmp_path / "flywheel.toml"
    path.write_text(textwrap.dedent(f"""
        model = "{model}"
        output_dir = "{tmp_path / 'fw'}"
        server_threads = 1
        round_threads = 1
        {extra}

        [serve]
        served_model = "tiny"
        max_tokens_limit = 64
        default_max_tokens = 12
        drain_timeout_s = 10

        [table]
        url = "{tmp_path / 'inference.db'}"

        [trigger]
        min_new_prompts = {min_new_prompts}
        poll_s = 0.2

        [gate]
        scorer = "rules"
        options = {{rules = [{gate_rule}]}}
        max_new_tokens = 12
        min_prompts = 5

        [round]
        task = "arithmetic"
        rounds = 1
        steps_per_round = {steps}
        prompts_per_step = 4
        eval_limit = 2
        seed = 1

        [round.generate]
        n = 4
        max_new_tokens = 12

        [round.score]
        scorer = "rules"
        options = {{rules = {REWARD}, combine = "weighted"}}

        [round.train]
        lr = 5e-2

        [round.table]
        holdout = 0.5
        max_key_share = 1.0
    """))
    return path


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``condition`` until it is truthy; fail naming ``what`` if it never is (a hang, not a timing)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@contextmanager
def running(config: Path) -> Iterator[Any]:
    """The flywheel of ``config`` in this process, serving on a free loopback port."""
    from tao_core.flywheel import Flywheel

    flywheel = Flywheel(load_flywheel_config(config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=asyncio.run, args=(flywheel.serve(sockets=[sock]),), daemon=True)
    thread.start()
    wait_until(lambda: (flywheel.server is not None and flywheel.server.started) or not thread.is_alive(),
               "the server to start")
    flywheel.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield flywheel
    finally:
        flywheel.shutdown()
        thread.join(120)
        sock.close()
    assert not thread.is_alive(), "the flywheel did not shut down"


def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def traffic(url: str) -> list[str]:
    """Every prompt once, the first eight twice, and feedback on two answers; the request ids."""
    c, ids = client(url), []
    for text in PROMPTS + PROMPTS[:8]:
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=12)
        ids.append(r.id)
    for request_id, rating in ((ids[0], 1.0), (ids[1], 0.0)):
        assert httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "rating": rating}).status_code == 200
    return ids


def journal(config: Path) -> list[dict[str, Any]]:
    path = config.parent / "fw" / "flywheel.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def versions_logged(table: Path) -> dict[str, str]:
    """request id -> the model version its logged row names."""
    return {p.id: p.metadata["model_version"] for p in read_prompts(str(table))}


def test_a_promoted_round_is_swapped_in_while_requests_keep_being_answered(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, SHORT)
    answered: list[tuple[str, str | None]] = []  # (request id, system_fingerprint) of the background client
    failures: list[BaseException] = []
    stop = threading.Event()

    def background(url: str) -> None:
        c = client(url)
        while not stop.is_set():
            try:
                r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=12)
                answered.append((r.id, r.system_fingerprint))
            except BaseException as e:  # noqa: BLE001 - every failure is the test's finding
                failures.append(e)

    with running(config) as flywheel:
        sender = threading.Thread(target=background, args=(flywheel.url,))
        sender.start()
        try:
            traffic(flywheel.url)
            record = wait_until(lambda: journal(config), "the first round's decision", timeout=240)[0]
            wait_until(lambda: sum(f == "tao-1" for _, f in answered) >= 3, "answers from version 1")
        finally:
            stop.set()
            sender.join(60)
        assert flywheel.app.state.tao.versions.current == "1"
    assert not failures, f"requests failed during the swap: {failures[:3]}"
    assert record["status"] == "promoted" and record["promoted"] and record["version"] == "1", record
    assert record["trigger"] == "prompts" and record["prompts"] >= 32 and record["round"] == 1
    gate = record["gate"]
    assert gate["judged"] >= 5 and gate["new_mean"] > gate["old_mean"] and gate["p_worse"] > 0.05, gate
    assert record["task_eval"]["kept_new_weights"]
    assert Path(record["model_dir"]) == (Path(record["round_dir"]) / "final").resolve()
    assert "table" in (Path(record["round_dir"]).with_suffix(".toml")).read_text()
    logged = versions_logged(tmp_path / "inference.db")
    fingerprints = [f for _, f in answered]
    assert fingerprints[0] == "tao-0" and fingerprints[-1] == "tao-1"
    assert fingerprints == sorted(fingerprints, key=lambda f: f != "tao-0")  # never back to 0 once 1 answers
    assert all(logged[rid] == f.removeprefix("tao-") for rid, f in answered)  # each row names who answered it


def test_a_regressing_round_is_rejected_and_the_served_version_stays(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, LONG)
    with running(config) as flywheel:
        traffic(flywheel.url)
        record = wait_until(lambda: journal(config), "the first round's decision", timeout=240)[0]
        after = client(flywheel.url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "one more"}], max_tokens=12)
        assert flywheel.app.state.tao.versions.current == "0"
    assert record["status"] == "rejected" and not record["promoted"] and record["version"] == "0", record
    gate = record["gate"]
    assert gate["losses"] >= 5 and gate["p_worse"] < 0.05 and gate["new_mean"] < gate["old_mean"], gate
    assert "regressed" in record["reason"]
    assert (Path(record["round_dir"]) / "final").is_dir()  # the round's model exists; it is just not served
    assert after.system_fingerprint == "tao-0" and set(versions_logged(tmp_path / "inference.db").values()) == {"0"}
