"""bench/serve.py runs tao serve and the offline engine on one workload and leaves no server behind.

Tiny random model, no transformers serve venv: the rows, the logged-row count and the cleanup are checked,
not the speed (that is the benchmark's finding, in docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve.py"


def _bench(tmp_path: Path, model: Path, *flags: str) -> tuple[list[dict], list[dict]]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the servers' tables and logs live under tmp_path
    out = subprocess.run(
        [sys.executable, str(BENCH), "--model", str(model), "--threads", "1", "--venv", str(tmp_path / "no-venv"),
         *flags], capture_output=True, text=True, timeout=240, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows_text, ratios_text = out.stdout.split("\n\n")
    return list(csv.DictReader(io.StringIO(rows_text))), list(csv.DictReader(io.StringIO(ratios_text)))


def _processes_under(path: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline and "pytest" not in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_tao_serve_and_offline_engine_answer_the_same_workload_and_log_every_request(tmp_path, tiny_model_dir):
    rows, ratios = _bench(tmp_path, tiny_model_dir, "--modes", "tao-serve,tao-engine-offline,transformers-serve-cb",
                          "--clients", "1,3", "--requests-per-client", "2", "--max-tokens", "6", "--time-limit", "120")
    by = {(r["mode"], int(r["clients"])): r for r in rows}
    assert set(by) == {(m, c) for m in ("tao-serve", "tao-engine-offline", "transformers-serve-cb") for c in (1, 3)}
    for mode in ("tao-serve", "tao-engine-offline"):
        for clients in (1, 3):
            row = by[mode, clients]
            assert row["status"] == "ok", row
            assert int(row["sent"]) == int(row["requests"]) == clients * 2 and row["failed"] == "0"
            assert float(row["output_tokens_per_s"]) > 0 and float(row["ttft_p50_s"]) <= float(row["p50_latency_s"])
    for clients in (1, 3):
        # every request the server answered is a row of its table after shutdown
        assert int(by["tao-serve", clients]["logged_rows"]) == clients * 2
        # greedy decoding of the same prompts: the server returns exactly the engine's tokens
        assert by["tao-serve", clients]["output_tokens"] == by["tao-engine-offline", clients]["output_tokens"]
    missing = by["transformers-serve-cb", 1]
    assert missing["status"] == "error" and "--setup-venv" in missing["errors"]
    assert [r["ratio"].split(" output")[0] for r in ratios] == [
        "tao-serve / tao-engine-offline", "tao-serve / transformers-serve-cb or transformers-serve-no-cb"]
    assert ratios[0]["clients"] == "3" and float(ratios[0]["value"]) > 0 and ratios[1]["value"] == ""
    assert _processes_under(tmp_path) == []


def test_a_mode_past_its_time_limit_is_reported_and_its_server_killed(tmp_path, tiny_model_dir):
    rows, _ = _bench(tmp_path, tiny_model_dir, "--modes", "tao-serve", "--clients", "1", "--time-limit", "0.5")
    (row,) = rows
    assert row["status"] == "error" and "not ready within the time limit" in row["errors"]
    assert _processes_under(tmp_path) == []
