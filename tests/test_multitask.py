"""Multi-task runs: the ``mixture`` task, its ``by-task`` scorer and generator, per-task evaluation and
the promotion gate over every task (``tao_core.evaluation``, ``tao_core.pipeline``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tao_plugins.tasks.arithmetic import evaluate_expression
from tao_plugins.tasks.mixture import MixtureTask, interleave, shares

import tao_core
from tao_core.config import RunConfig, from_dict, load_config, validate
from tao_core.errors import TaoInputError
from tao_core.evaluation import eval_record, evaluate_rows, gate_items, summarize
from tao_core.plugins import get_component, get_plugin_manager
from tao_core.promotion import decide
from tao_core.scoring import score_groups
from tao_core.tasks import EvalResult
from tao_core.types import Candidate, Prompt, SamplingParams

EXAMPLE = Path(__file__).parents[1] / "examples" / "configs" / "multi-task.toml"


def _mixture(**over) -> MixtureTask:
    tasks = [{"name": "arithmetic", "weight": 3, "options": {"n_train": 300, "n_eval": 6}, "scorer": "arithmetic-check"},
             {"name": "instructions", "weight": 1, "options": {"n_train": 100, "n_eval": 6}, "scorer": "rules",
              "scorer_options": {"combine": "weighted"}}]
    return MixtureTask(**{"tasks": tasks, **over})


def _cand(prompt: Prompt, i: int, text: str) -> Candidate:
    return Candidate(prompt.id, i, text, [1], [2], [-0.5], finish_reason="stop")


# -- training prompts ------------------------------------------------------------------------------

def test_shares_and_interleave_follow_the_weights():
    assert shares([2.0, 1.0, 1.0], [1024, 183, 1024]) == [366, 183, 183]
    assert shares([1.0, 1.0], [10, 50]) == [10, 10]
    order = interleave([6, 2, 2])
    assert Counter(order) == {0: 6, 1: 2, 2: 2}
    for k in range(1, len(order) + 1):  # every prefix within one prompt of its share
        counts = Counter(order[:k])
        assert all(abs(counts[i] - k * n / 10) <= 1 for i, n in enumerate((6, 2, 2)))


def test_mixture_prompts_follow_the_weights_tagged_and_seeded():
    mix = _mixture()
    pool = mix.train_prompts()
    assert Counter(p.task for p in pool) == {"arithmetic": 300, "instructions": 100}
    for k in (4, 40, 400):
        assert Counter(p.task for p in pool[:k])["arithmetic"] == 3 * k // 4
    assert len({p.id for p in pool}) == len(pool)
    for p in pool:
        assert p.metadata["task"] == p.task and p.metadata["route"]["task"] == p.task
    route = next(p for p in pool if p.task == "instructions").metadata["route"]
    assert route == {"task": "instructions", "scorer": "rules", "scorer_options": {"combine": "weighted"},
                     "generator": "sample", "generator_options": {}, "max_new_tokens": 96}
    assert [p.id for p in mix.train_prompts(8)] == [p.id for p in pool[:8]]
    assert [p.id for p in _mixture().train_prompts()] == [p.id for p in pool]
    assert [p.id for p in _mixture(seed=1).train_prompts()] != [p.id for p in pool]
    assert mix.max_new_tokens == 96 and mix.default_objective == "grpo" and mix.metric == "task_mean"


def test_the_scarcest_task_sets_the_pool():
    mix = _mixture(tasks=[{"name": "arithmetic", "weight": 1, "options": {"n_train": 500}},
                          {"name": "instructions", "weight": 2, "options": {"n_train": 40}}])
    assert Counter(p.task for p in mix.train_prompts()) == {"arithmetic": 20, "instructions": 40}


# -- hostile configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks, message", [
    ([], r"task_options.tasks must be a non-empty list"),
    ("arithmetic", r"task_options.tasks must be a non-empty list"),
    ([{"name": "algebra"}], r"tasks\[0\].name = 'algebra' is not a registered task; available: arithmetic, "
                            r"instructions, sql"),
    ([{"name": "arithmetic", "weight": 0}], r"tasks\[0\].weight must be a finite number > 0, got 0"),
    ([{"name": "arithmetic", "weight": -1.5}], r"tasks\[0\].weight must be a finite number > 0"),
    ([{"name": "arithmetic", "weight": float("nan")}], r"tasks\[0\].weight must be a finite number > 0"),
    ([{"name": "arithmetic", "weight": True}], r"tasks\[0\].weight must be a finite number > 0"),
    ([{"name": "arithmetic"}, {"name": "arith"}], r"tasks\[1\].name = 'arith' repeats task 'arithmetic' of "
                                                  r"task_options.tasks\[0\]"),
    ([{"name": "sql", "scorer": "exec"}], r"tasks\[0\].scorer = 'exec' is not a registered scorer; available: .*sql-exec"),
    ([{"name": "sql", "generator": "beam"}], r"tasks\[0\].generator = 'beam' is not a registered generator"),
    ([{"name": "sql", "scorer": "by-task"}], r"tasks\[0\].scorer = 'by-task': a mixture's tasks are plain tasks"),
    ([{"name": "mixture"}], r"tasks\[0\].name = 'mixture': a mixture's tasks are plain tasks"),
    ([{"name": "sql", "wieght": 2}], r"tasks\[0\].wieght is not a key of a mixture entry; accepted: name, weight"),
    ([{"name": "arithmetic", "options": {"levl": "add2"}}], r"tasks\[0\].options.levl is not an option of task "
                                                            r"'arithmetic'; it accepts: level"),
    ([{"name": "instructions", "scorer_options": {"mode": "x"}}], r"tasks\[0\].scorer_options.mode is not an option"),
    ([{"name": "arithmetic", "generator": "diverse", "generator_options": {"temps": [1]}}],
     r"tasks\[0\].generator_options.temps is not an option of generator 'diverse'"),
    ([{"name": "arithmetic", "eval_limit": 0}], r"tasks\[0\].eval_limit must be an integer in \[1, "),
    ([{"name": "arithmetic", "max_new_tokens": 10**6}], r"tasks\[0\].max_new_tokens must be an integer in \[1, 65536\]"),
    ([{"name": "arithmetic", "options": {"level": "cubes"}}], r"tasks\[0\] \(arithmetic\): arithmetic task: unknown level"),
    (["arithmetic"], r"tasks\[0\] must be a table"),
])
def test_hostile_mixture_configs_name_the_key(tasks, message):
    with pytest.raises(TaoInputError, match=message):
        MixtureTask(tasks=tasks)


def test_every_problem_is_reported_at_once():
    with pytest.raises(TaoInputError) as e:
        MixtureTask(tasks=[{"name": "algebra", "weight": 0}, {"name": "sql", "weight": 1}, {"name": "sql"}])
    assert all(s in str(e.value) for s in ("tasks[0].name = 'algebra'", "tasks[0].weight", "tasks[2].name = 'sql'"))


def test_a_bad_mixture_fails_before_the_run_directory_exists(tmp_path, tiny_model_dir):
    from tao_core.pipeline import Pipeline

    cfg = RunConfig(task="mixture", model=str(tiny_model_dir), output_dir=str(tmp_path / "run"),
                    task_options={"tasks": [{"name": "arithmetic"}, {"name": "arithmetic", "weight": 2}]})
    with pytest.raises(TaoInputError, match=r"tasks\[1\].name = 'arithmetic' repeats"):
        Pipeline(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TaoInputError, match="task_options lacks tasks, required by task 'mixture'"):
        validate(RunConfig(task="mixture", output_dir=str(tmp_path / "run")))


def test_the_example_config_validates_and_routes_each_task():
    cfg = load_config(EXAMPLE)
    mix = get_component("tasks", cfg.task)(**cfg.task_options)
    routes = {p.task: p.metadata["route"] for p in mix.train_prompts()}
    assert {t: (r["scorer"], r["generator"]) for t, r in routes.items()} == {
        "arithmetic": ("majority-vote", "diverse"), "sql": ("sql-exec", "sample"), "instructions": ("rules", "sample")}
    assert routes["sql"]["scorer_options"]["mode"] == "consensus"


# -- routing ---------------------------------------------------------------------------------------

def test_each_prompt_is_scored_by_its_tasks_scorer():
    mix = MixtureTask(tasks=[{"name": "arithmetic", "scorer": "majority-vote"}, {"name": "sql"},
                             {"name": "instructions", "scorer_options": {"combine": "weighted"}}])
    pool = mix.train_prompts()
    prompts = [next(p for p in pool if p.task == t) for t in ("arithmetic", "sql", "instructions")]
    groups = [[_cand(prompts[0], i, f"Answer: {x}") for i, x in enumerate((5, 5, 7))],
              [_cand(prompts[1], i, "```sql\nSELECT 1;\n```") for i in range(3)],
              [_cand(prompts[2], i, t) for i, t in enumerate(("ok", "", "x"))]]
    scores = score_groups(get_component("scorers", "by-task")(), prompts, groups)
    assert [{s.scorer for s in g} for g in scores] == [{"majority-vote"}, {"sql-exec"}, {"rules"}]
    assert [s.value for s in scores[0]] == [1.0, 1.0, 0.0]  # the majority answer, not the sum
    stray = Prompt(id="file-0", text="What is 2 plus 2?", task="mixture")
    (got,) = score_groups(get_component("scorers", "by-task")(), [stray], [[_cand(stray, 0, "4")]])
    assert got[0].status == "error" and "carries no route" in got[0].reason


class _Recorder:
    """Test generators: each candidate's text names the generator and the budget it was asked with."""

    calls: list = []

    @tao_core.hookimpl
    def tao_register_generators(self, register):
        for name in ("test-gen-a", "test-gen-b"):
            register(name, self._factory(name))

    @staticmethod
    def _factory(name):
        class Gen:
            def __init__(self, model, tag: str = ""):
                self.name, self.tag = name, tag

            def generate(self, prompts, params: SamplingParams):
                _Recorder.calls.append((self.name, [p.id for p in prompts], params.max_new_tokens))
                return [[_cand(p, i, f"{self.name}{self.tag}:{params.max_new_tokens}") for i in range(params.n)]
                        for p in prompts]
        return Gen


