"""The two sides of ``bench/trl_compare.py``, each run in a process of its own.

    python bench/_compare_sides.py tao SPEC_JSON            # tao's environment
    TRL_VENV/bin/python bench/_compare_sides.py trl SPEC_JSON  # the TRL environment

``tao``: the TAO pipeline as ``tao demo`` runs it (one round of ``steps`` steps: sample with the
engine, score with the task's verifier, one GRPO update), evaluation excluded from the step time.

``trl``: TRL's ``GRPOTrainer`` on the same model object (tao's ``load_model``, fp32, from tao's
safetensors cache), the same prompts in the same order (tao's ``step_prompts``), the same reward
(tao's ``score_groups`` with the task's default scorer, ``arithmetic-check``) and the same held-out
evaluation (``tao_core.tasks.evaluate``: greedy, the task's prompt and answer check). tao-core is
installed in the TRL environment (editable, from this repository) for exactly that.

Each side prints one line ``RESULT <json>``: per-step seconds (generation, reward and update;
evaluation and checkpoints excluded), CPU seconds per step, peak resident memory, held-out accuracy before and after.
Peak memory is ``VmHWM``; it is reset (``/proc/self/clear_refs``) once the model is loaded and
evaluated, so ``train_peak_rss_mb`` covers the training steps alone and ``peak_rss_mb`` the whole
process; ``cpu_s_per_step`` is the process CPU time of that same window divided by the steps.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import status_mb  # noqa: E402

RESULT_PREFIX = "RESULT "


class TrainWindow:
    """The training steps' window of this process: peak resident memory and CPU time inside it.

    CPU time (all threads) is far less disturbed than wall time by other load on a shared machine.
    """

    def __init__(self) -> None:
        self.before_peak = 0.0  # VmHWM when the window opened
        self.peak: float | None = None  # VmHWM when it closed
        self.cpu_s: float | None = None  # process CPU seconds inside it
        self._cpu0 = 0.0

    def open(self) -> None:
        """Remember the peak so far, reset ``VmHWM`` to the current resident size, start the CPU clock."""
        self.before_peak = max(self.before_peak, status_mb("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")
        self._cpu0 = time.process_time()

    def close(self) -> None:
        self.cpu_s = time.process_time() - self._cpu0
        self.peak = status_mb("VmHWM")

    def process_peak(self) -> float:
        return max(self.before_peak, status_mb("VmHWM"))


def step_stats(times: Sequence[float]) -> dict[str, float]:
    """Median and mean seconds per step over the steps after the first (its warm-up is reported apart)."""
    if not times:
        raise RuntimeError("no training step was timed")
    steady = list(times[1:]) or list(times)
    return {"s_per_step": statistics.median(steady), "s_per_step_mean": statistics.fmean(steady),
            "first_step_s": times[0], "train_s": sum(times)}


def make_task(spec: dict[str, Any]) -> Any:
    from tao_core.plugins import get_component

    return get_component("tasks", spec["task"])(**spec["task_options"])


def heldout(task: Any, lm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """tao's fixed evaluation protocol on the first ``eval_limit`` held-out examples."""
    from tao_core.sampler import sampler_for
    from tao_core.tasks import evaluate

    return evaluate(task, sampler_for(lm), task.eval_examples(spec["eval_limit"])).to_dict()


def make_reward(task: Any, prompts_by_id: dict[str, Any], scorer_name: str | None = None) -> Callable[..., list]:
    """A TRL reward function that scores with tao's scorer (the task's default when no name is given).

    TRL passes the flat list of completions (chat format: ``[{"role": "assistant", "content": ...}]``
    or plain strings) with the dataset's extra columns; here ``prompt_id`` maps each completion
    back to its tao ``Prompt``. Completions of one prompt form one group, as tao scores them; an
    abstained or errored score becomes ``None``, which TRL leaves out of the advantages.
    """
    from tao_core.scoring import load_scorer, score_groups
    from tao_core.types import Candidate

    scorer = load_scorer(scorer_name or task.default_scorer)

    def tao_reward(completions: list, prompt_id: list[str], **_: Any) -> list[float | None]:
        order: list[str] = []
        members: dict[str, list[int]] = {}
        for i, pid in enumerate(prompt_id):
            if pid not in members:
                order.append(pid)
                members[pid] = []
            members[pid].append(i)
        groups = []
        for pid in order:
            group = []
            for j, i in enumerate(members[pid]):
                c = completions[i]
                text = c[-1]["content"] if isinstance(c, list) else str(c)
                group.append(Candidate(prompt_id=pid, index=j, text=text, prompt_token_ids=[], token_ids=[],
                                       logprobs=[]))
            groups.append(group)
        scores = score_groups(scorer, [prompts_by_id[pid] for pid in order], groups)
        out: list[float | None] = [None] * len(completions)
        for pid, group_scores in zip(order, scores, strict=True):
            for i, s in zip(members[pid], group_scores, strict=True):
                out[i] = float(s.value) if s.is_ok else None
        return out

    return tao_reward


