"""The run directory: every stage's artifacts, written so a kill at any moment loses at most one step.

Layout::

    RUN_DIR/
      config.json  versions.json  metrics.jsonl
      steps/step-00012/{prompts,candidates,scores}.jsonl   # one directory per optimizer step
      checkpoints/latest -> step-00010/{trainer.pt,pipeline.json}
      best/trainable.safetensors  best/pipeline.json        # the best held-out weights so far
      rounds/round-001/model/                               # a Hugging Face directory per round
      final/                                                # the promoted model at the end

Files are written to a temporary name and renamed; checkpoints are whole directories renamed into
place, and ``checkpoints/latest`` is a small file replaced atomically after the directory exists.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from tao_core.types import Candidate, Prompt, Score, read_jsonl, write_jsonl


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_dir(self, step: int) -> Path:
        return self.root / "steps" / f"step-{step:05d}"

    def round_model_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / f"round-{round_index:03d}" / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.root / "best"

    # -- metrics -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line (fsynced): steps, evaluations, rounds, warnings."""
        record = {"time": round(time.time(), 3), **record}
        write_jsonl(self.metrics_path, [record], append=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write: the step is redone and logged again
        return out

    def truncate_metrics_after(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (they are redone after a resume)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        write_jsonl(self.metrics_path, kept)

    # -- stage artifacts -----------------------------------------------------------------------
    def save_step_prompts(self, step: int, prompts: list[Prompt]) -> None:
        write_jsonl(self.step_dir(step) / "prompts.jsonl", prompts)

    def save_candidates(self, step: int, groups: list[list[Candidate]]) -> None:
        write_jsonl(self.step_dir(step) / "candidates.jsonl", [c for g in groups for c in g])

    def load_candidates(self, step: int, prompts: list[Prompt]) -> list[list[Candidate]] | None:
        path = self.step_dir(step) / "candidates.jsonl"
        if not path.exists():
            return None
        by_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
        for c in read_jsonl(path, Candidate):
            by_prompt[c.prompt_id].append(c)
        return [sorted(by_prompt[p.id], key=lambda c: c.index) for p in prompts]

    def save_scores(self, step: int, scores: list[list[Score]]) -> None:
        write_jsonl(self.step_dir(step) / "scores.jsonl", [s for g in scores for s in g])

    def load_scores(self, step: int, groups: list[list[Candidate]]) -> list[list[Score]] | None:
        path = self.step_dir(step) / "scores.jsonl"
        if not path.exists():
            return None
        flat = read_jsonl(path, Score)
        out, i = [], 0
        for g in groups:
            out.append(flat[i : i + len(g)])
            i += len(g)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, trainer_state: dict[str, Any], pipeline_state: dict[str, Any],
                        keep: int = 1) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:05d}"
        tmp = self.checkpoints / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        torch.save(trainer_state, tmp / "trainer.pt")
        atomic_write_text(tmp / "pipeline.json", json.dumps(pipeline_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(self.checkpoints / "latest", final.name)
        for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        return path if (path / "pipeline.json").exists() else None

    def save_best(self, trainable: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.best_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.best_dir / ".trainable.tmp.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp))
        os.replace(tmp, self.best_dir / "trainable.safetensors")
        atomic_write_text(self.best_dir / "pipeline.json", json.dumps(info, indent=2))

    def load_best(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.best_dir / "trainable.safetensors"))