@pytest.fixture
def recording_generators():
    pm = get_plugin_manager()
    name = pm.register(_Recorder(), name="test-multitask-generators")
    _Recorder.calls = []
    yield _Recorder.calls
    pm.unregister(name)


def test_each_prompt_is_generated_by_its_tasks_generator_at_its_budget(recording_generators):
    mix = MixtureTask(tasks=[
        {"name": "arithmetic", "generator": "test-gen-a", "generator_options": {"tag": "!"}, "max_new_tokens": 20},
        {"name": "instructions", "generator": "test-gen-b"}])
    prompts = mix.train_prompts(6)
    gen = get_component("generators", "by-task")(None)
    groups = gen.generate(prompts, SamplingParams(n=2, max_new_tokens=64))
    for p, group in zip(prompts, groups, strict=True):
        assert len(group) == 2 and all(c.prompt_id == p.id for c in group)
        assert group[0].text == ("test-gen-a!:20" if p.task == "arithmetic" else "test-gen-b:64")  # 96 capped at 64
    assert sorted(c[0] for c in recording_generators) == ["test-gen-a", "test-gen-b"]  # one batch per task
    with pytest.raises(TaoInputError, match="carries no route"):
        gen.generate([Prompt(id="p", text="hi")], SamplingParams(n=1))


