"""Every registered objective, and the label-free parts that change a step's batch or its
normalization, give the same run on 2 ranks (gloo, loopback) as on 1 process; a 1-process
checkpoint resumes on 2 ranks; each rank's engine samples the trainer's own log-probs.

The runs are launched twice, once as one process and once under torchrun with 2 ranks, each launch
running every config of ``RUNS`` in turn (:func:`drive`: this module run as a script), so starting
Python, torch and the process group is paid twice, not once per config. Every config has 3 prompts
per step (2 ranks serve 2 and 1: unequal micro-batches), 3 steps over a pool of 3 prompts (8 with
dynamic sampling; revisits from step 2, so the flip rate is defined) and a label-free scorer: a vote
on the first letter of each completion scoring agreement with the group's majority, with its margin
(``tests.test_label_free``'s ``test-vote``: no label, nothing computes an answer). The model is the
tiny random Llama with sharpened logits (:func:`sharp_model_dir`), whose token entropies differ
between sequences, and stop strings make completion lengths differ: a length or a per-token value
averaged with the wrong weights shows.

What each config exercises:

* ``grpo``: per-sequence mean loss; the voter-margin gate (``score.gate``); the flip rate.
* ``dr_grpo``: fixed-length normalization (by the step's longest completion over every rank's
  groups); the soft overlong penalty; truncated completions masked; several micro-batches per rank.
* ``dapo``: token-mean loss over the whole batch; EMA voters on teacher weights whose completions
  train the policy's own prompt with truncated importance sampling (``train.off_policy =
  "importance"``), the gate and the overlong penalty: the importance tally gathered over ranks.
* ``ppo_clip_kl``: a batch-wide reward baseline and KL to the reference, with dynamic sampling: the
  replaced groups change which prompts each rank serves and the baseline all ranks share.
* ``rloo``: leave-one-out advantages, ``old_logprobs = "current"`` (``sampler_trainer_kl``).
* ``online_dpo``: (best, worst) pairs against the reference, a pair never split.
* ``best_of_n_sft``: the NLL of each group's best candidates, a token mean.

The 2-rank launch runs ``FSDP``'s configs once more with ``distributed.strategy = "fsdp"``, compared
with the same 1-process runs (DDP is the default strategy).

Tolerances: the two runs sample the same tokens and score them alike, so every count, reward,
advantage statistic and label-free statistic (``flip_rate``, the gate's and dynamic sampling's
counts, ``truncated_masked``, ``overlong_*``, ``off_policy_trained``, ...) is equal exactly. What the
trainer computes is not bit for bit: each rank packs only its own groups, so matmul shapes differ,
and the gradient is summed over ranks in another order. ``TRAINER_RTOL`` bounds losses, gradient
norms and the trainer's other metrics (KL, entropy, clip fraction, importance ratios, DPO margin,
NLL), ``LOSS_ATOL`` losses that are rounding noise, ``SAMPLER_KL_ATOL`` the sampler/trainer
mismatch (itself rounding noise), ``WEIGHTS_RTOL`` the final weights; each says what it measured.
Per-token metrics (entropy, KL, clip fraction) are token means over every rank's micro-batches
(``LossOutput.metric_units``), whatever the units of the loss.

The log-prob gap: in every run, before each training step, each rank compares the log-probs its
engine returned for its own on-policy candidates with its trainer model's full forward at the
candidate's temperature (the check of ``tests/test_engine_real.py``): at most ``GAP_TOL`` on every
rank at every step, so each rank's engine samples from the weights the last update made.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_tiny_model_dir
from tests.test_distributed import _close, _free_port, _steps
from tests.test_label_free import VOTE_PLUGIN
from tests.test_plugins import _fake_dist

REPO = Path(__file__).resolve().parents[1]
# final weights, ||a - b|| / ||a||: measured 2e-8 to 1.1e-6, but 9.2e-6 for dapo, whose 1-process run
# moves as much (8.3e-6) when only micro_batch_tokens changes: AdamW's first update, g / (|g| + eps),
# turns the rounding of a gradient entry near eps into a difference of up to lr (one entry of 2e-4)
WEIGHTS_RTOL = 5e-5
TRAINER_RTOL = 1e-4  # losses, gradient norms, the trainer's other metrics: measured at most 4.5e-6 (dpo_margin)
# a loss that is 0 but for rounding (the first update's ratio is 1 and a group's normalized advantages
# sum to 0: grpo's and rloo's losses are a few 1e-8, measured up to 6.5e-8 apart); real losses here >= 5e-4
LOSS_ATOL = 1e-6
# sampler_trainer_kl: a mean of per-token (engine - trainer) log-prob differences, float32 rounding
# of log-probs near -6 (4.8e-7 and 9.5e-7 per token, measured): noise of either sign in both runs
SAMPLER_KL_ATOL = 1e-6
GAP_TOL = 1e-4  # engine vs trainer log-probs, per token
TIMEOUT_S = 60  # distributed.timeout_s of these runs
# computed by the trainer from its own micro-batches: close, not equal, across rank counts
TRAINER_FLOATS = {"loss", "grad_norm", "kl", "entropy", "clip_fraction", "is_ratio_mean", "is_ratio_max",
                  "is_clipped_fraction", "sampler_trainer_kl", "dpo_margin", "dpo_accuracy", "nll"}
# the packing's (how many micro-batches, a group's prompt repeated in each), or the rank count itself
PACKING = {"micro_batches", "row_tokens", "world_size"}

BASE = {
    "": ['task = "arithmetic"', "rounds = 1", "steps_per_round = 3", "prompts_per_step = 3", "eval_limit = 2",
         "checkpoint_every = 2", "seed = 11"],
    "distributed": [f"timeout_s = {TIMEOUT_S}"],
    "generate": ["n = 4", "max_new_tokens = 6", 'stop = ["e", "o", "t"]'],  # lengths 0 to 6, some cut
    "score": ['scorer = "test-vote"'],
    "train": ["lr = 3e-3"],
}
TEACHER = {  # voters on EMA teacher weights under the "plain" template: off-policy for the policy
    "generate": ['generator = "diverse"', 'voters = "ema"', "ema_rate = 0.5"],
    "generate.options": ['templates = ["default", "plain"]', "temperatures = [1.0]",
                         'template_weight_sets = { plain = "teacher" }'],
}
RUNS: dict[str, dict[str, list[str]]] = {  # run -> lines added to BASE's sections
    "grpo": {"train": ['objective = "grpo"'], "score": ["gate = [0.3, 0.9]"]},
    "dr_grpo": {"train": ['objective = "dr_grpo"', "overlong_buffer = 3", "mask_truncated = true",
                          "micro_batch_tokens = 48"]},
    "dapo": {**TEACHER, "train": ['objective = "dapo"', 'off_policy = "importance"', "overlong_buffer = 2"],
             "score": ["gate = [0.0, 0.9]"]},
    "ppo_clip_kl": {"train": ['objective = "ppo_clip_kl"'],
                    "generate": ["dynamic_sampling = true", "max_resample = 2", "temperature = 0.5"]},
    "rloo": {"train": ['objective = "rloo"', 'old_logprobs = "current"', "micro_batch_tokens = 64"]},
    "online_dpo": {"train": ['objective = "online_dpo"', "micro_batch_tokens = 64"]},
    "best_of_n_sft": {"train": ['objective = "best_of_n_sft"']},
}
POOL = {"ppo_clip_kl": 8}  # prompts in a run's pool (3 unless named): dynamic sampling draws fresh ones
# also run on 2 ranks with distributed.strategy = "fsdp" (FSDP2 keeps no teacher: not dapo's EMA voters):
# fixed-length normalization over micro-batches padded to equal counts, pairs and the sharded reference
FSDP = ["dr_grpo", "online_dpo", "ppo_clip_kl"]


def _config(root: Path, name: str, model: Path, strategy: str | None = None) -> Path:
    """Run ``name``'s config file (with ``distributed.strategy`` when given); its ``output_dir`` is
    given by whoever runs it."""
    prompts = root / f"prompts-{name}.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": f"What is {i + 12} plus {3 * i + 5}?"}) + "\n"
                               for i in range(POOL.get(name, 3))))
    sections = {k: list(v) for k, v in BASE.items()}
    sections[""] += [f'model = "{model}"', f'prompts_file = "{prompts}"']
    for section, lines in RUNS[name].items():
        sections.setdefault(section, []).extend(lines)
    if strategy is not None:
        sections["distributed"].append(f'strategy = "{strategy}"')
    text = "\n".join(sections.pop(""))
    text += "".join(f"\n\n[{section}]\n" + "\n".join(lines) for section, lines in sections.items())
    path = root / f"{name}{'' if strategy is None else '-' + strategy}.toml"
    path.write_text(text + "\n")
    return path


# -- the driver: one launch runs every config in turn ----------------------------------------------

def _gap(model: torch.nn.Module, groups) -> tuple[float, int]:
    """The largest |engine log-prob - trainer log-prob| over the on-policy candidates of ``groups``
    (the trainer's full forward at the candidate's temperature), and how many candidates it covered."""
    gap, seen = 0.0, 0
    for group in groups:
        for c in group:
            if c.metadata.get("off_policy") or not c.token_ids:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([c.prompt_token_ids + c.token_ids])).logits
            logits = logits[0, len(c.prompt_token_ids) - 1:-1].float() / c.temperature
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            gap, seen = max(gap, (want - torch.tensor(c.logprobs)).abs().max().item()), seen + 1
    return gap, seen


def drive(spec: Path) -> None:
    """Run each ``[config, output_dir]`` of the JSON list ``spec`` in this process (the only one, or
    one rank of torchrun's), and write this rank's log-prob gaps per run and step beside the runs.

    The runs share one process group: a run leaves it open and the next joins it (gloo's re-created
    group can read the old one's addresses from the launcher's store and fail to connect)."""
    from tao_core import pipeline
    from tao_core.config import load_config
    from tao_core.distributed import Dist
    from tao_core.train import Trainer

    jobs = json.loads(spec.read_text())
    real_step, gaps = Trainer.step, {}

    def step(self, prompts, groups, scores, *, local=None, **kw):
        mine = range(len(groups)) if local is None else local
        if self.sharding is None:  # FSDP's forward gathers: tests/test_distributed_fsdp.py checks its gap per rank
            gaps[name].append(_gap(self.lm.model, [groups[i] for i in mine]))
        return real_step(self, prompts, groups, scores, local=local, **kw)

    Trainer.step, leave, Dist.close = step, Dist.close, lambda self: None
    for config, out in jobs:
        name = Path(out).name
        gaps[name] = []
        pipeline.run(load_config(config, {"output_dir": out}), progress=False)
    rank = os.environ.get("RANK", "0")
    (Path(jobs[0][1]).parent / f"gaps-rank{rank}.json").write_text(json.dumps(gaps))
    leave(Dist.from_env(load_config(jobs[0][0]).distributed))


def _env(plugins: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "TAO_FAULT", "TAO_FAULT_RANK")}
    return {**env, "PYTHONPATH": f"{plugins}{os.pathsep}{REPO}", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], plugins: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(plugins, **env), capture_output=True, text=True, timeout=600, cwd=REPO)


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port())]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def vote_plugin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vote-plugin")
    _fake_dist(root, "tao-test-vote", "test-vote", "tao_test_vote", VOTE_PLUGIN)
    return root


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory) -> Path:
    """The tiny random Llama with its (tied) embeddings scaled by 4: token entropies of 4.5 +- 0.4
    nats instead of a uniform 5.75, so that per-token metrics differ between sequences and a
    metric averaged with the wrong weights shows."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model_dir(tmp_path_factory.mktemp("sharp-model"))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def launches(tmp_path_factory, sharp_model_dir, vote_plugin) -> dict[int, Path]:
    """Every run of ``RUNS`` as 1 process and on 2 ranks: {ranks: the folder holding the runs}."""
    root = tmp_path_factory.mktemp("objectives")
    jobs = {name: _config(root, name, sharp_model_dir) for name in RUNS}
    fsdp = {f"{name}-fsdp": _config(root, name, sharp_model_dir, "fsdp") for name in FSDP}
    out = {}
    for ranks in (1, 2):
        out[ranks] = root / f"ranks-{ranks}"
        out[ranks].mkdir()
        spec = root / f"spec-{ranks}.json"
        runs = {**jobs, **(fsdp if ranks > 1 else {})}
        spec.write_text(json.dumps([[str(config), str(out[ranks] / name)] for name, config in runs.items()]))
        launcher = [sys.executable] if ranks == 1 else _torchrun(ranks)
        _ok(_run([*launcher, str(Path(__file__)), str(spec)], vote_plugin))
    return out


def _timing(key: str) -> bool:
    return key in ("time", "seconds") or key.endswith(("_s", "_seconds"))


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _differences(one: Path, two: Path) -> tuple[list[str], dict[str, float]]:
    """The step-line fields of two runs that differ beyond their tolerance, and the
    largest relative difference of each trainer metric."""
    bad, worst = [], {}
    for a, b in zip(_steps(one), _steps(two), strict=True):
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
        for k in a:
            if _timing(k) or k in PACKING or k == "trainer_step":
                continue
            if k in TRAINER_FLOATS and a[k] is not None and b[k] is not None:
                rel = abs(a[k] - b[k]) / max(abs(a[k]), 1e-30)
                worst[k] = max(worst.get(k, 0.0), rel)
                atol = {"loss": LOSS_ATOL, "sampler_trainer_kl": SAMPLER_KL_ATOL}.get(k, 0.0)
                if not (abs(a[k] - b[k]) <= max(TRAINER_RTOL * abs(a[k]), atol) or _same(a[k], b[k])):
                    bad.append(f"step {a['step']} {k}: {a[k]!r} (1 process) vs {b[k]!r} (2 ranks)")
            elif not _same(a[k], b[k]):
                bad.append(f"step {a['step']} {k}: {a[k]!r} (1 process) vs {b[k]!r} (2 ranks)")
    return bad, worst


@pytest.mark.parametrize(("name", "strategy"), [*((n, "ddp") for n in RUNS), *((n, "fsdp") for n in FSDP)])
def test_two_ranks_equal_one_process(launches, name, strategy):
    one, two = launches[1] / name, launches[2] / (name if strategy == "ddp" else f"{name}-fsdp")
    assert [r["world_size"] for r in _steps(one)] == [1, 1, 1]
    assert [r["world_size"] for r in _steps(two)] == [2, 2, 2]
    bad, worst = _differences(one, two)
    weights = _close(load_file(str(one / "final" / "model.safetensors")),
                     load_file(str(two / "final" / "model.safetensors")))
    assert not bad, "\n".join(bad)
    assert weights < WEIGHTS_RTOL, f"final weights differ by {weights:.2e} relative; trainer metrics {worst}"
    evals = [[(r["value"], r["n"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "eval"] for d in (one, two)]
    assert evals[0] == evals[1]


def test_the_runs_exercise_what_they_claim(launches):
    """The label-free parts fired in the runs compared above (a comparison of parts that never ran proves nothing)."""
    steps = {name: _steps(launches[1] / name) for name in RUNS}
    total = lambda name, key: sum(r.get(key) or 0 for r in steps[name])  # noqa: E731
    assert total("grpo", "gate_outside") > 0 and total("grpo", "gate_in_band") > 0
    assert any(r.get("flip_rate") is not None for r in steps["grpo"])
    assert total("dr_grpo", "overlong_penalized") > 0 and total("dr_grpo", "truncated_masked") > 0
    assert total("dapo", "off_policy_trained") > 0 and all(r["is_ratio_mean"] is not None for r in steps["dapo"])
    assert total("ppo_clip_kl", "resampled_prompts") > 0 and total("ppo_clip_kl", "replaced_groups") > 0
    assert all(r["sampler_trainer_kl"] is not None for r in steps["rloo"])
    assert all(r["sequences"] > 0 for name in RUNS for r in steps[name])
    two = {name: _steps(launches[2] / name) for name in RUNS}
    assert any(r["micro_batches"] > 2 for name in ("dr_grpo", "rloo") for r in two[name])


def test_each_ranks_engine_samples_the_trainers_logprobs(launches):
    for ranks, folder in launches.items():
        for rank in range(ranks):
            gaps = json.loads((folder / f"gaps-rank{rank}.json").read_text())
            for name in RUNS:
                per_step = gaps[name]
                assert len(per_step) == 3 and all(seen > 0 for _, seen in per_step), (ranks, rank, name, per_step)
                assert max(gap for gap, _ in per_step) <= GAP_TOL, (ranks, rank, name, per_step)


def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path, launches, sharp_model_dir, vote_plugin):
    """The EMA-voter, importance-sampled run killed before step 3 on one process, resumed on 2 ranks:
    the teacher, the flip monitor and the trainer's state cross the rank count."""
    out = tmp_path / "dapo"
    config = _config(tmp_path, "dapo", sharp_model_dir)
    cli = ["-m", "tao_core.cli", "run"]
    killed = _run([sys.executable, *cli, str(config), "--output-dir", str(out)], vote_plugin, TAO_FAULT="train.before:3")
    assert killed.returncode != 0 and not (out / "final").exists()
    _ok(_run([*_torchrun(2), *cli, "--resume", str(out)], vote_plugin))
    assert [r["world_size"] for r in _steps(out)] == [1, 1, 2]
    bad, worst = _differences(launches[1] / "dapo", out)
    assert not bad, "\n".join(bad)
    weights = _close(load_file(str(launches[1] / "dapo" / "final" / "model.safetensors")),
                     load_file(str(out / "final" / "model.safetensors")))
    assert weights < WEIGHTS_RTOL, f"final weights differ by {weights:.2e} relative; trainer metrics {worst}"


if __name__ == "__main__":
    drive(Path(sys.argv[1]))
