"""Shared pieces of the inference-table tests: the ``url`` fixture (SQLite, and PostgreSQL on the
server tests/pg_server.py starts), the ``tables`` fixture and the exchanges they log. The fixtures
are registered in tests/conftest.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tao_core.table import InferenceTable

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _empty_database(url: str) -> None:
    """Drop every table in the database, the table's own and any a test made (a frozen v1 schema)."""
    engine = sa.create_engine(url)
    found = sa.MetaData()
    found.reflect(engine)
    found.drop_all(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A database emptied before and after the test: a SQLite file in tmp_path, or the session's
    PostgreSQL database (tests/pg_server.py: the server the session starts, or ``TAO_TEST_POSTGRES_URL``)."""
    if request.param == "sqlite":
        yield str(tmp_path / "inference.db")
        return
    pg_url = request.getfixturevalue("postgres_url")
    _empty_database(pg_url)
    yield pg_url
    _empty_database(pg_url)


@pytest.fixture
def tables():
    """Open tables through this fixture; each is closed after the test."""
    opened: list[InferenceTable] = []

    def open_table(url, **options) -> InferenceTable:
        opened.append(InferenceTable.open(url, **options))
        return opened[-1]

    yield open_table
    for t in opened:
        t.close(timeout=10)


def chat(i: int, text: str | None = None, answers: tuple[str, ...] = ("a", "b"), **extra) -> dict:
    """A logged chat exchange with one choice per answer."""
    return {
        "request_id": f"r{i:05d}",
        "request_json": {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": text or f"question {i}"}]},
        "response_json": {"object": "chat.completion", "choices": [
            {"index": k, "message": {"role": "assistant", "content": a}, "finish_reason": "stop"}
            for k, a in enumerate(answers)]},
        "status_code": 200,
        "prompt_token_ids": [1, 2, i],
        "completion_token_ids": [[3, k] for k in range(len(answers))],
        "completion_logprobs": [[-0.5, -0.25 * k] for k in range(len(answers))],
        **extra,
    }


def count(url) -> int:
    with InferenceTable.open(url) as t:
        return t.summary()["exchanges"]

def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
