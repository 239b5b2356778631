"""Collapse monitors: label-free rewards can be gamed, so every run watches for the signs.

Each monitor compares the current step (or evaluation) with the run's own history and returns a
warning dict ``{"kind", "message", ...}``; the pipeline logs it to the metrics, shows it in the
report, and stops the run when ``guard.stop_on_collapse`` is set.
"""

from __future__ import annotations

from typing import Any

from tao_core.config import GuardConfig


class Guard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.first_length: float | None = None  # mean completion length of the first step
        self.rewards: list[float] = []  # mean ok reward per step
        self.warned: list[dict[str, Any]] = []

    def _warn(self, kind: str, message: str, **extra: Any) -> dict[str, Any]:
        w = {"kind": kind, "message": message, **extra}
        self.warned.append(w)
        return w

    def observe_step(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        length = record.get("completion_len_mean")
        if length is not None:
            if self.first_length is None:
                self.first_length = length
            elif length < self.cfg.min_length_ratio * self.first_length:
                out.append(self._warn(
                    "length_collapse",
                    f"step {record['step']}: mean completion length {length:.1f} tokens fell below "
                    f"{self.cfg.min_length_ratio:g} x the first step's {self.first_length:.1f}",
                    value=length))
        entropy = record.get("entropy")
        if self.cfg.min_entropy is not None and entropy is not None and entropy < self.cfg.min_entropy:
            out.append(self._warn("entropy_collapse",
                                  f"step {record['step']}: token entropy {entropy:.3f} < guard.min_entropy "
                                  f"{self.cfg.min_entropy:g}", value=entropy))
        kl = record.get("kl")
        if self.cfg.max_kl is not None and kl is not None and kl > self.cfg.max_kl:
            out.append(self._warn("kl_drift", f"step {record['step']}: KL to the reference {kl:.4f} > "
                                  f"guard.max_kl {self.cfg.max_kl:g}", value=kl))
        flips = record.get("flip_rate")
        if self.cfg.max_flip_rate is not None and flips is not None and flips > self.cfg.max_flip_rate:
            out.append(self._warn("voter_flips", f"step {record['step']}: {flips:.0%} of the revisited prompts changed "
                                  f"their voter majority > guard.max_flip_rate {self.cfg.max_flip_rate:g}",
                                  value=flips))
        if record.get("reward_mean") is not None:
            self.rewards.append(float(record["reward_mean"]))
        return out

    def observe_eval(self, rec: dict[str, Any], best: dict[str, Any]) -> list[dict[str, Any]]:
        """Reward hacking: the training reward rose while the held-out metric fell."""
        if len(self.rewards) < 2:
            return []
        k = max(1, len(self.rewards) // 4)
        early = sum(self.rewards[:k]) / k
        late = sum(self.rewards[-k:]) / k
        drop = best["value"] - rec["value"]
        if late > early and drop > self.cfg.hacking_drop:
            return [self._warn(
                "reward_hacking",
                f"step {rec['step']}: training reward rose {early:.3f} -> {late:.3f} while held-out "
                f"{rec['metric']} fell {best['value']:.3f} -> {rec['value']:.3f}",
                reward_early=early, reward_late=late, eval_best=best["value"], eval_now=rec["value"])]
        return []

    def messages(self) -> list[str]:
        return [w["message"] for w in self.warned]

    def state_dict(self) -> dict[str, Any]:
        return {"first_length": self.first_length, "rewards": self.rewards, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_length = state["first_length"]
        self.rewards = list(state["rewards"])
        self.warned = list(state["warned"])
