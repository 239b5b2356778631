"""`tao flywheel`: serve -> traffic -> a round from the table -> the gate -> a swap, on a tiny model.

The rounds are real `tao run` processes. What they train is chosen so a tiny random model learns it in
a few steps: the round's reward is a `rules` score for long answers (the share of four lengths, 14 to 26
characters, an answer reaches within its 12 tokens), with an lr far above what a real model takes
(5e-2). The random starting model answers every held-out prompt with 12 newlines (12 characters); after
8 steps it answers with longer tokens, 16 characters or more (measured: all 16 held-out answers, in 12
of 12 rounds with fresh request ids; 6 of 8 already after 4 steps). A reward for short answers would
have been the obvious choice, but a random model rarely samples its stop token, so it gave no signal
in some rounds. The gate is the only thing that differs between the promote and the reject tests: a
`rules` gate that wants 16 characters sees the round improve; one that wants fewer (what the round
trains away) sees it regress on every held-out prompt, a significant paired regression.
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
from datetime import UTC, datetime
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


LONG = at_least(16)  # the gate of the promote test: what the round trains toward
SHORT = at_least(16, negate=True)  # the gate of the reject test: what the round trains away
# The round's reward: the share of these lengths an answer reaches.
REWARD = "[" + ", ".join(at_least(c) for c in (14, 18, 22, 26)) + "]"
PROMPTS = [f"Question {i}: what is {i} plus {2 * i + 1}?" for i in range(32)]


def write_config(tmp_path: Path, model: Path, gate_rule: str, *, min_new_prompts: int = 32,
                 steps: int = 8, extra: str = "") -> Path:
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
    config = write_config(tmp_path, tiny_model_dir, LONG)
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
    config = write_config(tmp_path, tiny_model_dir, SHORT)
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


# -- config ------------------------------------------------------------------------------------------


def edited(config: Path, old: str, new: str) -> Path:
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new, 1))
    return config


@pytest.mark.parametrize(("old", "new", "message"), [
    ("server_threads = 1", "server_thread = 1", r"unknown config key 'server_thread'; accepted here: .*server_threads"),
    ("min_new_prompts = 32", "min_new_prompts = -1", r"trigger.min_new_prompts must be >= 0, got -1"),
    ("min_new_prompts = 32", "interval_s = -5.0", r"trigger.interval_s must be >= 0"),
    ("min_new_prompts = 32", "min_new_prompts = 0", r"trigger: min_new_prompts and interval_s are both 0"),
    ("poll_s = 0.2", "poll_s = 'often'", r"config key 'trigger.poll_s' must be float, got 'often'"),
    ('scorer = "rules"\n', 'scorer = "no-such-scorer"\n', r"gate.scorer = 'no-such-scorer' is not a registered scorer"),
    ("min_prompts = 5", "min_prompts = 500", r"gate.min_prompts = 500 exceeds gate.max_prompts = 256"),
    ("[serve]\n", "[serve]\nprot = 1\n", r"unknown config key 'serve.prot'"),
    ("[serve]\n", "[serve]\nmodel_version = '7'\n", r"serve.model_version is set by the flywheel"),
    ("[serve]\n", "[serve]\nmax_queue = 0\n", r"serve: max_queue must be an integer >= 1"),
    ("[round]\n", "[round]\nmodel = 'other'\n", r"round: model is set by the flywheel \(each round starts from the served"),
    ("[round]\n", "[round]\nthreads = 4\n", r"round: threads is set by the flywheel \(set round_threads"),
    ("[round.table]\n", "[round.table]\nurl = 'x.db'\n", r"round: table.url is set by the flywheel"),
    ("lr = 5e-2", "lrr = 5e-2", r"round: unknown config key 'train.lrr'"),
    ("[round.table]\n", "[round.table]\nsince = 'yesterday'\n", r"round: .*table.since must be an ISO 8601"),
    ("holdout = 0.5", "holdout = 0.0", r"round: table.holdout = 0.0 holds no prompt out"),
    ("output_dir = ", "output_dir = 'flywheel.toml' #", r"output_dir 'flywheel.toml' is a file"),
])
def test_config_errors_name_the_key(tmp_path, tiny_model_dir, old, new, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = edited(write_config(tmp_path, tiny_model_dir, SHORT), old, new)
    with pytest.raises(TaoInputError, match=message) as e:
        load_flywheel_config(config)
    assert str(e.value).startswith(str(config))


def test_config_problems_are_reported_together_and_a_round_file_is_read(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, SHORT)
    edited(edited(config, "min_prompts = 5", "min_prompts = 0"), "poll_s = 0.2", "poll_s = 0")
    with pytest.raises(TaoInputError, match=r"2 problems:\n  - trigger.poll_s must be > 0.*\n  - gate.min_prompts"):
        load_flywheel_config(config)
    text = write_config(tmp_path, tiny_model_dir, SHORT).read_text()
    head, round_part = text.split("[round]\n")
    (tmp_path / "round.toml").write_text(round_part.replace("[round.", "["))
    config.write_text(f"round = '{tmp_path / 'round.toml'}'\n" + head)
    run, data = round_config(load_flywheel_config(config), 3, model_dir="m", table_url="t.db",
                             since=datetime(2026, 1, 2, tzinfo=UTC))
    assert (run.model, run.table.url, run.table.since, run.train.lr, run.threads) == \
        ("m", "t.db", "2026-01-02T00:00:00+00:00", 5e-2, 1)
    assert run.output_dir.endswith("rounds/round-003")
    write_toml(tmp_path / "written.toml", data)  # what `tao run` reads back is the same config
    from tao_core.config import load_config
    assert load_config(tmp_path / "written.toml").to_dict() == run.to_dict()
    config.write_text(f"round = '{tmp_path / 'missing.toml'}'\n" + head)
    with pytest.raises(TaoInputError, match="missing.toml: round run config not found"):
        load_flywheel_config(config)


def test_the_gate_refuses_a_scorer_that_depends_on_the_model_under_test(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, SHORT)
    cfg = load_flywheel_config(config)
    cfg.gate.scorer, cfg.gate.options = "majority-vote", {}
    with pytest.raises(TaoInputError, match="judges a candidate by its group"):  # labels from the policy's samples
        load_gate_scorer(cfg.gate)
    edited(config, 'scorer = "rules"\noptions = {rules', f'scorer = "llm-judge"\noptions = {{model = "{tiny_model_dir}", rules')
    with pytest.raises(TaoInputError, match=r"gate.options.model = .* names the served model \(the policy\)"):
        load_flywheel_config(config)
    cfg.gate.scorer, cfg.gate.options = "rules", {"rules": [{"type": "nope"}]}
    with pytest.raises(TaoInputError, match="^gate.options: .*nope"):
        load_gate_scorer(cfg.gate)


# -- the controller ------------------------------------------------------------------------------------


def log_prompts(table: InferenceTable, texts: list[str]) -> None:
    for text in texts:
        table.log({"request_id": f"r-{time.monotonic_ns()}", "request_time": datetime.now(UTC), "status_code": 200,
                   "request_json": {"messages": [{"role": "user", "content": text}]}, "served_model": "tiny",
                   "model_version": "0"})
    assert table.flush(10)


@pytest.fixture
def controller(tmp_path, tiny_model_dir) -> Iterator[tuple[Controller, InferenceTable, list]]:
    cfg = load_flywheel_config(write_config(tmp_path, tiny_model_dir, SHORT, min_new_prompts=4))
    table = InferenceTable.open(cfg.table.url)
    reloads: list[tuple[str, str]] = []
    c = Controller(cfg, table, load_gate_scorer(cfg.gate), lambda d, v: reloads.append((d, v)),
                   served=Served(str(tiny_model_dir), "0"), history=read_history(tmp_path / "none.jsonl"))
    yield c, table, reloads
    table.close()


def test_the_trigger_counts_new_distinct_prompts_and_keeps_the_schedule(controller):
    c, table, _ = controller
    log_prompts(table, ["What is 1 plus 2?", "what is 1   PLUS 2?", "What is 3 plus 4?", "What is 5 plus 6?"])
    assert c.check_trigger() is None  # three distinct prompts: the case and spacing variant is the same one
    log_prompts(table, ["What is 7 plus 8?"])
    assert c.check_trigger() == Trigger("prompts", 4)
    c.since = datetime.now(UTC)  # as after a round: only what is logged from now on counts
    assert c.new_prompts() == 0
    c.cfg.trigger.min_new_prompts, c.cfg.trigger.interval_s = 0, 3600.0
    log_prompts(table, ["What is 9 plus 10?"])
    assert c.check_trigger() is None  # an hour has not passed
    c.last_round_at -= 3600
    assert c.check_trigger() == Trigger("schedule", 1)
    c.retry_at = time.monotonic() + 600  # after a failed round nothing starts until retry_s passed
    assert c.check_trigger() is None


def test_a_crashing_round_changes_nothing(controller, monkeypatch, tiny_model_dir):
    c, table, reloads = controller
    log_prompts(table, PROMPTS)
    monkeypatch.setenv("TAO_FAULT", "eval.before")  # the round process is SIGKILLed before its first evaluation
    record = c.step()
    assert record["status"] == "failed" and not record["promoted"] and "exited with status -9" in record["reason"]
    assert (record["version"], record["model_dir"]) == ("0", str(tiny_model_dir)) and reloads == []
    assert not (Path(record["round_dir"]) / "final").exists() and c.since is None
    assert c.check_trigger() is None  # the same prompts wait for the next round, after retry_s
    history = read_history(c.journal)
    assert (history.rounds, history.since, history.served) == (1, None, Served(str(tiny_model_dir), "0"))
    assert json.loads(c.journal.read_text())["round"] == 1


def test_read_history_continues_where_the_last_round_ended(tmp_path, caplog):
    path = tmp_path / "flywheel.jsonl"
    rows = [{"round": 1, "time": "2026-01-01T00:00:00+00:00", "status": "promoted", "model_dir": "/r1", "version": "1"},
            {"round": 2, "time": "2026-01-02T00:00:00+00:00", "status": "rejected", "model_dir": "/r1", "version": "1"},
            {"round": 3, "time": "2026-01-03T00:00:00+00:00", "status": "failed", "model_dir": "/r1", "version": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "ti')  # a torn last line
    history = read_history(path)
    assert history.rounds == 3 and history.since == datetime(2026, 1, 2, tzinfo=UTC)
    assert history.served == Served("/r1", "1") and "line 4: not a flywheel record" in caplog.text


# -- the command ----------------------------------------------------------------------------------------


def start_long_round_flywheel(tmp_path: Path, tiny_model_dir: Path) -> tuple[subprocess.Popen, Path, int, Path]:
    """`tao flywheel` in a process of its own, on a free port, with enough prompts logged that it starts a
    round of 10,000 steps at once: (the process, the file its output goes to, the port, the config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = edited(write_config(tmp_path, tiny_model_dir, SHORT, min_new_prompts=8, steps=10_000),
                    "[serve]\n", f"[serve]\nport = {port}\n")
    with InferenceTable.open(tmp_path / "inference.db") as table:
        log_prompts(table, PROMPTS)
    out = tmp_path / "flywheel.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tao_core.cli", "flywheel", str(config)], stdout=f,
                                stderr=subprocess.STDOUT)
    return proc, out, port, config


def test_the_command_serves_and_sigterm_stops_the_round_and_drains(tmp_path, tiny_model_dir):
    """`tao flywheel` in a process of its own: a round that would run for minutes is under way when
    SIGTERM arrives; the round's process is gone, the decision says so, the server shut down cleanly."""
    proc, out, port, config = start_long_round_flywheel(tmp_path, tiny_model_dir)
    try:
        found = wait_until(lambda: re.search(r"round 1 started \(pid (\d+)", out.read_text()), "round 1 to start")
        round_pid = int(found.group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["model_version"] == "0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM, out.read_text()[-3000:]
    finally:
        proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(round_pid, 0)  # terminated and reaped: no orphan
    assert "Application shutdown complete" in out.read_text()
    [record] = journal(config)
    assert record["status"] == "interrupted" and record["version"] == "0"
