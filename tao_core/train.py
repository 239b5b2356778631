"""The training step: scored candidate groups in, one optimizer update of the policy out.

``Trainer.step`` turns each group's scores into advantages (masked: abstained and errored scores
never count), lets the objective pick the candidates it trains on, packs them into micro-batches
under a token budget (``tao_core.batching``: each prompt computed once per group, no padding, the
head applied to completion tokens only through ``tao_kernels``), accumulates gradients weighted so
that the sum equals one big batch, clips and takes one AdamW step. Off-policy candidates are dropped
or importance-weighted, rewards may carry DAPO's overlong penalty and truncated completions may be
masked (``train.off_policy``, ``overlong_buffer``, ``mask_truncated``: :mod:`tao_core.offpolicy`). Full fine-tuning or LoRA (peft);
the reference model exists only when the objective needs it (KL weight above zero, online DPO): the
base with adapters disabled under LoRA, a frozen copy otherwise.

``Trainer.optimize(parts, loss_fn, units)`` is the same update for a loss of the caller's own (the
reward model's Bradley-Terry loss, SFT's next-token loss): the optimizer, the learning-rate schedule,
the weighted gradient accumulation over micro-batches, clipping, the precision context
(:meth:`Trainer.forward_context`) and the checkpoint state are the ones ``step`` uses. Build such a
trainer with ``custom_loss=True``: it resolves no objective, advantage estimator or reference.

``state_dict`` / ``load_state_dict`` hold the trainable weights, the optimizer, the step count and
every RNG state, so a resumed run continues bit for bit on the CPU.

Under several ranks each micro-batch's loss is computed inside the forward of the wrapper the
strategy names (:mod:`tao_core.distributed`): ``"ddp"`` wraps the policy in DistributedDataParallel
(:class:`~tao_core.distributed.Replicas`); ``"fsdp"`` shards the policy (and reference) with FSDP2
(:mod:`tao_core.dist_fsdp`), and then :meth:`full_weights` gathers the weights for a sampling phase,
:meth:`full_trainable` and :meth:`full_state_dict` gather them for files, and checkpoints go through
:mod:`tao_core.dist_checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tao_core.batching import final_hidden, pack, plan_micro_batches
from tao_core.config import TrainConfig
from tao_core.distributed import Dist, Replicas, even_micro_batches, hang_point, scalar
from tao_core.errors import PluginError, TaoInputError
from tao_core.models import LoadedModel
from tao_core.objectives import LossConfig, LossOutput, Objective
from tao_core.offpolicy import (
    ImportanceTally,
    start_of_step,
)
from tao_core.onednn import onednn_linears
from tao_core.train_segments import SegmentBuilder
from tao_core.types import Candidate, Prompt, Score

P = TypeVar("P")


def scheduled_lr(base: float, step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warm-up over ``warmup_steps``,
    then ``lr_schedule``. A decaying schedule reaches 0 after ``total_steps`` and stays there.

    A pure function of the step count, so a resumed run needs no scheduler state of its own.
    """
    if step <= cfg.warmup_steps:
        return base * step / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return base
    if cfg.total_steps is None:
        raise TaoInputError(f"lr_schedule {cfg.lr_schedule!r} needs total_steps (the pipeline sets it to rounds x "
                            "steps_per_round)")
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return base * (1.0 - frac)
    return base * 0.5 * (1.0 + math.cos(math.pi * frac))


_LOSS_FALLBACKS = {
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    "clip_low": 0.2,
    "clip_high": 0.2,
    "ratio_level": "token",
    "loss_agg": "token_mean",
}


def resolve_loss_config(cfg: TrainConfig, objective: Objective, max_len: int | None = None) -> LossConfig:
    """Fill each loss setting: the user's value, else the objective's default, else the fallback."""
    values: dict[str, Any] = {}
    for name, fallback in _LOSS_FALLBACKS.items():
        user = getattr(cfg, name)
        values[name] = user if user is not None else objective.defaults.get(name, fallback)
    return LossConfig(**values, max_len=cfg.max_len or max_len, beta=cfg.beta)