# -- evaluation ------------------------------------------------------------------------------------

class _Oracle:
    """A sampler that answers arithmetic right and nothing else, and records each call's budget."""

    def __init__(self):
        self.budgets: list[int] = []

    def sample(self, prompts, params):
        self.budgets.append(params.max_new_tokens)
        out = []
        for i, p in enumerate(prompts):
            text = f"Answer: {evaluate_expression(p.metadata['expression'])}" if p.task == "arithmetic" else "no"
            out.append([_cand(p, i, text)])
        return out


def test_per_task_rows_metrics_and_the_mean():
    mix = _mixture()
    examples = mix.eval_examples(4)
    assert Counter(e.prompt.task for e in examples) == {"arithmetic": 4, "instructions": 4}
    oracle = _Oracle()
    rows = evaluate_rows(mix, oracle, examples)
    assert sorted(oracle.budgets) == [48, 96]  # each task evaluated with its own budget
    assert [r["task"] for r in rows] == [e.prompt.task for e in examples]
    result = summarize(mix, rows)
    assert (result.task, result.metric, result.value, result.n) == ("mixture", "task_mean", 0.5, 8)
    rec = eval_record(mix, result)
    assert {t: (r["metric"], r["value"], r["n"]) for t, r in rec["tasks"].items()} == {
        "arithmetic": ("accuracy", 1.0, 4), "instructions": ("strict_accuracy", 0.0, 4)}
    assert result.ci_low == pytest.approx((rec["tasks"]["arithmetic"]["ci_low"] + rec["tasks"]["instructions"]["ci_low"]) / 2)
    # under torchrun each rank evaluates a block and rank 0 gathers the rows: the tags travel with them
    gathered = json.loads(json.dumps(evaluate_rows(mix, oracle, examples[:3]) + evaluate_rows(mix, oracle, examples[3:])))
    assert eval_record(mix, summarize(mix, gathered)) == rec
    per = MixtureTask(tasks=[{"name": "arithmetic", "eval_limit": 2}, {"name": "instructions"}]).eval_examples(3)
    assert Counter(e.prompt.task for e in per) == {"arithmetic": 2, "instructions": 3}


