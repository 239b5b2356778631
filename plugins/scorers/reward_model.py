"""``reward-model``: a scalar reward from a local Hugging Face sequence-classification checkpoint.

DBRM style (a discriminative, Bradley-Terry-trained reward model): each candidate is read as the
prompt's chat followed by the candidate as the assistant turn, formatted with the reward model's own
chat template, and the model's single logit is the score. Any ``*ForSequenceClassification``
directory with ``num_labels=1`` works, e.g. one written by ``tao rm train``.

Too long? The prompt is cut from the left (its end, nearest the response, is kept) so the whole
candidate is always read; a candidate that does not fit in ``max_length`` even with the prompt
reduced to one token abstains, since a reward for a truncated response would judge text the policy
did not write. Scores are raw logits: only differences within a group are meaningful.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tao_plugins.reward_training import check_seq_cls_dir, encode_for_reward, reward_forward

from tao_core.errors import ModelLoadError, TaoInputError
from tao_core.types import Candidate, Prompt, Score


def _checkpoint_tag(path: Path) -> str:
    """Short hash of the checkpoint's location and weight files, so the score cache tells RMs apart."""
    h = hashlib.sha1(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


class RewardModelScorer:
    """Scores every candidate with a scalar reward model, in batches of ``batch_size``."""

    name = "reward-model"
    pointwise = True  # each candidate is scored on its own (a frozen reward model: a valid flywheel gate scorer)

    def __init__(
        self,
        path: str | os.PathLike | None = None,  # the checkpoint directory (required)
        *,
        batch_size: int = 8,  # sequences per forward pass
        max_length: int = 2048,  # tokens per sequence; longer prompts lose tokens from the left
        device: str = "cpu",  # torch device for the reward model
        dtype: str = "float32",  # torch dtype name the weights are loaded in
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not isinstance(batch_size, int) or batch_size < 1:
            raise TaoInputError(f"reward-model scorer: batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 8:
            raise TaoInputError(f"reward-model scorer: max_length must be an integer >= 8, got {max_length!r}")
        if path is None:
            raise TaoInputError("reward-model scorer needs option 'path': a sequence-classification checkpoint "
                                "directory (e.g. one written by `tao rm train`)")
        self.path = check_seq_cls_dir(path)
        self.batch_size = batch_size
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(self.path), dtype=getattr(torch, dtype)
            )
        except Exception as e:
            raise ModelLoadError(
                f"reward model {self.path}: could not load the checkpoint or its tokenizer ({type(e).__name__}: {e})"
            ) from e
        pad = self.model.config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            if pad is None:
                raise ModelLoadError(f"reward model {self.path}: no pad or EOS token id to pad batches with")
            self.model.config.pad_token_id = pad
        self.pad_id = int(pad)
        self.model.to(device)
        self.model.eval()
        self.version = f"1-{_checkpoint_tag(self.path)}"

    def rewards(self, messages: list[dict[str, str]], responses: list[str]) -> list[float | None]:
        """Raw rewards for ``responses`` to one chat; ``None`` where a response does not fit."""
        import torch

        encoded = [encode_for_reward(self.tokenizer, messages, r, self.max_length) for r in responses]
        todo = [i for i, e in enumerate(encoded) if e is not None]
        out: list[float | None] = [None] * len(responses)
        # longest first, so each batch holds sequences of similar length and pads little
        todo.sort(key=lambda i: -len(encoded[i]))  # type: ignore[arg-type]
        with torch.no_grad():
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s : s + self.batch_size]
                values = reward_forward(self.model, [encoded[i] for i in idx], self.pad_id).tolist()  # type: ignore[misc]
                for i, v in zip(idx, values, strict=True):
                    out[i] = float(v)
        return out

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        values = self.rewards(prompt.as_messages(), [c.text for c in candidates])
        scores = []
        for v in values:
            if v is None:
                scores.append(Score.abstain(
                    f"prompt + candidate exceed max_length={self.max_length} tokens even with the prompt "
                    f"cut from the left", scorer=self.name, version=self.version))
            elif v != v or v in (float("inf"), float("-inf")):
                scores.append(Score.error(f"reward model returned a non-finite value {v}", scorer=self.name,
                                          version=self.version))
            else:
                scores.append(Score.ok(v, scorer=self.name, version=self.version))
        return scores


SCORERS = {"reward-model": RewardModelScorer}
