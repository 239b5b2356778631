"""The score cache of :func:`tao_core.scoring.score_groups`: ``ok`` and ``abstain`` scores on disk.

Scores live in SQLite (``<directory>/scores.sqlite``) under a SHA-256 of what decides them; errors
are never stored, so a failed call is always retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from tao_core.types import Candidate, Prompt, Score


def _prompt_key(prompt: Prompt) -> str:
    return json.dumps([prompt.as_messages(), prompt.metadata], sort_keys=True, default=str)


class ScoreCache:
    """``ok`` / ``abstain`` scores on disk, in ``<directory>/scores.sqlite``; thread-safe.

    Keys hash (scorer name, version, options (:func:`tao_core.scorer.scorer_options`; left out when empty, so such
    keys are unchanged), prompt messages and metadata, group texts unless the scorer is pointwise,
    candidate text). Bump a scorer's ``version`` whenever its scores change meaning.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / "scores.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score TEXT NOT NULL)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(name: str, version: str, prompt: Prompt, candidates: Sequence[Candidate], pointwise: bool,
             options: str = "") -> list[str]:
        head = [name, version, *([options] if options else []), _prompt_key(prompt)]
        if not pointwise:
            head.append([c.text for c in candidates])
        return [hashlib.sha256(json.dumps([*head, c.text], default=str).encode()).hexdigest() for c in candidates]

    def get(self, keys: Sequence[str]) -> list[Score | None]:
        with self._lock:
            rows = dict(self._db.execute(
                f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(keys))})", list(keys)).fetchall())
        out = [Score.from_dict(json.loads(rows[k])) if k in rows else None for k in keys]
        found = sum(s is not None for s in out)
        self.hits += found
        self.misses += len(keys) - found
        return out

    def put(self, keys: Sequence[str], scores: Sequence[Score]) -> None:
        rows = [(k, json.dumps(s.to_dict(), default=str)) for k, s in zip(keys, scores, strict=True)
                if s.status != "error"]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO scores (key, score) VALUES (?, ?)", rows)
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
