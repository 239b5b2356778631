"""Label-free TAO's parts in a run: voters on teacher weights (EMA), gating by voter margin, the
flip-rate monitor, off-policy voters trained with truncated importance sampling; the teacher and
the monitor resume bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_pipeline import _finish, _tao
from tests.test_plugins import _fake_dist

# A voting scorer with a margin and a majority, like majority-vote, on the first letter of each
# answer (a random tiny model writes no numbers): it scores agreement with the voters' majority.
VOTE_PLUGIN = """
from collections import Counter
import tao_core
from tao_core import Score

class FirstLetterVote:
    name = "test-vote"
    version = "1"
    def score(self, prompt, candidates):
        key = lambda c: (c.text.strip()[:1] or "?").lower()
        voters = [c for c in candidates if c.metadata.get("template") == "plain"] or list(candidates)
        votes = Counter(key(c) for c in voters)
        top, count = votes.most_common(1)[0]
        margin = count / len(voters)
        return [Score.ok(float(key(c) == top), scorer=self.name, details={"margin": margin, "majority": top})
                for c in candidates]

@tao_core.hookimpl
def tao_register_scorers(register):
    register("test-vote", FirstLetterVote)
"""


@pytest.fixture(scope="module")
def vote_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vote-plugin")
    _fake_dist(root, "tao-test-vote", "test-vote", "tao_test_vote", VOTE_PLUGIN)
    return root


def _config(tmp_path: Path, model: Path, out: Path, **train: str) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                               for i, t in enumerate(["What is 12 plus 35?", "What is 40 plus 7?"])))
    extra = "".join(f"{k} = {v}\n" for k, v in train.items())
    path = tmp_path / f"{out.name}.toml"
    path.write_text(textwrap.dedent(f"""
        task = "arithmetic"
        model = "{model}"
        prompts_file = "{prompts}"
        output_dir = "{out}"
        rounds = 2
        steps_per_round = 2
        prompts_per_step = 2
        eval_limit = 4
        checkpoint_every = 1
        seed = 5

        [generate]
        generator = "diverse"
        n = 4
        max_new_tokens = 6
        voters = "ema"
        ema_rate = 0.5

        [generate.options]
        templates = ["default", "plain"]
        temperatures = [1.0]
        template_weight_sets = {{ plain = "teacher" }}

        [score]
        scorer = "test-vote"
        gate = [0.0, 0.99]

        [guard]
        max_flip_rate = 0.0

        [train]
        lr = 3e-3
        off_policy = "importance"
        overlong_buffer = 2
    """) + extra)
    return path


def test_label_free_parts_run_log_and_resume_bit_for_bit(tmp_path, tiny_model_dir, vote_path):
    full = tmp_path / "full"
    _finish(_tao(["run", str(_config(tmp_path, tiny_model_dir, full))], vote_path))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert len(steps) == 4
    assert all("is_ratio_mean" in r and "voter_margin_mean" in r and "gate_in_band" in r for r in steps)
    assert all(r["off_policy_trained"] > 0 for r in steps)  # the voters' completions trained the policy
    assert [r.get("flip_rate") is not None for r in steps] == [False, True, True, True]  # revisits from step 2
    assert any(r["type"] == "warning" and r["kind"] == "voter_flips" for r in rows) == any(
        (r.get("flip_rate") or 0) > 0 for r in steps)
    ckpt = sorted((full / "checkpoints").glob("step-*"))[-1]
    teacher = load_file(str(ckpt / "pipeline.safetensors"))
    assert teacher and json.loads((ckpt / "manifest.json").read_text())["files"]["pipeline.safetensors"]

    killed = tmp_path / "killed"
    _config(tmp_path, tiny_model_dir, killed)
    env = {**os.environ, "PYTHONPATH": str(vote_path), "TQDM_DISABLE": "1"}
    cli = [sys.executable, "-m", "tao_core.cli", "run"]
    first = subprocess.run([*cli, str(tmp_path / "killed.toml")], env={**env, "TAO_FAULT": "train.before:3"},
                           capture_output=True, text=True, timeout=600)  # SIGKILL before step 3 trains
    assert first.returncode != 0 and not (killed / "final").exists()
    resumed = subprocess.run([*cli, "--resume", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    strip = lambda r: {k: v for k, v in r.items() if k != "time" and not k.endswith(("_s", "seconds"))}  # noqa: E731
    rows_b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [strip(r) for r in rows if r["type"] == "step"] == [strip(r) for r in rows_b if r["type"] == "step"]


class _HalfConstant:
    """Scores candidates of odd-numbered prompts all 1.0 (a group with no advantage) and those of
    even-numbered prompts by the parity of their length (a group that usually has one)."""

    name, version = "test-half-constant", "1"

    def score(self, prompt, candidates):
        from tao_core import Score

        odd = int(prompt.id[1:]) % 2 == 1
        return [Score.ok(1.0 if odd else float(len(c.token_ids) % 2 or c.index % 2)) for c in candidates]


class _HalfConstantPlugin:
    import tao_core as _tao_core

    @_tao_core.hookimpl
    def tao_register_scorers(self, register):
        register("test-half-constant", _HalfConstant)


def test_dynamic_sampling_replaces_groups_without_an_advantage(tmp_path, tiny_model_dir):
    from tao_core import pipeline
    from tao_core.config import load_config
    from tao_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    name = pm.register(_HalfConstantPlugin(), name="test-half-constant-plugin")
    try:
        path = _config(tmp_path, tiny_model_dir, tmp_path / "dyn")
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": f"What is {i} plus {i + 3}?"}) + "\n"
                                   for i in range(12)))
        overrides = {"score.scorer": "test-half-constant", "score.gate": None, "generate.voters": "policy",
                     "generate.options": {"templates": ["default"], "temperatures": [1.0]},
                     "generate.dynamic_sampling": True, "generate.max_resample": 3, "rounds": 1,
                     "train.off_policy": "drop", "train.overlong_buffer": 0, "guard.max_flip_rate": None}
        pipeline.run(load_config(path, overrides), progress=False)
        plain = load_config(path, {**overrides, "generate.dynamic_sampling": False, "output_dir": str(tmp_path / "plain")})
        pipeline.run(plain, progress=False)
    finally:
        pm.unregister(name)
    out = tmp_path / "dyn"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    assert sum(r["replaced_groups"] for r in steps) > 0
    assert sum(r["uninformative_groups"] for r in steps) < sum(r["replaced_groups"] for r in steps)
    assert any((out / "steps").glob("step-*-r1")), "the resampled prompts and candidates are kept on disk"
    from tao_core.types import Score, read_jsonl

    flat = []  # without dynamic sampling the odd prompts' groups are trained on although they teach nothing
    for path in sorted((tmp_path / "plain" / "steps").glob("step-*/scores.jsonl")):
        values = [s.value for s in read_jsonl(path, Score)]
        flat += [len(set(values[i:i + 4])) == 1 for i in range(0, len(values), 4)]
    assert any(flat) and "resampled_prompts" not in json.loads(
        (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[1])


@pytest.mark.real_model
def test_the_teacher_recipe_trains_the_embedded_model_and_logs_ratios_and_flips(tmp_path):
    """Two short steps of `tao demo label-free-teacher` on SmolLM2-135M: it trains without error and
    metrics.jsonl carries the importance ratios and the flip rate."""
    from click.testing import CliRunner

    from tao_core.cli import cli

    out = tmp_path / "lf"
    args = ["demo", "label-free-teacher", "--output-dir", str(out), "--set", "rounds=1", "--set", "steps_per_round=2",
            "--set", "prompts_per_step=4", "--set", "eval_limit=8", "--set", "guard.eval_every=0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert len(steps) == 2
    for r in steps:
        assert any("ratio" in k for k in r) and any("flip" in k for k in r), sorted(r)
        assert r["off_policy_trained"] + r["off_policy_dropped"] >= 0 and "sampler_trainer_kl" in r
    assert (out / "final" / "model.safetensors").exists()


def test_a_rollback_resets_the_teacher_to_the_best_weights(tmp_path, tiny_model_dir, vote_path, monkeypatch):
    """Evaluations faked so that round 2 is significantly worse than round 1: the policy is rolled
    back to round 1's weights, and the EMA teacher with it (the voters leave the rejected path)."""
    import sys

    from tao_core import pipeline
    from tao_core.config import load_config
    from tao_core.tasks import EvalResult

    monkeypatch.syspath_prepend(str(vote_path))
    sys.modules.pop("tao_test_vote", None)
    import importlib

    from tao_core.plugins import get_plugin_manager, get_registry

    pm = get_plugin_manager()
    name = None
    if "test-vote" not in get_registry().names("scorers"):  # not found by entry point in this process yet
        name = pm.register(importlib.import_module("tao_test_vote"), name="test-vote-rollback")
    values = iter([[0] * 16, [1] * 16, [1] * 4 + [0] * 12])  # before, round 1 (best), round 2 (12 items lost)
    seen = {}

    def fake_evaluate(self):
        rows = [{"prompt_id": f"e{i}", "completion": "", "value": float(v)} for i, v in enumerate(next(values))]
        value = sum(r["value"] for r in rows) / len(rows)
        return EvalResult("arithmetic", "accuracy", value, 0.0, 1.0, len(rows), rows)

    real_restore = pipeline.Pipeline._restore_best

    def restore(self, step):
        real_restore(self, step)
        seen["best"] = {n: p.detach().clone() for n, p in self._trainable().items()}

    monkeypatch.setattr(pipeline.Pipeline, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline.Pipeline, "_restore_best", restore)
    try:
        cfg = load_config(_config(tmp_path, tiny_model_dir, tmp_path / "rb"), {"score.gate": None})
        pipe = pipeline.Pipeline(cfg, progress=False)
        pipe.run()
    finally:
        if name is not None:
            pm.unregister(name)
    rounds = [json.loads(line) for line in (tmp_path / "rb" / "metrics.jsonl").read_text().splitlines()
              if '"round"' in line and '"type": "round"' in line]
    assert [r["rolled_back"] for r in rounds] == [False, True]
    teacher = pipe.teacher.state_dict()
    assert teacher and all(torch_equal(teacher[n], seen["best"][n]) for n in teacher)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