def _compute(model: torch.nn.Module, device: torch.device, precision: str):
    """The context a forward runs in: bf16 autocast, or float32 with oneDNN linears on a CPU
    (see :mod:`tao_core.onednn`; about 2x MKL's float32 matmuls on AMD CPUs)."""
    if precision == "auto":
        bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_gpu else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cpu":
        return onednn_linears(model)
    return nullcontext()


def rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer(SegmentBuilder):
    """Owns the optimizer and (when needed) the reference; ``step`` is one update of ``lm.model``.

    With ``cfg.lora`` the model is wrapped by peft in place: ``lm.model`` becomes the ``PeftModel``,
    so a generator holding ``lm`` samples from the current policy. With ``custom_loss=True`` the
    trainer has no objective (``objective`` is None) and trains only through :meth:`optimize`.
    """

    def __init__(self, lm: LoadedModel, cfg: TrainConfig | None = None, *, objective: Objective | None = None,
                 custom_loss: bool = False, dist: Dist | None = None, strategy: str = "ddp") -> None:
        self.lm = lm
        self.dist = dist or Dist()  # the ranks whose gradients each update sums (one process by default)
        self.cfg = cfg = cfg or TrainConfig()
        cfg.validate()
        self.objective: Objective | None = None
        self.needs_reference = False
        if custom_loss and objective is not None:
            raise TaoInputError(f"Trainer: custom_loss=True trains a loss of the caller's own, so objective "
                                f"{objective.name!r} would never be used; pass one or the other")
        if not custom_loss:
            self._set_objective(objective)
        self.reference = None
        if cfg.lora:
            self._wrap_lora()
        elif self.needs_reference:
            self.reference = copy.deepcopy(lm.model).eval().requires_grad_(False)
        self.sharding = self.replicas = None  # FSDP2 shards or DDP (distributed.strategy) under several ranks
        if self.dist.world_size > 1:
            self._distribute(strategy)
        self.params = [p for p in lm.model.parameters() if p.requires_grad]
        lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora else 5e-6)
        self.base_lr = lr
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.step_count = 0

    def _distribute(self, strategy: str) -> None:
        """Wrap the policy as ``distributed.strategy`` says: DDP (``"ddp"``) or FSDP2 shards (``"fsdp"``)."""
        if strategy == "ddp":
            self.replicas = Replicas(self.dist, self.lm)
        elif strategy == "fsdp":
            from tao_core.dist_fsdp import Sharding

            if self.cfg.lora:
                raise TaoInputError("distributed.strategy = 'fsdp' does not shard LoRA adapters; use 'ddp'")
            self.sharding = self.dist.named("shard the model (fsdp)", lambda: Sharding(
                self.dist, self.lm.model, self.reference, self.cfg.precision))
        else:
            raise TaoInputError(f"distributed.strategy must be 'ddp' or 'fsdp', got {strategy!r}")

    def _set_objective(self, objective: Objective | None) -> None:
        from tao_core.plugins import get_component

        if objective is None and self.cfg.objective is None:
            raise TaoInputError("train.objective is not set: name a registered objective (tao plugins lists them), "
                                "or pass objective= (a run takes its task's default_objective)")
        self.objective = objective or get_component("objectives", self.cfg.objective)
        self.advantage_name = self.cfg.advantage or self.objective.advantage
        self.advantage_fn = get_component("advantages", self.advantage_name)
        kl_coef = resolve_loss_config(self.cfg, self.objective).kl_coef
        self.needs_reference = self.objective.needs_reference or kl_coef > 0

    def _wrap_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        lcfg = LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=c.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.lm.model = get_peft_model(self.lm.model, lcfg)

    # -- the step ---------------------------------------------------------------------------------

    def step(
        self, prompts: Sequence[Prompt], groups: Sequence[Sequence[Candidate]], scores: Sequence[Sequence[Score]],
        *, max_new_tokens: int | None = None, policy_temperature: float | None = None, local: range | None = None,
    ) -> dict[str, float]:
        """One optimizer update over the whole batch (``ppo_epochs`` updates when above 1).

        ``groups[i]`` are the candidates sampled for ``prompts[i]`` and ``scores[i]`` their scores;
        ``max_new_tokens`` is the sampling cap they were drawn under (needed by
        ``train.overlong_buffer``); ``policy_temperature`` the temperature the policy samples its own
        prompt at (off-policy candidates under ``train.off_policy = "importance"`` train at it; None:
        each candidate's own). Returns float metrics: loss, reward and advantage statistics,
        kl / entropy / clip_fraction when the objective reports them, grad_norm, tokens, skipped
        groups, seconds, tokens_per_s; with the options of :mod:`tao_core.offpolicy` also their
        metrics (``is_ratio_*``, ``sampler_trainer_kl``, ``off_policy_trained``,
        ``overlong_penalized``, ``truncated_masked``, ...).

        Under several ranks every rank passes the whole step's groups and ``local``, the indices of
        the groups it serves: the advantages and metrics are the whole batch's, the rank trains on its
        own groups' micro-batches (as many as its peers) weighted by the global loss units, and DDP or
        FSDP sums the gradients over ranks, so the update equals the one-process one
        (:mod:`tao_core.distributed`).
        """
        start = time.perf_counter()
        if self.objective is None:
            raise TaoInputError("Trainer.step needs an objective, but this trainer was built with custom_loss=True; "
                                "train it with optimize(parts, loss_fn, units), or build it without custom_loss")
        if not len(prompts) == len(groups) == len(scores):
            raise TaoInputError(f"step got {len(prompts)} prompts, {len(groups)} groups, {len(scores)} score lists")
        segments, metrics = self._segments(groups, scores, max_new_tokens, policy_temperature)
        longest = max((len(c) for s in segments for c in s.completions), default=1)
        lcfg = resolve_loss_config(self.cfg, self.objective, longest)
        pad = self.lm.tokenizer.pad_token_id or 0
        mine = segments if local is None else [s for s in segments if s.group in local]
        plan = plan_micro_batches(mine, self.cfg.micro_batch_tokens, self.objective.unit)
        packed = [pack(mb, self.cfg.layout, pad) for mb in plan]
        units = [self.objective.batch_units(b, lcfg) for _, b in packed]
        total, tokens, row_tokens, micro_batches = self.dist.sum("step sizes", [
            sum(units), sum(b.n_tokens for _, b in packed), sum(i.input_ids.numel() for i, _ in packed), len(packed)])
        metrics.update(step=float(self.step_count + 1), tokens=tokens, row_tokens=row_tokens,
                       micro_batches=micro_batches, lr=self._advance())
        tally, mine_n = ImportanceTally(), len(packed)
        if total == 0:  # nothing to learn from: no update, the step still counts
            metrics.update(loss=0.0, grad_norm=0.0, updated=0.0)
        else:
            if self.dist.world_size > 1:  # every rank runs as many micro-batches (their collectives pair)
                spare = plan_micro_batches([s for s in segments if s.completions][:1], self.cfg.micro_batch_tokens,
                                           self.objective.unit)[:1]
                packed, units = even_micro_batches(self.dist, packed, units, lambda: pack(spare[0], self.cfg.layout, pad))
            with self._training():
                for epoch in range(self.cfg.ppo_epochs):
                    def loss_fn(i: int, epoch: int = epoch) -> LossOutput:  # a spare micro-batch tallies nothing
                        own = tally if i < mine_n else ImportanceTally()
                        return self._objective_loss(packed, lcfg, own if epoch == 0 else None, i)

                    metrics.update(self._update(range(len(packed)), units, total, loss_fn,
                                                f"objective {self.objective.name!r}"))
            metrics["updated"] = 1.0
        if self._uses_current:
            tally = ImportanceTally.merged(self.dist.gather("importance tally", [tally]))
            metrics.update(tally.metrics(importance=self.cfg.off_policy == "importance"))
        metrics["seconds"] = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["tokens"] * self.cfg.ppo_epochs / metrics["seconds"]
        return metrics

    def optimize(self, parts: Sequence[P], loss_fn: Callable[[P], LossOutput], units: Sequence[float] | None = None,
                 *, name: str = "the loss") -> dict[str, float]:
        """One optimizer update of a loss of the caller's own, the path every training loop shares.

        ``loss_fn(part)`` returns the :class:`~tao_core.objectives.LossOutput` of one micro-batch
        ``part``, a mean over its ``units[i]`` (pairs, tokens, ...; 1 each when ``units`` is None);
        run its forward under :meth:`forward_context`. The gradients are accumulated weighted by
        ``units[i] / sum(units)``, so the update equals one over the whole batch; then the step is
        counted, the learning rate scheduled, the gradient clipped and AdamW steps, as in :meth:`step`.
        ``name`` names the loss in the error a non-finite loss raises.

        Returns ``step``, ``lr``, ``loss`` (the units-weighted mean), ``grad_norm`` and the
        units-weighted mean of every metric the loss reports.
        """
        if self.dist.world_size > 1:
            raise TaoInputError(f"optimize ({name}) runs in one process (its units are not summed over ranks); "
                                "start it without torchrun")
        weights = [1.0] * len(parts) if units is None else [float(u) for u in units]
        if len(weights) != len(parts):
            raise TaoInputError(f"optimize got {len(parts)} micro-batches but {len(weights)} units")
        total = sum(weights)
        if not parts or not total > 0:
            raise TaoInputError(f"optimize needs at least one micro-batch and units summing above 0, got "
                                f"{len(parts)} micro-batches with units summing to {total}")
        metrics = {"step": float(self.step_count + 1), "lr": self._advance()}
        with self._training():
            metrics.update(self._update(parts, weights, total, loss_fn, name))
        return metrics

    def forward_context(self) -> AbstractContextManager:
        """The context a forward of ``lm.model`` runs in under ``cfg.precision`` (for an :meth:`optimize` loss)."""
        return _compute(self.lm.model, self.lm.device, self.cfg.precision)

    def _advance(self) -> float:
        """Count one step and set its learning rate (:func:`scheduled_lr`); returns that rate."""
        self.step_count += 1
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(self.base_lr, self.step_count, self.cfg)
        return float(self.optimizer.param_groups[0]["lr"])

    @contextmanager
    def _training(self) -> Iterator[None]:
        self.lm.model.train()
        try:
            yield
        finally:
            self.lm.model.eval()

    def _update(self, parts: Iterable[P], units: Sequence[float], total: float, loss_fn: Callable[[P], LossOutput],
                name: str) -> dict[str, float]:
        """One AdamW step on ``sum_i loss_fn(parts[i]) * units[i] / total``, clipped. Under several
        ranks DDP sums the gradients in the last micro-batch's backward, FSDP in each one's; a
        collective's failure in them names the ranks to blame (:meth:`Dist.watch`)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        wrapper = self.replicas or self.sharding  # None in one process
        with self.dist.watch(f"the training step's {wrapper.collectives if wrapper else 'update'}"):
            for i, (part, u) in enumerate(zip(parts, units, strict=True)):
                with self.replicas.accumulating(i < len(units) - 1) if self.replicas else nullcontext():
                    out = loss_fn(part)
                    if not torch.isfinite(out.loss):
                        raise PluginError(f"{name} returned a non-finite loss ({float(out.loss.detach())})")
                    hang_point("train.backward")
                    (out.loss * (u / total)).backward()
                loss_sum += float(out.loss.detach()) * u / total
                w = u if out.metric_units is None or not u else float(out.metric_units)  # a spare (u = 0) counts 0
                for k, v in out.metrics.items():
                    sums[k], weights[k] = sums.get(k, 0.0) + v * w, weights.get(k, 0.0) + w
            loss_sum, sums = self._summed(loss_sum, sums, weights)
            clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()
            return {"loss": loss_sum, "grad_norm": scalar(grad_norm), **sums}

    def _summed(self, loss_sum: float, sums: dict[str, float], weights: dict[str, float]) -> tuple[float, dict]:
        """The loss summed over ranks (each rank's is its micro-batches' share of the global mean) and
        each metric's mean over every rank's micro-batches, weighted by their metric units."""
        if self.dist.world_size > 1:
            names = sorted({k for part in self.dist.gather("metric names", [sorted(sums)]) for k in part})
            total = self.dist.sum("loss", [loss_sum, *(sums.get(k, 0.0) for k in names),
                                           *(weights.get(k, 0.0) for k in names)])
            loss_sum, n = total[0], len(names)
            sums, weights = dict(zip(names, total[1:n + 1], strict=True)), dict(zip(names, total[n + 1:], strict=True))
        return loss_sum, {k: v / weights[k] if weights[k] else 0.0 for k, v in sums.items()}

    @property
    def _uses_current(self) -> bool:
        """Whether the first epoch takes the policy's own log-probs (old_logprobs "current", or
        importance-sampled off-policy candidates)."""
        return self.cfg.old_logprobs == "current" or self.cfg.off_policy == "importance"

    def _objective_loss(self, packed: list, lcfg: LossConfig, tally: ImportanceTally | None, i: int) -> LossOutput:
        """:meth:`_micro_batch_loss`, inside the forward of the DDP or FSDP root under several ranks."""
        root = self.sharding.root if self.sharding else self.replicas.root if self.replicas else None
        if root is None:
            return self._micro_batch_loss(packed, lcfg, tally, i)

        def inside() -> tuple[torch.Tensor, LossOutput]:
            out = self._micro_batch_loss(packed, lcfg, tally, i)
            return out.loss, out  # the loss at the top of the output, where DDP and FSDP look for it

        return root(inside)[1]

    def _micro_batch_loss(self, packed: list, lcfg: LossConfig, tally: ImportanceTally | None, i: int) -> LossOutput:
        """The objective's loss on micro-batch ``packed[i]``. In the first epoch (``tally`` given) and
        when :attr:`_uses_current`, the policy's own log-probs from this forward set the PPO old
        log-probs and the importance weights (:func:`tao_core.offpolicy.start_of_step`), stored in
        ``packed[i]`` for the later epochs."""
        model = self.lm.model
        weight = model.get_output_embeddings().weight
        device = weight.device
        inputs, batch = packed[i]
        batch = self._with_reference(inputs, batch, lcfg, device)
        moved = ("targets", "old_logprobs", "advantages", "cu_seqlens", "off_policy")
        batch = dataclasses.replace(batch, **{k: getattr(batch, k).to(device) for k in moved
                                              if getattr(batch, k) is not None})
        with _compute(model, device, self.cfg.precision):
            hidden = final_hidden(model.get_decoder(), inputs)
        if tally is not None and self._uses_current:
            import tao_kernels

            # one head pass over the micro-batch's completion tokens, on the hidden states this forward
            # already computed (no second decoder forward): about a third of the loss's own head cost
            with torch.no_grad():
                current = tao_kernels.linear_logprob(
                    hidden.detach().to(weight.dtype), weight, batch.targets, temperature=batch.temperature
                ).float()
            c = self.cfg
            batch = start_of_step(batch, current, tally, importance=c.off_policy == "importance",
                                  current_old=c.old_logprobs == "current", level=c.is_level, cap=c.is_cap)
            packed[i] = (inputs, dataclasses.replace(packed[i][1], old_logprobs=batch.old_logprobs.cpu(),
                                                     advantages=batch.advantages.cpu()))
        return self.objective.loss(batch, hidden.to(weight.dtype), weight, lcfg)

    @torch.no_grad()
    def _with_reference(self, inputs, batch, lcfg: LossConfig, device: torch.device):
        """The batch with the reference's log-probs (or hidden states, for exact KL) when needed."""
        if not (self.objective.needs_reference or lcfg.kl_coef > 0):
            return batch
        if self.sharding is not None and self.sharding.ref_root is not None:  # the root stays gathered after it
            return self.sharding.ref_root(lambda: self._reference_batch(inputs, batch, lcfg, device))
        return self._reference_batch(inputs, batch, lcfg, device)

    def _reference_batch(self, inputs, batch, lcfg: LossConfig, device: torch.device):
        import tao_kernels

        model = self.reference if self.reference is not None else self.lm.model
        ctx = self.lm.model.disable_adapter() if self.reference is None else nullcontext()
        with ctx, _compute(model, device, self.cfg.precision):
            ref_hidden = final_hidden(model.get_decoder(), inputs)
        ref_weight = model.get_output_embeddings().weight
        ref_hidden = ref_hidden.to(ref_weight.dtype)
        if lcfg.kl_estimator == "exact" and lcfg.kl_coef > 0:
            return dataclasses.replace(batch, ref_hidden=ref_hidden, ref_weight=ref_weight)
        temperature = self.objective.logprob_temperature or batch.temperature
        ref_lp = tao_kernels.linear_logprob(ref_hidden, ref_weight, batch.targets.to(device), temperature=temperature)
        return dataclasses.replace(batch, ref_logprobs=ref_lp.float())

    # -- state ------------------------------------------------------------------------------------

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.lm.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the config: trainable weights, optimizer, step, RNGs."""
        return {
            "step": self.step_count,
            "trainable": {n: p.detach().cpu().clone() for n, p in self._trainable().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._trainable()
        missing = sorted(set(params) - set(state["trainable"]))
        if missing:
            raise TaoInputError(f"trainer state lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; "
                                "was it saved with the same model and lora setting?")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        set_rng_state(state["rng"])

    # -- whole weights under FSDP (each method is the plain one without it) -----------------------

    def full_weights(self) -> AbstractContextManager:
        """The block in which the policy's parameters are whole (gathered once under FSDP): a sampling phase."""
        return nullcontext() if self.sharding is None else self.sharding.full_weights()

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name: the live parameters, or under FSDP whole CPU copies on rank 0
        and an empty dict elsewhere (a collective: every rank calls it)."""
        params = self._trainable()
        return params if self.sharding is None else self.sharding.full(params)

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trainable weights from whole tensors by name (each rank keeps its rows under FSDP)."""
        if self.sharding is not None:
            self.sharding.load_full(self._trainable(), tensors)
            return
        with torch.no_grad():
            for n, p in self._trainable().items():
                p.copy_(tensors[n])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the model's whole state dict on rank 0 (None elsewhere), for
        :meth:`save_pretrained`; None without FSDP. A collective: every rank calls it."""
        return None if self.sharding is None else self.sharding.full_state_dict(self.lm.model)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a Hugging Face directory (LoRA merged) with tokenizer and chat template; ``state_dict``:
        whole weights to write instead of the model's own (:meth:`full_state_dict`)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        model = self.lm.model
        if self.cfg.lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out, **({} if state_dict is None else {"state_dict": state_dict}))
        tok = self.lm.tokenizer
        tok.save_pretrained(out)
        if getattr(tok, "chat_template", None) and not (out / "chat_template.jinja").exists():
            (out / "chat_template.jinja").write_text(tok.chat_template)
        return out