def test_a_plain_task_evaluates_as_before():
    from tao_core.tasks import evaluate

    task = get_component("tasks", "arithmetic")(n_eval=5)
    examples = task.eval_examples()
    rows = evaluate_rows(task, _Oracle(), examples)
    old = evaluate(task, _Oracle(), examples)
    new = summarize(task, rows)
    assert new.to_dict() == old.to_dict() and "tasks" not in eval_record(task, new)
    assert {r["task"] for r in rows} == {"arithmetic"}
    assert gate_items(task, rows) == {"arithmetic": [{"prompt_id": r["prompt_id"], "value": r["value"]} for r in rows]}


def _rows(values: dict[str, list[float]]) -> list[dict]:
    return [{"prompt_id": f"{t}-{i}", "value": v, "task": t, "completion": ""}
            for t, vs in values.items() for i, v in enumerate(vs)]


def test_the_gate_rejects_one_task_regressing_while_the_mean_rises():
    mix = _mixture()
    old = _rows({"arithmetic": [0.0] * 8, "instructions": [1.0] * 8})
    new = _rows({"arithmetic": [1.0] * 8, "instructions": [0.0] * 6 + [1.0] * 2})
    assert summarize(mix, new).value > summarize(mix, old).value
    decision = decide(gate_items(mix, old), gate_items(mix, new))
    assert not decision.promoted
    verdicts = {v.task: v for v in decision.verdicts}
    assert verdicts["instructions"].regressed and not verdicts["arithmetic"].regressed
    assert verdicts["instructions"].test.p_worse == pytest.approx(1 / 64)
    assert "instructions regressed" in decision.reason
    assert decide(gate_items(mix, old), gate_items(mix, _rows({"arithmetic": [1.0] * 8,
                                                                "instructions": [1.0] * 8}))).promoted


# -- a run -----------------------------------------------------------------------------------------

def _run_config(tmp_path: Path, model: Path) -> RunConfig:
    return from_dict(RunConfig, {
        "task": "mixture", "model": str(model), "output_dir": str(tmp_path / "run"), "rounds": 1, "steps_per_round": 2,
        "prompts_per_step": 4, "eval_limit": 3, "checkpoint_every": 2, "seed": 1,
        "task_options": {"tasks": [{"name": "arithmetic", "weight": 1, "scorer": "arithmetic-check"},
                                   {"name": "instructions", "weight": 1, "scorer": "rules",
                                    "scorer_options": {"combine": "weighted"}}]},
        "generate": {"n": 2, "max_new_tokens": 4}, "train": {"lr": 1e-3}})


