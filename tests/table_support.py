"""Shared pieces of the inference-table tests: the ``url`` fixture (SQLite, and PostgreSQL when
``TAO_TEST_POSTGRES_URL`` is set), the ``tables`` fixture and the exchanges they log. The fixtures
are registered in tests/conftest.py."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tao_core.table import InferenceTable
from tao_core.table_schema import metadata

REPO = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TAO_TEST_POSTGRES_URL")
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _empty_database(url: str) -> None:
    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "inference.db")
        return
    if not PG_URL:
        pytest.skip("TAO_TEST_POSTGRES_URL is not set; set it to an empty PostgreSQL database "
                    "(postgresql+psycopg://user@host:port/db) to run this test on PostgreSQL")
    _empty_database(PG_URL)
    yield PG_URL
    _empty_database(PG_URL)


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
