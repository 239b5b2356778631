"""Off-policy candidates, reward shaping and truncated completions in the training step.

Three options of the ``[train]`` section, each off by default (the step is then exactly what it
was without them):

* ``off_policy = "importance"``: a candidate sampled by another policy (the ``diverse`` generator's
  structured templates, a frozen or EMA teacher) trains the policy on the task's own prompt
  (``metadata["policy_prompt_token_ids"]``) with truncated importance sampling, TIS (Yao et al.
  2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
  ``vllm_importance_sampling_correction``; the truncated IS weights of Espeholt et al. 2018, IMPALA,
  https://arxiv.org/abs/1802.01561). Its PPO old log-probs are the current policy's own, detached,
  on the plain prompt (so the first update's ratio is 1) and its per-token loss is weighted by::

      w_t = min(pi_old(y_t | x_plain, y_<t) / mu(y_t | x_struct, y_<t), C)          is_level = "token"
      w_t = min(exp(sum_s [log pi_old(y_s | x_plain, y_<s) - log mu(y_s | x_struct, y_<s)]), C)
                                                                                   is_level = "sequence"

  with ``mu`` the sampler's log-probs (``Candidate.logprobs``), ``pi_old`` the policy at the start
  of the step and ``C = is_cap``. The weight multiplies the token's advantage, which equals
  weighting the clipped surrogate: for ``w >= 0``,
  ``w min(r A, clip(r) A) = min(r (wA), clip(r) (wA))``, and the clip decision does not depend on
  ``A``. The KL penalty to the reference is not weighted (TRL weights the whole per-token loss). On
  an off-policy token the sampled k1/k2/k3 term is then evaluated at a token drawn from ``mu``, not
  from the policy, so it is a penalty on those tokens rather than an estimate of KL(pi || ref); with
  ``kl_estimator = "exact"`` it is the exact KL at every trained position either way. An objective
  whose loss ignores the advantages (``online_dpo``, ``best_of_n_sft``) trains such candidates on
  the plain prompt unweighted.
* ``overlong_buffer = L_cache > 0``: DAPO's soft overlong penalty (Yu et al. 2025,
  https://arxiv.org/abs/2503.14476, eq. 13) added to each scored candidate's reward before the
  advantages (:func:`length_penalty`).
* ``mask_truncated = true``: DAPO's overlong filtering. Completions cut at ``max_new_tokens``
  (``finish_reason == "length"``) get no loss, but their rewards still count in their group's
  advantage statistics, as in DAPO, which masks their loss only: dropping them from the baseline
  would also shift every other candidate's advantage (:func:`drop_truncated`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from tao_core.batching import TrainBatch
from tao_core.errors import TaoInputError
from tao_core.types import Candidate

# exp(700) ~ 1e304 is finite in float64: a sequence's summed log-ratio is clamped there for the metrics
_MAX_LOG_RATIO = 700.0


def trained_prompt(c: Candidate, mode: str) -> list[int] | None:
    """The prompt tokens candidate ``c`` trains under, or None when it is left out.

    On-policy: the prompt it was sampled from. Off-policy (``metadata["off_policy"]``): None under
    ``mode = "drop"``; under ``"importance"`` the task's own prompt, ``policy_prompt_token_ids``
    (None when the generator did not record it).
    """
    if not c.metadata.get("off_policy"):
        return c.prompt_token_ids
    if mode != "importance":
        return None
    ids = c.metadata.get("policy_prompt_token_ids")
    if not ids:
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise TaoInputError(f"candidate {c.prompt_id}/{c.index} (generator {c.generator!r}): "
                            "metadata['policy_prompt_token_ids'] must be a list of token ids (integers >= 0), "
                            f"got {str(ids)[:80]}; the generator that marked it off_policy must record them")
    return ids


def length_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment R_len(y) (Yu et al. 2025, https://arxiv.org/abs/2503.14476,
    eq. 13), scaled by ``penalty``, with ``L_max = max_new_tokens`` and ``L_cache = buffer``::

        R_len(y) = 0                                            |y| <= L_max - L_cache
                 = ((L_max - L_cache) - |y|) / L_cache * penalty    L_max - L_cache < |y| <= L_max
                 = -penalty                                     L_max < |y|
    """
    free = max_new_tokens - buffer
    if length <= free:
        return 0.0
    if length <= max_new_tokens:
        return (free - length) / buffer * penalty
    return -penalty


