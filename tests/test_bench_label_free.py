"""bench/label_free.py, the resumable driver of the label-free measurements, on a tiny model: a unit
finishes and is skipped when the command is run again, a driver killed with SIGKILL mid-run leaves no
process behind and the same command resumes the run and finishes it, --plan's units and budget, and
clear errors for bad arguments. The variants are checked to remove one component each."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "bench" / "label_free.py"
sys.path.insert(0, str(REPO / "bench"))

import _label_free_report as report  # noqa: E402
import _label_free_runs as runs  # noqa: E402
import _label_free_studies as studies  # noqa: E402
import label_free  # noqa: E402

TINY = ["--set", "steps_per_round=1", "--set", "prompts_per_step=1", "--set", "eval_limit=2",
        "--set", "generate.max_new_tokens=8", "--set", "guard.eval_every=0", "--set", "checkpoint_every=1"]


def driver_args(model: Path, out: Path, steps: str) -> list[str]:
    return ["--study", "arithmetic", "--out", str(out), "--model", str(model), "--seeds", "0", "--steps", steps,
            "--eval-count", "3", "--threads", "1", *TINY]


def drive(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=300, **kw)


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def run_commands(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("$ ")]


def kill_mid_run(args: list[str], run_dir: Path) -> dict:
    """Start the driver, SIGKILL it once its run has written a checkpoint; what was left behind."""
    proc = subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never wrote a checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = '"type": "final"' in (run_dir / "metrics.jsonl").read_text()
    with open(run_dir / ".lock", "rb") as f:  # the `tao run` dies with its driver: its lock comes free
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return {"finished_before_kill": finished, "orphan": False}
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return {"finished_before_kill": finished, "orphan": True}
                time.sleep(0.05)


@pytest.fixture(scope="module")
def state(tiny_model_dir, tmp_path_factory) -> dict:
    """A state directory whose driver was killed mid-run, then run again to the end."""
    out = tmp_path_factory.mktemp("lf") / "state"
    args = driver_args(tiny_model_dir, out, "2,4")
    run_dir = out / "runs" / "label-free-teacher-s0"
    killed = kill_mid_run(args, run_dir)
    return {"out": out, "args": args, "run_dir": run_dir, "killed": killed, "finished": drive(args)}


def test_a_driver_killed_mid_run_resumes_and_finishes(state):
    out, run_dir, finished = state["out"], state["run_dir"], state["finished"]
    assert state["killed"] == {"finished_before_kill": False, "orphan": False}
    assert finished.returncode == 0, finished.stderr
    assert "resuming the run after step" in finished.stderr
    commands = run_commands(out / "logs" / "label-free-teacher-s0.log")
    assert [c for c in commands if " run " in c][-1].split()[-2:] == ["--resume", str(run_dir)]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == [1, 2, 3, 4]  # every step once: the interrupted one redone, none repeated
    assert [(r["variant"], r["seed"], r["step"]) for r in results(out)] == [
        ("start", None, 0), ("label-free-teacher", 0, 2), ("label-free-teacher", 0, 4)]


def test_a_unit_finishes_and_is_skipped_when_run_again(state):
    out, first = state["out"], state["finished"]
    assert first.returncode == 0, first.stderr
    unit = results(out)[1]
    assert unit["n"] == 3 and 0 <= unit["ci_lo"] <= unit["metric"] <= unit["ci_hi"] <= 1
    assert unit["rounds"] == 2 and unit["promoted_rounds"] in (0, 1, 2) and unit["threads"] == 1
    assert unit["model"].endswith("rounds/round-002/model") and [s for s, _ in unit["length_curve"]] == [1, 2]
    header, *lines = first.stdout.split("\n\n")[0].splitlines()
    assert header.split(",") == list(report.COLUMNS)
    assert [line.split(",")[:3] for line in lines] == [["start", "-", "0"], ["label-free-teacher", "0", "2"],
                                                       ["label-free-teacher", "0", "4"]]
    assert "| label-free-teacher | 4 | 1 |" in first.stdout  # the summary
    log = out / "logs" / "label-free-teacher-s0.log"
    commands = run_commands(log)

    again = drive(state["args"])
    assert again.returncode == 0, again.stderr
    assert "every step already measured; skipped" in again.stderr
    assert len(results(out)) == 3 and run_commands(log) == commands  # no run, no evaluation
    assert again.stdout == first.stdout  # the same rows and summary


def test_plan_lists_units_and_budgets_cpu_hours(state, capsys, tmp_path):
    assert label_free.main(state["args"] + ["--plan", "--seconds-per-step", "30"]) == 0
    text = capsys.readouterr().out
    assert "start,-,0,done" in text and "label-free-teacher,0,4,done" in text
    assert "0.00 h of tuning + 0 evaluations" in text  # all done: nothing left

    fresh = tmp_path / "never-made"
    argv = ["--study", "ablation", "--out", str(fresh), "--plan", "--seconds-per-step", "10", "--threads", "2",
            "--eval-count", "10"]
    assert label_free.main(argv) == 0
    text = capsys.readouterr().out
    assert not fresh.exists()  # --plan writes nothing
    variants = [v.name for v in studies.ablation_variants()]
    assert variants[:3] == ["majority-vote", "label-free", "label-free-teacher"]
    assert {"no-teacher", "no-gate", "no-importance", "no-mask-truncated"} <= set(variants)
    for name in variants:
        assert f"{name},0,40,to run (40 training steps left in its run)" in text
    # by hand: 40 steps x 10 s per variant; 9 evaluations x 10 problems; each run evaluates its 128
    # problems at steps 0, 10, 20, 30 and 40 (guard.eval_every = 10 and 20-step rounds, the full recipe's
    # shape): 0.4 s per problem
    tuning_h = len(variants) * 40 * 10 / 3600
    eval_h = ((len(variants) + 1) * 10 + len(variants) * 5 * 128) * 0.4 / 3600
    assert f"{tuning_h:.2f} h of tuning" in text
    assert f"= {tuning_h + eval_h:.2f} wall-clock hours on 2 threads = {2 * (tuning_h + eval_h):.2f} CPU hours" in text


@pytest.mark.parametrize("argv, message", [
    ([], "--study is required; --out is required"),
    (["--study", "arithmetic", "--out", "x", "--seeds", "0,a"], "--seeds '0,a': give comma-separated whole numbers"),
    (["--study", "arithmetic", "--out", "x", "--steps", "0,40"], "step 0 is the starting model"),
    (["--study", "arithmetic", "--out", "x", "--threads", "0"], "--threads must be at least 1"),
    (["--study", "nope", "--out", "x"], "invalid choice: 'nope'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        label_free.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "30"], "variant label-free-teacher has steps_per_round = 20"),
    (["--variants", "label-free,bogus"], "bogus not in study arithmetic; its variants: label-free-teacher"),
    (["--set", "rounds=3"], "--set rounds: set by the driver"),
    (["--set", "train.no_such_key=1"], "variant label-free-teacher (from"),
    (["--set", "train.lr=-1"], "train.lr"),
])
def test_bad_settings_are_errors_that_say_what_to_do(extra, message, tmp_path, capsys):
    out = tmp_path / "state"
    assert label_free.main(["--study", "arithmetic", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_state_directory_keeps_its_settings(state, capsys):
    out = state["out"]
    before = (out / "results.jsonl").read_text()
    assert label_free.main(state["args"] + ["--eval-count", "5"]) == 2
    assert "was started with other settings (eval_count: 3 then, 5 now)" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before


def test_each_ablation_variant_switches_off_its_component_alone(tmp_path):
    full = studies.load_run_config(studies.TEACHER.base)
    on = {c.name for c in studies.COMPONENTS if c.on(full)}
    reference = studies.read_toml(studies.TEACHER.base)
    for variant in studies.ablation_variants():
        if not variant.name.startswith("no-"):
            continue
        path = tmp_path / f"{variant.name}.toml"
        data = studies.variant_data(variant, reference, ("steps_per_round", "guard.eval_every"))
        path.write_text(studies.dump_toml(data))
        assert tomllib.loads(path.read_text()) == data
        cfg = studies.load_run_config(path)
        assert {c.name for c in studies.COMPONENTS if c.on(cfg)} == on - {variant.name.removeprefix("no-")}
        assert (cfg.score.scorer, cfg.generate.options["templates"]) == (full.score.scorer, full.generate.options["templates"])


def test_dump_toml_reads_back_equal():
    data = {"a": 1, "b": "x \"q\" \\ é\n", "c": [1.5, 2e-05, True], "t": {"k": {"x": 1}, "in": [{"y": "z"}], "e": {}},
            "weird key": -0.0}
    assert tomllib.loads(studies.dump_toml(data)) == data


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_is_killed_with_everything_it_started(tmp_path):
    """What the driver's SIGTERM/SIGINT handler calls: the child's whole process group goes."""
    children = runs.Children(tmp_path, threads=None)
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
              "time.sleep(60)")
    timer = threading.Thread(target=lambda: (_wait_for(pid_file), children.kill()))
    timer.start()
    started = time.monotonic()
    rc = children.run([sys.executable, "-c", script], tmp_path / "child.log")
    timer.join()
    assert rc == -signal.SIGKILL and time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the child's own child outlived the kill"
        time.sleep(0.05)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_new_driver_kills_what_a_killed_one_left_running(tmp_path):
    """A process carrying the state directory's mark, in a session of its own (as a child's child can be)."""
    children = runs.Children(tmp_path / "state", threads=None)
    stray = subprocess.Popen(["sleep", "60"], env=children.env(), start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], env={**children.env(), runs.OWNER: str(tmp_path / "elsewhere")},
                             start_new_session=True)
    try:
        assert children.kill_leftovers() == [stray.pid]
        assert stray.wait(timeout=10) == -signal.SIGKILL and other.poll() is None
    finally:
        for p in (stray, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def _items(values: list[int]) -> list[dict]:
    return [{"prompt_id": f"p{i}", "value": v} for i, v in enumerate(values)]


def test_the_paired_table_counts_wins_and_losses_per_task_against_a_hand_computation():
    start = {"variant": "start", "seed": None, "step": 0,
             "items": {"a": _items([0, 0, 0, 0, 0, 0, 1, 1]), "b": _items([1, 1, 0, 0])}}
    # task a: 6 items gained, 1 lost, 1 tie; b: nothing changed. Items are paired by id, not by order.
    after = {"variant": "v", "seed": 0, "step": 40,
             "items": {"a": list(reversed(_items([1, 1, 1, 1, 1, 1, 0, 1]))), "b": _items([1, 1, 0, 0])}}
    lines = report.paired_lines([start, after])
    row_a = next(line for line in lines if "| a |" in line)
    # exact McNemar, one-sided: P(X <= 1), X ~ Bin(7, 1/2) = 8/128
    assert row_a == "| v | 0 | 40 | a | 8 | 0.250 | 0.875 | +62.5 | 6 / 1 | 0.0625 |"
    assert next(line for line in lines if "| b |" in line) == "| v | 0 | 40 | b | 4 | 0.500 | 0.500 | +0.0 | 0 / 0 | 1 |"
    assert lines[-1].startswith("| v | 0 | 40 | mean over tasks |") and "+31.2 |" in lines[-1]
    assert report.paired_lines([after]) == ["per-task paired tests: the starting model's per-item results are not measured yet"]


def test_the_multitask_study_reports_each_task_paired_against_the_start(tiny_model_dir, tmp_path):
    out = tmp_path / "mt"
    args = ["--study", "multitask", "--out", str(out), "--model", str(tiny_model_dir), "--steps", "2", "--eval-count", "3",
            "--threads", "1", *TINY, "--set", "prompts_per_step=3"]
    done = drive(args)
    assert done.returncode == 0, done.stderr
    start, unit = results(out)
    assert unit["variant"] == "multi-task" and set(unit["tasks"]) == {"arithmetic", "sql", "instructions"}
    for row in (start, unit):
        assert {t: len(v) for t, v in row["items"].items()} == {"arithmetic": 3, "sql": 3, "instructions": 3}
    for task in ("arithmetic", "sql", "instructions"):
        assert f"| multi-task | 0 | 2 | {task} | 3 |" in done.stdout
    assert "| multi-task | 0 | 2 | mean over tasks |" in done.stdout


def _unit(variant: str, seed: int | None, step: int, metric: float) -> dict:
    return {"study": "arithmetic", "variant": variant, "seed": seed, "step": step, "metric_name": "accuracy",
            "metric": metric, "n": 256, "ci_lo": 0.0, "ci_hi": 1.0, "cpu": "AMD EPYC", "threads": 1,
            "promoted_rounds": step // 20, "rounds": step // 20, "seconds": 60.0 * step}


def test_summary_merges_drivers_run_side_by_side_and_refuses_units_that_disagree(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in (_unit("start", None, 0, 0.25), _unit("label-free-teacher", 0, 40, 0.5))))
    b.write_text("".join(json.dumps(r) + "\n" for r in (_unit("start", None, 0, 0.25), _unit("label-free-teacher", 1, 40, 0.6))))
    argv = ["--study", "arithmetic", "--summary", "--results", str(a), "--results", str(b)]
    assert label_free.main(argv) == 0
    out = capsys.readouterr().out
    # two seeds: mean 0.55, sd of (0.5, 0.6) = 0.0707; gain over the start +0.300
    assert "| label-free-teacher | 40 | 2 | 0.550 ± 0.071 | +0.300 | 4/4 | none | 40.0 |" in out
    assert "on AMD EPYC, threads [1]" in out and not (tmp_path / "summary.md").exists()
    b.write_text(json.dumps(_unit("start", None, 0, 0.26)) + "\n")
    assert label_free.main(argv) == 2
    assert "unit start/-/0 is 0.25 in" in capsys.readouterr().err
    assert label_free.main(["--study", "arithmetic", "--summary", "--results", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        label_free.main(["--study", "arithmetic", "--out", "x", "--results", str(a)])
    assert "--results is read by --summary only" in capsys.readouterr().err