def _lines(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == kind]


def test_a_mixture_run_reports_every_task_and_gates_on_each(tmp_path, tiny_model_dir):
    from tao_core import pipeline

    cfg = _run_config(tmp_path, tiny_model_dir)
    validate(cfg)
    result = pipeline.run(cfg, progress=False)
    run = Path(result.run_dir)
    evals = _lines(run, "eval")
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:
        assert e["task"] == "mixture" and e["metric"] == "task_mean" and e["n"] == 6
        assert {t: (r["metric"], r["n"]) for t, r in e["tasks"].items()} == {
            "arithmetic": ("accuracy", 3), "instructions": ("strict_accuracy", 3)}
        assert e["value"] == pytest.approx(sum(r["value"] for r in e["tasks"].values()) / 2)
    (rnd,) = _lines(run, "round")
    assert set(rnd["gate_tasks"]) == {"arithmetic", "instructions"} and "gate_reason" in rnd
    (final,) = _lines(run, "final")
    assert set(final["tasks"]) == {"arithmetic", "instructions"}
    prompts = {json.loads(line)["id"]: json.loads(line)["task"] for f in sorted(run.glob("steps/*/prompts.jsonl"))
               for line in f.read_text().splitlines()}
    scorers = {(prompts[s["prompt_id"]], s["scorer"]) for f in sorted(run.glob("steps/*/scores.jsonl"))
               for s in map(json.loads, f.read_text().splitlines())}
    assert scorers == {("arithmetic", "arithmetic-check"), ("instructions", "rules")}


def test_a_run_rolls_back_when_one_task_regresses_and_the_mean_rises(tmp_path, tiny_model_dir, monkeypatch):
    from tao_core import pipeline

    mix_rows = iter([_rows({"arithmetic": [0.0] * 8, "instructions": [1.0] * 8}),
                     _rows({"arithmetic": [1.0] * 8, "instructions": [0.0] * 6 + [1.0] * 2})])

    def evaluate(self) -> EvalResult:
        return summarize(self.task, next(mix_rows))

    monkeypatch.setattr(pipeline.Pipeline, "evaluate", evaluate)
    result = pipeline.run(_run_config(tmp_path, tiny_model_dir), progress=False)
    before, after = _lines(Path(result.run_dir), "eval")
    assert after["value"] > before["value"]
    (rnd,) = _lines(Path(result.run_dir), "round")
    assert rnd["promoted"] is False and rnd["rolled_back"] is True and rnd["best_step"] == 0
    assert rnd["gate_tasks"]["instructions"]["regressed"] and not rnd["gate_tasks"]["arithmetic"]["regressed"]
    assert result.after["step"] == 0


def test_two_ranks_keep_each_rows_task(tmp_path, tiny_model_dir):
    """Under torchrun each rank evaluates a block of the held-out examples (here rank 0 arithmetic's,
    rank 1 instructions'); rank 0 gathers the rows, and each still names its task."""
    import os
    import socket
    import subprocess
    import sys

    toml = tmp_path / "c.toml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = (f'task = "mixture"\nmodel = "{tiny_model_dir}"\nrounds = 1\nsteps_per_round = 1\nprompts_per_step = 2\n'
            'eval_limit = 3\ncheckpoint_every = 1\n[[task_options.tasks]]\nname = "arithmetic"\n'
            'scorer = "arithmetic-check"\n[[task_options.tasks]]\nname = "instructions"\n[generate]\nn = 2\n'
            'max_new_tokens = 4\n[distributed]\ntimeout_s = 120\n')
    toml.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "-m", "tao_core.cli", "run", str(toml),
                           "--output-dir", str(tmp_path / "two")],
                          env={**env, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for e in _lines(tmp_path / "two", "eval"):
        assert {t: r["n"] for t, r in e["tasks"].items()} == {"arithmetic": 3, "instructions": 3}
    (rnd,) = _lines(tmp_path / "two", "round")
    assert set(rnd["gate_tasks"]) == {"arithmetic", "instructions"}