def check_overlong(buffer: int, max_new_tokens: int | None) -> int:
    """``max_new_tokens`` (L_max) after checking it suits ``train.overlong_buffer``."""
    if max_new_tokens is None:
        raise TaoInputError(f"train.overlong_buffer = {buffer} needs the step's max_new_tokens: call "
                            "Trainer.step(..., max_new_tokens=<the sampling max_new_tokens>), or set "
                            "train.overlong_buffer = 0")
    if not 0 < buffer <= max_new_tokens:
        raise TaoInputError(f"train.overlong_buffer = {buffer} must lie in [1, max_new_tokens = {max_new_tokens}]: "
                            "the penalty ramps over the last overlong_buffer tokens before max_new_tokens")
    return max_new_tokens


def overlong_penalties(groups: Sequence[Sequence[Candidate]], mask: torch.Tensor, max_new_tokens: int | None,
                       buffer: int, penalty: float) -> tuple[torch.Tensor, dict[str, float]]:
    """[G, n] :func:`length_penalty` of every candidate in ``mask`` (0 elsewhere), and the metrics
    ``overlong_penalized`` (how many got a penalty) and ``overlong_penalty_mean`` (their mean
    penalty, a value <= 0; 0 when none)."""
    limit = check_overlong(buffer, max_new_tokens)
    out = torch.zeros(mask.shape)
    for g, i in mask.nonzero().tolist():
        out[g, i] = length_penalty(len(groups[g][i].token_ids), limit, buffer, penalty)
    hit = out[mask] != 0
    mean = float(out[mask][hit].mean()) if hit.any() else 0.0
    return out, {"overlong_penalized": float(hit.sum()), "overlong_penalty_mean": mean}


def drop_truncated(groups: Sequence[Sequence[Candidate]], selection: list[list[tuple[int, float]]],
                   unit: int = 1) -> tuple[list[list[tuple[int, float]]], int]:
    """The selection without candidates cut at ``max_new_tokens`` (``finish_reason == "length"``),
    and how many were removed. With ``unit > 1`` (a DPO pair) a group losing one candidate loses its
    whole selection, since a pair needs both sides; only the truncated ones are counted."""
    out, masked = [], 0
    for g, picks in enumerate(selection):
        cut = sum(groups[g][i].finish_reason == "length" for i, _ in picks)
        masked += cut
        if unit > 1 and cut:
            out.append([])
        else:
            out.append([(i, a) for i, a in picks if groups[g][i].finish_reason != "length"])
    return out, masked


