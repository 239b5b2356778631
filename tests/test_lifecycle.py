"""The run lifecycle and the checkpoint format: markers, locks, manifests, fallback, write faults."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tao_core
from tao_core import fsio, pipeline
from tao_core.config import RunConfig, from_dict
from tao_core.errors import PluginError, TaoError, TaoInputError, TaoWriteError
from tao_core.plugins import get_plugin_manager
from tao_core.rundir import MARKER, RunDir
from tao_core.types import Score


class _LetterScorer:
    """A varied, learnable signal on a random model (so training changes the weights)."""

    name = "lifecycle-letter"
    version = "1"

    def score(self, prompt, candidates):
        return [Score.ok(c.text.count("e") / (1 + len(c.text))) for c in candidates]


class _Broken:
    name = "lifecycle-broken"

    def score(self, prompt, candidates):
        raise ZeroDivisionError("boom")


class _WontStart:
    name = "lifecycle-wont-start"

    def __init__(self):
        raise ValueError("ctor boom")

    def score(self, prompt, candidates):
        raise AssertionError("never reached")


class _Plugin:
    @tao_core.hookimpl
    def tao_register_scorers(self, register):
        register("lifecycle-letter", _LetterScorer)
        register("lifecycle-broken", _Broken)
        register("lifecycle-wont-start", _WontStart)


@pytest.fixture(scope="module", autouse=True)
def letter_scorer():
    pm = get_plugin_manager()
    name = pm.register(_Plugin(), name="lifecycle-letter-plugin")
    yield
    pm.unregister(name)


def _cfg(model: Path, out: Path, **kw) -> RunConfig:
    data = {"task": "arithmetic", "model": str(model), "output_dir": str(out), "rounds": 2, "steps_per_round": 2,
            "prompts_per_step": 2, "eval_limit": 4, "checkpoint_every": 1, "seed": 3,
            "generate": {"n": 4, "max_new_tokens": 6}, "score": {"scorer": "lifecycle-letter"},
            "train": {"lr": 3e-3}, **kw}
    return from_dict(RunConfig, data)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted run that the faulty ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pipeline.run(_cfg(tiny_model_dir, out), progress=False)
    return out


# -- the directory ------------------------------------------------------------------------------
def test_claim_refuses_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "metrics.jsonl").write_text("{}\n")
    for kw in ({}, {"resume": True}, {"replace": True, "info": {"recipe": "demo"}}):
        with pytest.raises(TaoInputError, match="not a tao directory"):
            RunDir(folder).claim("run", **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "thesis.tex"]


def test_demo_output_dir_never_deletes_foreign_files(tmp_path):
    from click.testing import CliRunner

    from tao_core.cli import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    result = CliRunner().invoke(cli, ["demo", "--output-dir", str(folder)])
    assert result.exit_code == 2 and "not a tao directory" in result.output
    assert (folder / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_demo_replaces_only_its_own_runs(tmp_path):
    demo = tmp_path / "demo"
    RunDir(demo).claim("run", info={"recipe": "demo"}).release()
    (demo / "config.json").write_text("{}")
    (demo / "steps").mkdir()
    RunDir(demo).claim("run", replace=True, info={"recipe": "demo"}).release()
    assert sorted(p.name for p in demo.iterdir()) == [".lock", MARKER]
    run = tmp_path / "run"
    RunDir(run).claim("run").release()
    (run / "config.json").write_text("{}")
    with pytest.raises(TaoInputError, match="did not make"):
        RunDir(run).claim("run", replace=True, info={"recipe": "demo"})
    assert (run / "config.json").exists()


def test_claim_kinds_and_started_runs(tmp_path):
    rd = RunDir(tmp_path / "a" / "b").claim("sft")
    rd.release()
    assert json.loads((tmp_path / "a" / "b" / MARKER).read_text())["kind"] == "sft"
    with pytest.raises(TaoInputError, match="holds a tao sft directory, not a run"):
        RunDir(tmp_path / "a" / "b").claim("run")
    RunDir(tmp_path / "a" / "b").claim("sft").release()  # a marker alone: nothing started, reusable
    (tmp_path / "a" / "b" / "config.json").write_text("{}")
    with pytest.raises(TaoInputError, match="already holds a sft"):
        RunDir(tmp_path / "a" / "b").claim("sft")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TaoInputError, match="is a file"):
        RunDir(tmp_path / "file").claim("run")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MARKER).write_bytes(b"\xff\xfe not json")
    with pytest.raises(TaoInputError, match="unreadable tao directory marker"):
        RunDir(tmp_path / "bad").claim("run")


def test_two_processes_never_share_a_directory(tmp_path):
    RunDir(tmp_path / "run").claim("run").release()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from tao_core.rundir import RunDir
        RunDir({str(tmp_path / 'run')!r}).claim("run", resume=True)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TaoInputError, match=rf"in use by another tao process \(pid {holder.pid}\)"):
            RunDir(tmp_path / "run").claim("run", resume=True)
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path / "run").claim("run", resume=True).release()  # a killed holder's lock is gone


def test_legacy_run_directory_is_adopted_on_resume(tmp_path):
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "config.json").write_text('{"task": "arithmetic", "train": {}}')
    (legacy / "metrics.jsonl").write_text("")
    with pytest.raises(TaoInputError, match="made before run directories were marked; resume it"):
        RunDir(legacy).claim("run")
    RunDir(legacy).claim("run", resume=True).release()
    assert json.loads((legacy / MARKER).read_text())["adopted"] is True
    foreign = tmp_path / "hf"  # a folder of another tool that happens to hold these names
    foreign.mkdir()
    (foreign / "config.json").write_text('{"task": "x", "train": {}}')
    (foreign / "metrics.jsonl").write_text("")
    (foreign / "model.safetensors").write_bytes(b"")
    with pytest.raises(TaoInputError, match="not a tao directory"):
        RunDir(foreign).claim("run", resume=True)


def test_rm_overwrite_never_adopts_a_folder_with_a_stray_tao_rm_json(tmp_path, tiny_model_dir):
    from tao_plugins.reward_training import PreferencePair, train_reward_model

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "tao_rm.json").write_text("{}")
    (proj / "thesis.tex").write_text("thesis")
    (proj / "data" / "important.csv").write_text("x")
    pairs = [PreferencePair(messages=[{"role": "user", "content": "q"}], chosen="a", rejected="b")] * 4
    with pytest.raises(TaoInputError, match="not a tao directory"):
        train_reward_model(pairs, str(tiny_model_dir), proj, overwrite=True, progress=False)
    assert (proj / "thesis.tex").exists() and (proj / "data" / "important.csv").exists()


def test_report_writes_only_into_tao_directories(tmp_path):
    from tao_core.report import write_report

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    (other / "report.md").write_text("IMPORTANT")
    with pytest.raises(TaoInputError, match="not a tao run or SFT directory"):
        write_report(other)
    assert (other / "report.md").read_text() == "IMPORTANT" and not (other / "plots").exists()


def test_markers_and_pointers_are_read_only_as_small_regular_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / MARKER)
    with pytest.raises(TaoInputError, match="not a regular file"):
        RunDir(run).claim("run")
    (run / MARKER).unlink()
    (run / MARKER).symlink_to("/dev/zero")
    with pytest.raises(TaoInputError, match="not a regular file"):
        RunDir(run).claim("run")


# -- the checkpoint format ------------------------------------------------------------------------
def _trainer_state(tiny_lm) -> dict:
    from tao_core.config import TrainConfig
    from tao_core.train import Trainer

    trainer = Trainer(tiny_lm, TrainConfig(objective="grpo", lr=1e-3))
    for p in trainer.params:
        p.grad = torch.randn_like(p)
    trainer.optimizer.step()
    return trainer.state_dict()


def _states_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert _same(a["trainable"], b["trainable"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in st.items())
    assert a["rng"]["python"] == b["rng"]["python"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    na, nb = a["rng"]["numpy"], b["rng"]["numpy"]
    assert na[0] == nb[0] and (na[1] == nb[1]).all() and na[2:] == nb[2:]


def test_checkpoint_round_trip_has_no_pickle(tmp_path, tiny_lm):
    state = _trainer_state(tiny_lm)
    rd = RunDir(tmp_path / "run")
    d = rd.save_checkpoint(7, state, {"step": 7, "note": "ünïcode"})
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "optimizer.safetensors", "pipeline.json",
                                                   "trainable.safetensors", "trainer.json"]
    for f in d.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f} is a pickle"
    _, loaded, pstate, warns = rd.load_checkpoint()
    _states_equal(state, loaded)
    assert pstate == {"step": 7, "note": "ünïcode"} and warns == []


def test_keeps_two_checkpoints_and_falls_back_with_a_warning(tmp_path, tiny_lm):
    state = _trainer_state(tiny_lm)
    rd = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        rd.save_checkpoint(step, {**state, "step": step}, {"step": step})
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["latest", "step-00002", "step-00003"]
    newest = rd.checkpoints / "step-00003"
    damage = [
        lambda: (newest / "trainable.safetensors").write_bytes((newest / "trainable.safetensors").read_bytes()[:100]),
        lambda: (newest / "pipeline.json").unlink(),
        lambda: (newest / "manifest.json").unlink(),
        lambda: (newest / "manifest.json").write_text("{not json"),
        lambda: (newest / "trainer.json").write_text((newest / "trainer.json").read_text().replace('"step": 3', '"step": 4')),
    ]
    reasons = ["truncated or replaced", "pipeline.json: cannot read", "was not finished", "unreadable manifest",
               "differs from the manifest"]
    for hurt, reason in zip(damage, reasons, strict=True):
        rd.save_checkpoint(3, {**state, "step": 3}, {"step": 3})
        hurt()
        d, _, pstate, warns = rd.load_checkpoint()
        assert d.name == "step-00002" and pstate == {"step": 2} and reason in warns[0]


def test_bad_latest_pointer_and_no_valid_checkpoint(tmp_path, tiny_lm):
    state = _trainer_state(tiny_lm)
    rd = RunDir(tmp_path / "run")
    rd.save_checkpoint(1, {**state, "step": 1}, {"step": 1})
    rd.save_checkpoint(2, {**state, "step": 2}, {"step": 2})
    for pointer in (b"../../../etc", b"\xff\xfe\x00", b"step-00009"):
        (rd.checkpoints / "latest").write_bytes(pointer)
        d, _, _, warns = rd.load_checkpoint()
        assert d.name == "step-00002" and "not a checkpoint here" in warns[0] and len(warns[0]) < 200
    for d in rd.checkpoint_dirs():
        (d / "manifest.json").unlink()
    with pytest.raises(TaoInputError, match="no valid checkpoint to resume from"):
        rd.load_checkpoint()
    assert RunDir(tmp_path / "empty").load_checkpoint() is None


def test_crafted_pickle_checkpoint_never_runs(tmp_path):
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    d = tmp_path / "run" / "checkpoints" / "step-00001"
    d.mkdir(parents=True)
    (d / "pipeline.json").write_text('{"step": 1}')
    torch.save({"step": 1, "trainable": {}, "optimizer": Evil(), "rng": {}}, d / "trainer.pt")
    with pytest.raises(TaoInputError, match="no valid checkpoint.*cannot load the \\(pre-manifest\\) checkpoint"):
        RunDir(tmp_path / "run").load_checkpoint()
    (d / "trainer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TaoInputError, match="no valid checkpoint"):
        RunDir(tmp_path / "run").load_checkpoint()
    assert not canary.exists()


def test_legacy_trainer_pt_still_loads(tmp_path, tiny_lm):
    state = _trainer_state(tiny_lm)
    d = tmp_path / "run" / "checkpoints" / "step-00004"
    d.mkdir(parents=True)
    torch.save(state, d / "trainer.pt")  # exactly what tao wrote before the manifest format
    (d / "pipeline.json").write_text('{"step": 4}')
    (d.parent / "latest").write_text("step-00004")
    _, loaded, pstate, _ = RunDir(tmp_path / "run").load_checkpoint()
    _states_equal(state, loaded)
    assert pstate == {"step": 4}


# -- write faults ---------------------------------------------------------------------------------
@pytest.fixture
def record_writes(monkeypatch):
    written: list[tuple[Path, str]] = []
    real = fsio._write_all

    def spy(fd, data, path):
        written.append((Path(path), hashlib.sha256(data).hexdigest()))
        real(fd, data, path)

    monkeypatch.setattr(fsio, "_write_all", spy)
    return written


def test_every_run_file_passes_through_the_write_seam(reference_run, tiny_model_dir, tmp_path, record_writes):
    out = tmp_path / "run"
    pipeline.run(_cfg(tiny_model_dir, out), progress=False)
    seen = {(p.name, digest) for p, digest in record_writes}  # checkpoints are written in a temporary dir
    # Hugging Face model directories (round models, final/) are written by transformers into a
    # temporary directory renamed into place; the score cache is SQLite with its own journal.
    exempt = ("rounds", "final", "score-cache")
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"
             and p.relative_to(out).parts[0] not in exempt] + [out / "final" / "tao_run.json"]
    assert len(files) >= 25

    def through_seam(p: Path) -> bool:
        if p.name == "metrics.jsonl":  # appended line by line
            return all((p.name, hashlib.sha256(line).hexdigest()) in seen for line in p.read_bytes().splitlines(True))
        return (p.name, hashlib.sha256(p.read_bytes()).hexdigest()) in seen

    missed = [str(p.relative_to(out)) for p in files if not through_seam(p)]
    assert not missed, f"written around the seam (or not as the seam wrote them): {missed}"
    assert _same(_final(out), _final(reference_run))


@pytest.mark.parametrize(("target", "nth", "code"), [
    ("optimizer.safetensors", 3, errno.ENOSPC),  # the third checkpoint
    ("manifest.json", 2, errno.EIO),
    ("metrics.jsonl", 5, errno.ENOSPC),
    ("latest", 2, errno.EIO),
])
def test_write_error_stops_the_run_and_keeps_the_last_checkpoint(reference_run, tiny_model_dir, tmp_path,
                                                                 monkeypatch, target, nth, code):
    out = tmp_path / "run"
    real, count = fsio._write_all, {"n": 0}

    def failing(fd, data, path):
        if Path(path).name == target:
            count["n"] += 1
            if count["n"] == nth:
                raise OSError(code, os.strerror(code))
        real(fd, data, path)

    monkeypatch.setattr(fsio, "_write_all", failing)
    with pytest.raises(TaoWriteError, match=rf"cannot write .*{target}: .*\[{errno.errorcode[code]}\].*--resume"):
        pipeline.run(_cfg(tiny_model_dir, out), progress=False)
    monkeypatch.setattr(fsio, "_write_all", real)
    assert not list(out.rglob(".*.tmp-*")), "a failed write left its temporary file"
    if (out / "checkpoints").exists():
        RunDir(out).load_checkpoint()  # the previous checkpoint verifies (raises otherwise)
    pipeline.resume(str(out), progress=False)
    assert _same(_final(out), _final(reference_run))


def test_rm_train_output_is_a_marked_directory(tmp_path, tiny_model_dir):
    from tao_plugins.reward_training import PreferencePair, train_reward_model

    pairs = [PreferencePair(messages=[{"role": "user", "content": f"q{i}"}], chosen="good answer",
                            rejected="bad", line=i) for i in range(8)]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(TaoInputError, match="not a tao directory"):
        train_reward_model(pairs, str(tiny_model_dir), foreign, overwrite=True, progress=False)
    assert (foreign / "todo.txt").read_text() == "keep me"
    out = tmp_path / "rm"
    train_reward_model(pairs, str(tiny_model_dir), out, progress=False)
    assert json.loads((out / MARKER).read_text())["kind"] == "rm" and (out / "tao_rm.json").is_file()
    with pytest.raises(TaoInputError, match="not empty"):
        train_reward_model(pairs, str(tiny_model_dir), out, progress=False)
    train_reward_model(pairs, str(tiny_model_dir), out, overwrite=True, progress=False)
    assert not list(out.glob(".model.tmp-*"))
    with pytest.raises(TaoInputError, match="holds a tao rm directory, not a run"):
        RunDir(out).claim("run")


def test_bad_prompts_or_config_fail_before_the_model_or_directory(tmp_path, tiny_model_dir, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"messages": [{"role": "user", "content": null}]}\n')
    out = tmp_path / "run"
    with pytest.raises(TaoInputError, match=r"p\.jsonl:2: .*'content' must be a string"):
        pipeline.run(_cfg(tiny_model_dir, out, prompts_file=str(prompts)), progress=False)
    cfg = _cfg(tiny_model_dir, out)
    cfg.generate.temperature = -1.0
    with pytest.raises(TaoInputError, match="generate.temperature must be >= 0"):
        pipeline.run(cfg, progress=False)
    assert not out.exists()


def test_a_scorer_that_cannot_start_or_a_bad_model_leaves_no_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    with pytest.raises(PluginError, match="scorer 'lifecycle-wont-start' .* failed to start: ValueError: ctor boom"):
        pipeline.run(_cfg(tiny_model_dir, out, score={"scorer": "lifecycle-wont-start"}), progress=False)
    assert not out.exists()
    with pytest.raises(TaoError, match="nowhere"):
        pipeline.run(_cfg(tmp_path / "nowhere" / "m.gguf", out), progress=False)
    assert not out.exists()


def test_a_scorer_that_always_fails_stops_the_run_and_metrics_stay_strict_json(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, out, score={"scorer": "lifecycle-broken"}, steps_per_round=3)
    with pytest.raises(PluginError, match=r"scorer 'lifecycle-broken' scored no candidate in 3 steps in a row "
                                          r"\(last: .*ZeroDivisionError: boom"):
        pipeline.run(cfg, progress=False)

    def strict(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    rows = [json.loads(line, parse_constant=strict) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warned = [r for r in rows if r["type"] == "warning" and r["kind"] == "no_scores"]
    assert [r["step"] for r in warned] == [1, 2, 3] and "boom" in warned[0]["message"]
    assert not list(out.glob("steps/*/scores.jsonl")), "failed scores were kept; a resume would not rescore"
