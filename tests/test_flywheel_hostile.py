"""`tao flywheel` under hostile conditions: a flywheel killed outright, a torn journal, unusable paths.

The happy paths and the ordinary failures are in tests/test_flywheel.py, whose tiny-model config and
helpers these tests reuse.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from tao_core.errors import TaoInputError  # noqa: E402
from tao_core.flywheel_config import load_flywheel_config  # noqa: E402
from tao_core.flywheel_controller import Controller, Served, read_history  # noqa: E402
from tao_core.flywheel_gate import load_gate_scorer  # noqa: E402
from tao_core.table import InferenceTable  # noqa: E402
from tests.test_flywheel import (  # noqa: E402, F401 (controller is a fixture)
    PROMPTS,
    SHORT,
    controller,
    edited,
    journal,
    log_prompts,
    start_long_round_flywheel,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_flywheel_killed_outright_takes_its_round_along_and_a_restart_numbers_on(tmp_path, tiny_model_dir):
    """SIGKILL of `tao flywheel` during a round: the round's process ends too (no orphan keeps the cores a
    restarted flywheel's round needs), and a restart skips the dead round's number and reads the journal."""
    proc, out, port, config = start_long_round_flywheel(tmp_path, tiny_model_dir)
    round_pid = None
    try:
        found = wait_until(lambda: re.search(r"round 1 started \(pid (\d+)", out.read_text()), "round 1 to start")
        round_pid = int(found.group(1))
        proc.kill()
        proc.wait(60)
        wait_until(lambda: not alive(round_pid), "the round to end with the flywheel", timeout=30)
    finally:
        proc.kill()
        if round_pid is not None and alive(round_pid):
            os.killpg(round_pid, signal.SIGKILL)
    assert journal(config) == []  # killed before any decision: nothing recorded, nothing torn
    cfg = load_flywheel_config(config)
    with InferenceTable.open(cfg.table.url) as table:
        c = Controller(cfg, table, load_gate_scorer(cfg.gate), lambda d, v: None, served=Served("m", "0"),
                       history=read_history(tmp_path / "fw" / "flywheel.jsonl"))
        assert c.rounds == 1  # the next round is 2: the killed round's config, log and directory are not reused


def test_a_record_after_a_torn_journal_line_is_read_back(controller, monkeypatch):  # noqa: F811
    """A flywheel killed while appending leaves a line without its newline; the next record must not be
    glued to it (it would be lost to the restart that reads the journal)."""
    c, table, _ = controller
    c.journal.parent.mkdir(parents=True, exist_ok=True)
    c.journal.write_text('{"round": 7, "time": "2026-01-01T00:00:00+00:00", "status": "promo')
    c.rounds = 7
    log_prompts(table, PROMPTS)
    monkeypatch.setenv("TAO_FAULT", "eval.before")  # a round that crashes: its record is appended
    record = c.step()
    assert record["status"] == "failed" and record["round"] == 8
    lines = c.journal.read_text().splitlines()
    assert json.loads(lines[-1])["round"] == 8
    assert read_history(c.journal).rounds == 8


@pytest.mark.parametrize("key", ["output_dir", "table.url"])
def test_a_path_that_cannot_be_created_is_an_error_naming_its_key(tmp_path, tiny_model_dir, key):
    from tao_core.flywheel import Flywheel

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_flywheel_config(write_config(tmp_path, tiny_model_dir, SHORT))
    if key == "output_dir":
        cfg.output_dir = str(blocker / "fw")
    else:
        cfg.table.url = str(blocker / "inference.db")
    with pytest.raises(TaoInputError, match=f"^{re.escape(key)} .*a-file"):
        Flywheel(cfg)
    if key == "table.url":  # the directory was released: a corrected flywheel may take it
        assert not (Path(cfg.output_dir) / "flywheel.jsonl").exists()
        import fcntl

        fd = os.open(Path(cfg.output_dir) / "flywheel.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


class SilentRound:
    """A round process that exits 0 without writing a model (a run that wrote nothing, a broken wrapper)."""

    def __init__(self, config_path: Path, log_path: Path, threads: int | None) -> None:
        self.log_path = log_path
        self.pid = None

    def start(self) -> None:
        self.log_path.write_text("nothing to see\n")

    def wait(self, stop: object) -> int:
        return 0

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text()


def test_a_round_that_writes_no_model_is_a_recorded_failure(controller, monkeypatch):  # noqa: F811
    c, table, reloads = controller
    log_prompts(table, PROMPTS)
    monkeypatch.setattr("tao_core.flywheel_controller.RoundProcess", SilentRound)
    record = c.step()
    assert record["status"] == "failed" and "wrote no model" in record["reason"] and "nothing to see" in record["reason"]
    assert reloads == [] and c.since is None and json.loads(c.journal.read_text())["status"] == "failed"


def test_a_gate_that_raises_is_recorded_and_the_served_version_stays(controller, monkeypatch):  # noqa: F811
    c, table, reloads = controller
    log_prompts(table, PROMPTS)
    monkeypatch.setattr(SilentRound, "start", lambda self: (self.log_path.parent / "round-001" / "final").mkdir(
        parents=True))
    monkeypatch.setattr("tao_core.flywheel_controller.RoundProcess", SilentRound)
    record = c.step()  # final/ is an empty directory: the gate cannot load it
    assert record["status"] == "rejected" and record["reason"].startswith("the gate failed (ModelLoadError")
    assert record["version"] == "0" and reloads == [] and read_history(c.journal).rounds == 1


def test_the_command_names_the_file_of_a_refused_gate_scorer(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tao_core.cli import cli

    config = edited(edited(write_config(tmp_path, tiny_model_dir, SHORT), 'scorer = "rules"', 'scorer = "majority-vote"'),
                    "options = {rules", "# options = {rules")
    result = CliRunner().invoke(cli, ["flywheel", str(config)])
    assert result.exit_code == 2 and f"{config}: gate.scorer = 'majority-vote' judges a candidate" in result.output


def test_a_gate_option_naming_a_file_inside_the_served_model_is_refused(tmp_path, tiny_model_dir):
    """A judge or reward model read from the served model's own directory grades the policy by itself."""
    inside = tiny_model_dir / "config.json"
    config = edited(write_config(tmp_path, tiny_model_dir, SHORT), "options = {rules = [",
                    f"options = {{judge = {{path = '{inside}'}}, rules = [")
    with pytest.raises(TaoInputError, match=r"gate.options.judge.path = .* names the served model"):
        load_flywheel_config(config)


def test_a_missing_round_file_names_the_key_and_where_it_was_looked_for(tmp_path, tiny_model_dir, monkeypatch):
    config = write_config(tmp_path, tiny_model_dir, SHORT)
    head = config.read_text().partition("[round]")[0]  # no inline round: a file instead
    config.write_text(head.replace("round_threads = 1", 'round_threads = 1\nround = "rounds.toml"'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaoInputError, match=f"round = 'rounds.toml': .*not found .*{re.escape(str(tmp_path))}"):
        load_flywheel_config(config)


def test_a_restart_whose_promoted_model_was_deleted_says_so(tmp_path, tiny_model_dir):
    from tao_core.flywheel import Flywheel

    cfg = load_flywheel_config(write_config(tmp_path, tiny_model_dir, SHORT))
    gone = tmp_path / "fw" / "rounds" / "round-003" / "final"
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "flywheel.jsonl").write_text(json.dumps(
        {"round": 3, "time": "2026-01-01T00:00:00+00:00", "status": "promoted", "model_dir": str(gone),
         "version": "3"}) + "\n")
    with pytest.raises(TaoInputError, match=f"version 3 is served from {re.escape(str(gone))}, which is gone"):
        Flywheel(cfg)