def importance_weights(current: torch.Tensor, behaviour: torch.Tensor, off_policy: torch.Tensor,
                       cu_seqlens: torch.Tensor, level: str, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of off-policy tokens (see the module docstring).

    ``current`` [N]: log pi_old, the policy's detached log-probs on the plain prompt; ``behaviour``
    [N]: log mu, the sampler's; ``off_policy`` [N] bool; ``cu_seqlens`` [S+1] sequence offsets.
    Returns ``(weights, ratios)``, both [N]: ``ratios`` the untruncated pi_old / mu (per token, or
    the sequence's ratio on each of its tokens; float64, summed log-ratios clamped at 700 so it stays
    finite) and ``weights = min(ratios, cap)`` in float32; both 1 at on-policy tokens.
    """
    log_ratio = torch.where(off_policy, current.double() - behaviour.double(), 0.0)
    if level == "sequence":
        seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), cu_seqlens.diff())
        sums = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.float64, device=log_ratio.device)
        seq = seq.to(log_ratio.device)
        log_ratio = torch.where(off_policy, sums.index_add(0, seq, log_ratio)[seq], 0.0)
    elif level != "token":
        raise TaoInputError(f"train.is_level must be 'token' or 'sequence', got {level!r}")
    ratios = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    return ratios.clamp(max=cap).float(), ratios


@dataclasses.dataclass
class ImportanceTally:
    """The step's importance-sampling statistics, summed over its micro-batches."""

    off_tokens: int = 0  # off-policy tokens trained
    ratio_sum: float = 0.0  # sum of their untruncated ratios
    ratio_max: float = -math.inf  # the largest
    clipped: int = 0  # how many exceeded the cap
    on_tokens: int = 0  # on-policy tokens trained
    kl_sum: float = 0.0  # sum over them of (sampled log-prob - trainer log-prob)

    @classmethod
    def merged(cls, tallies: list[ImportanceTally]) -> ImportanceTally:
        """One tally of several ranks' (one rank's: itself)."""
        if len(tallies) == 1:
            return tallies[0]
        return cls(sum(t.off_tokens for t in tallies), sum(t.ratio_sum for t in tallies),
                   max(t.ratio_max for t in tallies), sum(t.clipped for t in tallies),
                   sum(t.on_tokens for t in tallies), sum(t.kl_sum for t in tallies))

    def metrics(self, importance: bool) -> dict[str, float]:
        """``sampler_trainer_kl``: mean over on-policy tokens of ``log mu - log pi``, the k1 estimate
        of KL(mu || pi), the sampler/trainer mismatch (nan with no on-policy token); with
        ``importance`` also ``is_ratio_mean``, ``is_ratio_max`` (over off-policy tokens, nan with
        none) and ``is_clipped_fraction`` (share of them whose ratio exceeded the cap, 0 with none)."""
        out = {"sampler_trainer_kl": self.kl_sum / self.on_tokens if self.on_tokens else math.nan}
        if importance:
            n = self.off_tokens
            out.update(is_ratio_mean=self.ratio_sum / n if n else math.nan, is_ratio_max=self.ratio_max if n else math.nan,
                       is_clipped_fraction=self.clipped / n if n else 0.0)
        return out


def start_of_step(batch: TrainBatch, current: torch.Tensor, tally: ImportanceTally, *, importance: bool,
                  current_old: bool, level: str = "token", cap: float = 2.0) -> TrainBatch:
    """The micro-batch with the policy's log-probs at the start of the step, ``current`` [N], applied.

    Tallies the sampler/trainer mismatch on on-policy tokens. ``current_old``
    (``old_logprobs = "current"``) makes ``current`` every token's PPO old log-prob. With
    ``importance`` the off-policy tokens take ``current`` as old log-probs and their advantages are
    multiplied by :func:`importance_weights`; on-policy tokens keep theirs exactly.
    """
    behaviour = batch.old_logprobs
    off = batch.off_policy.to(current.device) if batch.off_policy is not None else torch.zeros_like(current, dtype=torch.bool)
    on = ~off
    tally.on_tokens += int(on.sum())
    tally.kl_sum += float((behaviour - current)[on].double().sum())
    old = current if current_old else behaviour
    if not (importance and off.any()):
        return dataclasses.replace(batch, old_logprobs=old)
    weights, ratios = importance_weights(current, behaviour, off, batch.cu_seqlens, level, cap)
    r = ratios[off]
    tally.off_tokens += int(r.numel())
    tally.ratio_sum += float(r.sum())
    tally.ratio_max = max(tally.ratio_max, float(r.max()))
    tally.clipped += int((r > cap).sum())
    return dataclasses.replace(batch, old_logprobs=torch.where(off, current, old),
                               advantages=batch.advantages * weights.to(batch.advantages.device))
