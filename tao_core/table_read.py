"""Reading the inference table: prompts for a round, preference pairs from feedback, a summary.

Prompts (:func:`read_table_prompts`): the exchanges answered with a 2xx status (or with none
recorded, as imports may be), oldest first, filtered by ``since`` (request_time at or after), ``tag``,
``model`` (served_model) and ``requester``; ``limit`` caps the prompts returned. Each becomes a
:class:`~tao_core.types.Prompt` with ``id`` = request_id and ``text`` = the last user message of a chat
request (its text parts joined by newlines) or the ``prompt`` of a completion request; ``metadata``
holds requester, model, model_version, tag and time (ISO 8601, UTC). An exchange stored without its
request body, or whose request has no such text, is left out and listed in ``skipped`` with the reason.

Preference pairs (:func:`feedback_pairs`), in the shape ``tao rm train --pairs`` reads
(``plugins/reward_training.py``): ``{"messages": [...], "chosen": ..., "rejected": ...}`` for a chat
request (its messages, text parts joined) or ``{"prompt": ..., "chosen": ..., "rejected": ...}`` for
a completion request.

- A preferred choice k of a request gives (choice k, choice j) for every other choice j.
- A rating rates choice ``preferred_choice`` of its request when given, else choice 0. Ratings of one
  (request, choice) are averaged; across all requests with the same prompt (the same messages or
  text), every choice rated above ``rating_threshold`` is paired with every choice rated below it.

A pair whose two texts are equal or empty is left out; a pair that arises twice is kept once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from tao_core.errors import TaoInputError
from tao_core.table_schema import current_version, exchanges, feedback, from_db_time, to_db_time
from tao_core.types import Prompt

JSON_COLUMNS = ("request_json", "response_json", "prompt_token_ids", "completion_token_ids", "completion_logprobs")
TIME_COLUMNS = ("request_time", "time")
READ_CHUNK = 500  # rows fetched at a time while streaming prompts


@dataclass
class TablePrompts:
    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)


class _Skip(Exception):
    """Why a row yields no prompt or pair."""


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row as Python values: JSON columns parsed, times as aware UTC datetimes."""
    out = dict(row)
    for key in JSON_COLUMNS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    for key in TIME_COLUMNS:
        if key in out:
            out[key] = from_db_time(out[key])
    return out


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    raise _Skip("a message's content is neither text nor a list of text parts")


def choice_texts(response_json: str | None) -> list[str | None]:
    """The text of each choice of a stored chat or completion response, by index (None where absent)."""
    if response_json is None:
        return []
    try:
        response = json.loads(response_json)
    except ValueError:
        return []
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return []
    texts: dict[int, str | None] = {}
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        message = choice.get("message")
        value = message.get("content") if isinstance(message, dict) else choice.get("text")
        try:
            texts[index if isinstance(index, int) else position] = _text_of(value)
        except _Skip:
            texts[index if isinstance(index, int) else position] = None
    return [texts.get(i) for i in range(max(texts) + 1)] if texts else []


def _request(request_json: str | None) -> dict[str, Any]:
    if request_json is None:
        raise _Skip("the request body was not stored (store_bodies=False)")
    request = json.loads(request_json)
    if not isinstance(request, dict):
        raise _Skip(f"the request body is a JSON {type(request).__name__}, not an object")
    if request.get("truncated") is True and set(request) == {"truncated", "bytes"}:
        raise _Skip("the request body was truncated (max_body_bytes)")
    return request


