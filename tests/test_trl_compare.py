"""bench/trl_compare.py without running TRL: arguments, the CSV, the environment check, the reward adapter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tao_core.types import Prompt

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


compare = _load("trl_compare")
sides = _load("_compare_sides")


def _result(side: str, s_per_step: float, peak: float, after: float) -> dict:
    return {
        "side": side, "s_per_step": s_per_step, "s_per_step_mean": s_per_step + 0.5, "first_step_s": 2 * s_per_step,
        "train_s": 10 * s_per_step, "cpu_s_per_step": s_per_step, "peak_rss_mb": peak + 100,
        "train_peak_rss_mb": peak, "before": {"value": 0.3}, "after": {"value": after, "ci_low": 0.2, "ci_high": 0.6,
                                                                          "n": 128},
        "rewards": [None, 0.25, 0.5], "threads": 1, "objective": "GRPOTrainer loss_type=grpo, x",
        "torch": "2.13.0+cpu", "transformers": "5.24.0",
    }


def test_defaults_follow_the_demo_and_quick_shrinks_the_run():
    from tao_core.config import load_config
    from tao_core.recipes import find_recipe

    args = compare.parse_args([])
    assert args.lr == load_config(find_recipe("demo").path).train.lr
    assert (args.steps, args.eval_limit, args.prompts, args.group, args.max_new_tokens) == (10, 128, 8, 8, 32)
    assert args.trl_batch == 64  # one optimizer step = 8 prompts x 8 completions
    quick = compare.parse_args(["--quick"])
    assert (quick.steps, quick.eval_limit) == (2, 16)
    assert compare.parse_args(["--quick", "--steps", "3"]).steps == 3


@pytest.mark.parametrize("argv", [["--trl-batch", "24"], ["--trl-batch", "4"], ["--group", "1"], ["--lr", "0"],
                                  ["--steps", "0"]])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)
    assert "must" in capsys.readouterr().err


def test_both_sides_get_the_same_settings(tmp_path):
    args = compare.parse_args(["--steps", "4", "--lr", "1e-5", "--threads", "2"])
    spec = compare.side_spec(args, tmp_path)
    assert spec["steps"] == 4 and spec["lr"] == 1e-5 and spec["threads"] == 2
    assert spec["task_options"] == {"level": "add2"} and spec["trl_batch"] == 64
    assert compare.child_env(2)["OMP_NUM_THREADS"] == "2" and compare.child_env(2)["HF_HUB_OFFLINE"] == "1"


def test_csv_rows_match_the_header_and_append_once(tmp_path):
    spec = compare.side_spec(compare.parse_args([]), tmp_path)
    row = compare.csv_row(_result("trl", 40.0, 5000, 0.5) | {"trl_version": "1.16.0"}, spec, "2026-01-01T00:00:00Z")
    fields = dict(zip(compare.COLUMNS.split(","), row.split(","), strict=True))
    assert fields["provider"] == "trl" and fields["trl_version"] == "1.16.0"
    assert fields["objective"] == "GRPOTrainer loss_type=grpo  x"  # a comma inside a field never splits the row
    assert fields["reward_first"] == "0.250" and fields["reward_last"] == "0.500"
    out = tmp_path / "sub" / "results.csv"
    compare.append_rows(out, [row])
    compare.append_rows(out, [row])
    lines = out.read_text().splitlines()
    assert lines == [compare.COLUMNS, row, row]


def test_summary_judges_the_goal():
    tao, trl = _result("tao", 10.0, 3000, 0.6), _result("trl", 40.0, 5000, 0.5)
    lines = compare.summary(tao, trl)
    assert "4.00x faster" in lines[0] and "goal >= 2x met" in lines[0]
    assert "0.60" in lines[2] and "goal <= 1 met" in lines[2]
    assert "+0.100" in lines[3]
    slow = compare.summary(_result("tao", 30.0, 6000, 0.4), trl)
    assert "NOT met" in slow[0] and "NOT met" in slow[2] and "below TRL" in slow[3]


def test_environment_check_wants_this_repository_and_the_pinned_versions():
    pins = ["torch==2.13.0", "transformers==5.24.0"]
    found = {"trl": "1.16.0", "tao_core": str(compare.REPO / "tao_core" / "__init__.py"), "torch": "2.13.0+cpu",
             "transformers": "5.24.0"}
    assert compare.env_matches(found, pins, "1.16.*")
    assert compare.env_matches(found, pins, "1.16.0")
    assert not compare.env_matches(found, pins, "1.17.*")
    assert not compare.env_matches(found | {"transformers": "5.23.0"}, pins, "1.16.*")
    assert not compare.env_matches(found | {"tao_core": "/elsewhere/tao_core/__init__.py"}, pins, "1.16.*")
    assert not compare.env_matches(None, pins, "1.16.*")


def test_missing_venv_python_probes_as_absent(tmp_path):
    assert compare.probe_env(tmp_path / "no-venv" / "bin" / "python") is None


def test_trl_reward_is_tao_s_scorer_per_group():
    """TRL hands the reward function flat chat-format completions; tao scores them group by group."""
    from tao_core.plugins import get_component

    task = get_component("tasks", "arithmetic")()
    a = Prompt(id="a", text="What is 47 plus 38? Give the final answer on the last line as 'Answer: <number>'.")
    b = Prompt(id="b", text="What is 10 plus 5? Give the final answer on the last line as 'Answer: <number>'.")
    odd = Prompt(id="odd", text="Tell me a joke.")
    reward = sides.make_reward(task, {p.id: p for p in (a, b, odd)})
    say = [[{"role": "assistant", "content": t}] for t in ("47 + 38 = 85\nAnswer: 85", "Answer: 84",
                                                              "Answer: 15", "no idea", "Answer: 3")]
    got = reward(completions=say, prompt_id=["a", "a", "b", "b", "odd"], prompts=None)
    assert got == [1.0, 0.0, 1.0, 0.0, None]  # the unparseable prompt abstains: None, never a silent 0
    assert reward(completions=["Answer: 15"], prompt_id=["b"]) == [1.0]  # plain-text completions too


def test_step_stats_report_the_first_step_apart():
    stats = sides.step_stats([9.0, 2.0, 4.0, 3.0])
    assert stats == {"s_per_step": 3.0, "s_per_step_mean": 3.0, "first_step_s": 9.0, "train_s": 18.0}
    assert sides.step_stats([5.0])["s_per_step"] == 5.0
    with pytest.raises(RuntimeError, match="no training step"):
        sides.step_stats([])


WINDOW_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import _compare_sides as sides

def touched(mb):
    block = bytearray(mb * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    return block

window = sides.TrainWindow()
early = touched(160)
early_peak = sides.status_mb("VmHWM")
del early  # a large bytearray is its own mapping: freed back to the system
window.open()
start = sides.status_mb("VmRSS")
block = touched(64)
window.close()
del block
print(json.dumps({"early_peak": early_peak, "start": start, "peak": window.peak,
                  "process_peak": window.process_peak(), "cpu_s": window.cpu_s}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_train_window_resets_the_peak_and_keeps_the_earlier_one():
    # in a fresh process: after a long test session the allocator may hand the probe's blocks
    # memory that is already resident, and then no window can see them
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", WINDOW_PROBE, str(BENCH)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["start"] + 60 <= r["peak"] < r["early_peak"] - 60  # the window saw its own 64 MB, not the earlier 160
    assert r["process_peak"] >= r["early_peak"] - 1  # the whole process keeps the earlier peak (counters lag ~0.2 MB)
    assert r["cpu_s"] is not None and r["cpu_s"] >= 0
