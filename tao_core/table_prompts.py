"""A round's prompts from the inference table: filtered, deduplicated, capped per key, a slice held out.

``[table] url = ...`` in a run config makes the prompts of logged exchanges the training pool
(:func:`tao_core.table.read_prompts`, with the filters ``since``, ``tag``, ``model``, ``requester``).
Before they train, :func:`prepare` applies, in order:

1. **Exact duplicates**: prompts whose normalized text (Unicode NFKC, case-folded, whitespace
   collapsed) is equal are one prompt; the first logged is kept.
2. **Near duplicates**: prompts whose word 3-gram shingle sets have a Jaccard similarity of at least
   ``near_duplicate`` (default 0.9; 1.0 turns it off) are one prompt. Candidate pairs come from
   MinHash signatures (64 hash functions in 16 bands of 4 rows, locality-sensitive hashing) and every
   candidate pair is checked with its exact Jaccard similarity, so no pair below the threshold is
   merged; a pair at the threshold is found with probability >= 0.99 (1 - (1 - 0.9^4)^16).
3. **Per-key share**: no requester (API key) contributes more than ``max_key_share`` of the pool
   (its earliest prompts are kept): one client flooding the server cannot steer the round.
4. **Held-out slice**: a prompt whose normalized text hashes (SHA-256) below ``holdout`` of the range
   is held out of training, the same prompts in every round, for the promotion gate to judge.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tao_core.types import Prompt

NUM_HASHES, BANDS = 64, 16  # MinHash signature length and LSH bands (rows per band = 4)
_MERSENNE = (1 << 61) - 1


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, k: int = 3) -> frozenset[str]:
    words = re.findall(r"\w+", normalize(text))
    if len(words) < k:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i:i + k]) for i in range(len(words) - k + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(s: frozenset[str]) -> list[int]:
    hashes = [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little") for x in s] or [0]
    return [min((a * h + b) % _MERSENNE for h in hashes) for a, b in _COEFFICIENTS]


_COEFFICIENTS = [(2 * i + 1 + (i << 20), 7 * i + 3) for i in range(NUM_HASHES)]


@dataclass
class Prepared:
    train: list[Prompt]
    held_out: list[Prompt]
    counts: dict[str, int] = field(default_factory=dict)  # read, exact_duplicates, near_duplicates, capped, held_out


def _near_duplicates(prompts: Sequence[Prompt], threshold: float) -> set[int]:
    """Indices of prompts that repeat an earlier one at Jaccard >= ``threshold`` (MinHash LSH + exact check)."""
    sets = [shingles(p.text) for p in prompts]
    rows = NUM_HASHES // BANDS
    buckets: dict[tuple, list[int]] = defaultdict(list)
    dropped: set[int] = set()
    for i, s in enumerate(sets):
        sig = _minhash(s)
        candidates = set()
        for band in range(BANDS):
            key = (band, tuple(sig[band * rows:(band + 1) * rows]))
            candidates.update(buckets[key])
            buckets[key].append(i)
        if any(j not in dropped and jaccard(s, sets[j]) >= threshold for j in candidates):
            dropped.add(i)
    return dropped


def prepare(prompts: Sequence[Prompt], *, near_duplicate: float = 0.9, max_key_share: float = 1.0,
            holdout: float = 0.0) -> Prepared:
    """Steps 1-4 of the module docstring over ``prompts`` (oldest first)."""
    counts = {"read": len(prompts)}
    seen, unique = set(), []
    for p in prompts:
        key = normalize(p.text)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    counts["exact_duplicates"] = len(prompts) - len(unique)
    if near_duplicate < 1.0:
        dropped = _near_duplicates(unique, near_duplicate)
        unique = [p for i, p in enumerate(unique) if i not in dropped]
        counts["near_duplicates"] = len(dropped)
    cap = max(1, math.floor(max_key_share * len(unique))) if max_key_share < 1.0 else len(unique)
    per_key: dict[str, int] = defaultdict(int)
    kept = []
    for p in unique:
        who = str(p.metadata.get("requester"))
        if per_key[who] < cap:
            per_key[who] += 1
            kept.append(p)
    counts["capped"] = len(unique) - len(kept)
    train, held = [], []
    for p in kept:
        h = int.from_bytes(hashlib.sha256(normalize(p.text).encode()).digest()[:8], "big") / 2**64
        (held if h < holdout else train).append(p)
    counts["held_out"] = len(held)
    return Prepared(train, held, counts)


def from_table(t) -> Prepared:
    """:func:`prepare` over the prompts of inference table ``t.url`` with ``t``'s filters (a
    :class:`tao_core.config.TableConfig`); a naive ``t.since`` is UTC."""
    from datetime import UTC, datetime

    from tao_core.table import read_prompts

    since = None
    if t.since is not None:
        since = datetime.fromisoformat(t.since)
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
    read = read_prompts(t.url, since=since, tag=t.tag, model=t.model, requester=t.requester)
    return prepare(read, near_duplicate=t.near_duplicate, max_key_share=t.max_key_share, holdout=t.holdout)