def _chat(request: dict[str, Any]) -> list[dict[str, str]] | None:
    messages = request.get("messages")
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:
        raise _Skip("'messages' is not a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Skip("a message has no 'role'")
        out.append({"role": m["role"], "content": _text_of(m.get("content"))})
    return out


def _completion_prompt(request: dict[str, Any]) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _Skip("the request has neither 'messages' nor a single text 'prompt'")
    return prompt


def prompt_text(request_json: str | None) -> str:
    """The text a round trains on: the last user message of a chat request, or a completion's prompt."""
    request = _request(request_json)
    messages = _chat(request)
    if messages is None:
        return _completion_prompt(request)
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise _Skip("the chat request has no user message")
    return users[-1]


def read_table_prompts(engine: sa.Engine, since: datetime | None = None, tag: str | None = None,
                       model: str | None = None, requester: str | None = None,
                       limit: int | None = None) -> TablePrompts:
    """See the module docstring."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise TaoInputError(f"limit must be a non-negative integer, got {limit!r}")
    c = exchanges.c
    query = sa.select(c.request_id, c.request_time, c.request_json, c.served_model, c.model_version, c.requester,
                      c.tag).where(sa.or_(c.status_code.is_(None), c.status_code.between(200, 299)))
    for column, value in ((c.tag, tag), (c.served_model, model), (c.requester, requester)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(c.request_time >= to_db_time(since))
    out = TablePrompts()
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=READ_CHUNK).execute(query.order_by(c.request_time, c.request_id))
        for row in result:
            if limit is not None and len(out.prompts) >= limit:
                break
            try:
                text = prompt_text(row.request_json)
                if not text.strip():
                    raise _Skip("the prompt text is empty")
            except _Skip as e:
                out.skipped.append((row.request_id, str(e)))
                continue
            when = from_db_time(row.request_time)
            meta = {"requester": row.requester, "model": row.served_model, "model_version": row.model_version,
                    "tag": row.tag, "time": when.isoformat() if when else None}
            out.prompts.append(Prompt(id=row.request_id, text=text, metadata=meta))
        result.close()
    return out


def _pair_prompt(request_json: str | None) -> tuple[str, dict[str, Any]]:
    """(a key equal for equal prompts, the prompt part of a pairs row)."""
    request = _request(request_json)
    messages = _chat(request)
    spec: dict[str, Any] = {"prompt": _completion_prompt(request)} if messages is None else {"messages": messages}
    return json.dumps(spec, sort_keys=True), spec


def feedback_pairs(engine: sa.Engine, rating_threshold: float = 0.5) -> list[dict[str, Any]]:
    """See the module docstring."""
    query = (sa.select(feedback.c.request_id, feedback.c.rating, feedback.c.preferred_choice,
                       exchanges.c.request_json, exchanges.c.response_json)
             .join(exchanges, exchanges.c.request_id == feedback.c.request_id).order_by(feedback.c.id))
    prompts: dict[str, tuple[str, dict[str, Any]] | None] = {}
    texts: dict[str, list[str | None]] = {}
    ratings: dict[tuple[str, int], list[float]] = defaultdict(list)
    pairs: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(key: str, spec: dict[str, Any], chosen: str | None, rejected: str | None) -> None:
        if chosen and rejected and chosen.strip() and rejected.strip() and chosen != rejected:
            pairs.setdefault((key, chosen, rejected), {**spec, "chosen": chosen, "rejected": rejected})

    with engine.connect() as conn:
        for row in conn.execute(query):
            if row.request_id not in prompts:
                try:
                    prompts[row.request_id] = _pair_prompt(row.request_json)
                except _Skip:
                    prompts[row.request_id] = None
                texts[row.request_id] = choice_texts(row.response_json)
            if prompts[row.request_id] is None:
                continue
            key, spec = prompts[row.request_id]
            choices = texts[row.request_id]
            k = row.preferred_choice
            if row.rating is not None:
                ratings[(row.request_id, k or 0)].append(row.rating)
            if k is not None and k < len(choices):
                for j, other in enumerate(choices):
                    if j != k:
                        add(key, spec, choices[k], other)
    by_prompt: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (request_id, k), values in ratings.items():
        choices = texts[request_id]
        if k < len(choices) and choices[k] is not None:
            by_prompt[prompts[request_id][0]].append((sum(values) / len(values), choices[k]))
    specs = {key: spec for key, spec in (p for p in prompts.values() if p is not None)}
    for key, rated in by_prompt.items():
        for good, chosen in rated:
            for bad, rejected in rated:
                if good > rating_threshold > bad:
                    add(key, specs[key], chosen, rejected)
    return list(pairs.values())


def summarize(engine: sa.Engine) -> dict[str, Any]:
    """Counts and ranges for ``tao table stats``."""
    c = exchanges.c
    with engine.connect() as conn:
        n, first, last = conn.execute(sa.select(sa.func.count(), sa.func.min(c.request_time),
                                                sa.func.max(c.request_time))).one()
        n_feedback = conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one()
        per_model = conn.execute(sa.select(c.served_model, c.model_version, sa.func.count())
                                 .group_by(c.served_model, c.model_version)
                                 .order_by(c.served_model, c.model_version)).all()
        version = current_version(conn)
    return {
        "schema_version": version,
        "exchanges": n,
        "feedback": n_feedback,
        "first_request_time": first and from_db_time(first).isoformat(),
        "last_request_time": last and from_db_time(last).isoformat(),
        "per_model": [{"served_model": m, "model_version": v, "exchanges": k} for m, v, k in per_model],
    }