def run_tao(spec: dict[str, Any]) -> dict[str, Any]:
    """The TAO pipeline, one round of ``steps`` steps, measured."""
    import torch

    torch.set_num_threads(spec["threads"])
    from tao_core.config import GenerateConfig, RunConfig
    from tao_core.pipeline import Pipeline
    from tao_core.tasks import EvalResult
    from tao_core.train import TrainConfig

    window = TrainWindow()
    evals: list[EvalResult] = []

    class MeasuredPipeline(Pipeline):
        """Opens the training-memory window after the first evaluation, closes it before the next."""

        def evaluate(self) -> EvalResult:
            if evals:
                window.close()
            result = super().evaluate()
            evals.append(result)
            if len(evals) == 1:
                window.open()
            return result

    cfg = RunConfig(
        task=spec["task"], task_options=dict(spec["task_options"]), model=spec["model"],
        output_dir=str(Path(spec["workdir"]) / "tao-run"), seed=spec["seed"], rounds=1,
        steps_per_round=spec["steps"], prompts_per_step=spec["prompts"], eval_limit=spec["eval_limit"],
        checkpoint_every=spec["steps"], threads=spec["threads"],
        generate=GenerateConfig(n=spec["group"], temperature=spec["temperature"],
                                max_new_tokens=spec["max_new_tokens"]),
        train=TrainConfig(objective=spec["tao_objective"], lr=spec["lr"]),
    )
    t0 = time.perf_counter()
    pipe = MeasuredPipeline(cfg, progress=spec["progress"])
    load_s = time.perf_counter() - t0
    pipe.run()
    records = pipe.dir.read_metrics()
    steps = [r for r in records if r.get("type") == "step"]
    if len(steps) != spec["steps"] or len(evals) < 2:
        raise RuntimeError(f"tao run stopped after {len(steps)} of {spec['steps']} steps "
                           f"({len(evals)} evaluations); see {cfg.output_dir}/metrics.jsonl")
    times = [r["generate_s"] + r["score_s"] + r["train_s"] for r in steps]
    return {
        "side": "tao", **step_stats(times), "load_s": load_s,
        "generate_s": statistics.fmean(r["generate_s"] for r in steps),
        "update_s": statistics.fmean(r["train_s"] for r in steps),
        "peak_rss_mb": window.process_peak(), "train_peak_rss_mb": window.peak,
        "cpu_s_per_step": window.cpu_s / spec["steps"],
        # the model right after the last step (the pipeline may then roll back; this is before it)
        "before": evals[0].to_dict(), "after": evals[-1].to_dict(),
        "rewards": [r.get("reward_mean") for r in steps], "threads": torch.get_num_threads(),
        "objective": spec["tao_objective"],
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer at the same settings, measured with a step callback."""
    import torch

    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tao_core.models import load_model
    from tao_core.pipeline import step_prompts

    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    lm = load_model(spec["model"])
    task = make_task(spec)
    load_s = time.perf_counter() - t0
    before = heldout(task, lm, spec)

    pool = task.train_prompts()
    per_step = [step_prompts(pool, spec["seed"], s, spec["prompts"]) for s in range(spec["steps"])]
    prompts = [p for step in per_step for p in step]
    dataset = Dataset.from_list([{"prompt": p.as_messages(), "prompt_id": p.id} for p in prompts])
    completions_per_step = spec["prompts"] * spec["group"]
    if completions_per_step % spec["trl_batch"]:
        raise ValueError(f"--trl-batch {spec['trl_batch']} must divide the {completions_per_step} completions "
                         "of a step (prompts x group)")

    class StepTimer(TrainerCallback):
        """Seconds from each optimizer step's start (generation included) to its end."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.threads = 0
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.threads = torch.get_num_threads()

    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-out"),
        learning_rate=spec["lr"], lr_scheduler_type="constant",  # tao keeps the learning rate constant
        per_device_train_batch_size=spec["trl_batch"],
        gradient_accumulation_steps=completions_per_step // spec["trl_batch"],
        num_generations=spec["group"], max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        gradient_checkpointing=spec["trl_gradient_checkpointing"],
        beta=0.0, num_iterations=1, loss_type=spec["trl_loss_type"], max_grad_norm=1.0,
        max_steps=spec["steps"], shuffle_dataset=False, seed=spec["seed"],
        use_cpu=True, bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=not spec["progress"],
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=lm.model, reward_funcs=make_reward(task, {p.id: p for p in prompts}), args=args,
        train_dataset=dataset, processing_class=lm.tokenizer, callbacks=[timer],
    )
    window = TrainWindow()
    window.open()
    trainer.train()
    window.close()
    if len(timer.times) != spec["steps"]:
        raise RuntimeError(f"TRL ran {len(timer.times)} optimizer steps, expected {spec['steps']}")
    lm.model = trainer.accelerator.unwrap_model(trainer.model)
    lm.model.eval()
    after = heldout(task, lm, spec)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "side": "trl", **step_stats(timer.times), "load_s": load_s,
        "peak_rss_mb": window.process_peak(), "train_peak_rss_mb": window.peak,
        "cpu_s_per_step": window.cpu_s / spec["steps"],
        "before": before, "after": after, "rewards": rewards, "threads": timer.threads,
        "objective": f"GRPOTrainer loss_type={spec['trl_loss_type']} batch={spec['trl_batch']}"
                     f"x{completions_per_step // spec['trl_batch']} "
                     f"gradient_checkpointing={spec['trl_gradient_checkpointing']}", "trl_version": trl.__version__,
    }


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("tao", "trl"):
        raise SystemExit("usage: _compare_sides.py {tao,trl} SPEC_JSON  (run by bench/trl_compare.py)")
    spec = json.loads(argv[1])
    result = run_tao(spec) if argv[0] == "tao" else run_trl(spec)
    import importlib.metadata as md

    import torch

    result["torch"] = torch.__version__
    result["transformers"] = md.version("transformers")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
