"""`tao serve` security: API keys (`tao keys`), admin keys, per-key rate limits, the loopback-only open mode.

Servers run on a loopback port and are driven by the official `openai` client (httpx for the admin
route, which this file registers on its own app: product code has none of its own here). Every key store
is a file under the test's temporary directory, never $TAO_HOME.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from starlette.requests import Request  # noqa: E402

from tao_core.errors import TaoInputError  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.app import create_app  # noqa: E402
from tao_core.serve.auth import ADMIN_TOKEN_ID, Guard, TokenBuckets, check_binding  # noqa: E402
from tao_core.serve.cli import serve_cmd  # noqa: E402
from tao_core.serve.keys import KEY_PREFIX, KeyStore, LiveKeys, digest  # noqa: E402
from tao_core.serve.keys_cli import keys_group  # noqa: E402
from tao_core.serve.protocol import ApiError  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.table import InferenceTable  # noqa: E402
from tests.test_serve import MODEL, QUESTION, RecordingLogger, on_loopback, wait_until  # noqa: E402

ADMIN_TOKEN = "flywheel-token-" + "x" * 32
CONFIG = ServeConfig(served_model=MODEL, model_version="v1", max_tokens_limit=16, default_max_tokens=4,
                     max_body_bytes=4096)


def keys_cli(*args: str) -> str:
    """Run `tao keys ARGS`; its stdout (stderr apart), asserting success."""
    result = CliRunner().invoke(keys_group, list(args))
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def new_key(path: Path, *extra: str) -> tuple[str, str]:
    """(key id, key) of a key `tao keys create` just made in the store at ``path``."""
    key = keys_cli("create", "--keys", str(path), *extra).strip()
    return {k.sha256: k.id for k in KeyStore(path).load()}[digest(key)], key


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port; yields its base URL."""
    with on_loopback(app) as (_, _, port):
        yield f"http://127.0.0.1:{port}"


def with_test_admin_route(app):
    @app.get("/admin/whoami")
    async def whoami(request: Request) -> dict:
        return {"key_id": request.state.key_id}

    return app


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat(c: openai.OpenAI):
    return c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def keyed(lm, tmp_path_factory):
    """A server whose store holds two api keys, an admin key and a key limited to 2 requests a minute,
    logging to a real inference table."""
    home = tmp_path_factory.mktemp("keyed")
    path = home / "keys.json"
    keys = {"alice": new_key(path, "--name", "alice"), "bob": new_key(path, "--name", "bob"),
            "ops": new_key(path, "--name", "ops", "--admin"),
            "slow": new_key(path, "--name", "slow", "--rate-limit", "2/min")}
    table = InferenceTable.open(home / "inference.db")
    app = with_test_admin_route(create_app(lm, replace(CONFIG, keys=str(path)), logger=table,
                                           admin_token=ADMIN_TOKEN))
    with serving(app) as url:
        yield {"url": url, "path": path, "keys": keys, "table": table}


# --- keys on /v1 ---------------------------------------------------------------------------------

def test_no_key_or_a_wrong_key_is_a_401_in_openai_shape(keyed):
    url = keyed["url"]
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {"error": {"message": missing.json()["error"]["message"], "type": "invalid_request_error",
                                        "param": None, "code": "missing_api_key"}}
    wrong = KEY_PREFIX + "not-a-key-of-this-server-0000000000000000000"
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(client(url, wrong))
    assert refused.value.response.json()["error"]["code"] == "invalid_api_key"
    assert wrong not in refused.value.response.text  # a presented key is never echoed whole
    with pytest.raises(openai.AuthenticationError):
        client(url, keyed["keys"]["alice"][1] + "x").models.list()
    basic = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {keyed['keys']['alice'][1]}"})
    assert basic.status_code == 401


def test_a_valid_key_is_answered_and_its_id_is_the_logged_requester(keyed):
    key_id, key = keyed["keys"]["alice"]
    answer = chat(client(keyed["url"], key))
    streamed = list(client(keyed["url"], key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                                                       stream=True))
    table = keyed["table"]
    for request_id in (answer.id, streamed[0].id):
        wait_until(lambda rid=request_id: table.flush() and table.get(rid) is not None, f"the row of {request_id}")
        assert table.get(request_id)["requester"] == key_id


def test_a_key_revoked_while_the_server_runs_is_refused_at_once(keyed):
    bob_id, bob = keyed["keys"]["bob"]
    assert chat(client(keyed["url"], bob)).choices
    assert "revoked" in keys_cli("revoke", bob_id, "--keys", str(keyed["path"]))
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(client(keyed["url"], bob))
    assert "revoked" in refused.value.response.json()["error"]["message"]
    assert chat(client(keyed["url"], keyed["keys"]["alice"][1])).choices  # the other keys still work


def test_health_and_metrics_need_no_key(keyed):
    assert httpx.get(f"{keyed['url']}/health").status_code == 200
    assert httpx.get(f"{keyed['url']}/metrics").status_code == 200


# --- admin ---------------------------------------------------------------------------------------

def test_admin_routes_take_admin_keys_or_the_admin_token_only(keyed):
    url, keys = f"{keyed['url']}/admin/whoami", keyed["keys"]

    def whoami(key: str | None) -> httpx.Response:
        return httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {})

    assert whoami(None).status_code == 401
    assert whoami("wrong").json()["error"]["code"] == "invalid_api_key"
    api = whoami(keys["alice"][1])
    assert api.status_code == 403 and api.json()["error"]["code"] == "insufficient_permissions"
    assert "--admin" in api.json()["error"]["message"]
    assert whoami(keys["ops"][1]).json() == {"key_id": keys["ops"][0]}
    assert whoami(ADMIN_TOKEN).json() == {"key_id": ADMIN_TOKEN_ID}
    assert chat(client(keyed["url"], keys["ops"][1])).choices  # an admin key also calls /v1
    with pytest.raises(openai.AuthenticationError):
        chat(client(keyed["url"], ADMIN_TOKEN))  # the admin token is for /admin only


def test_the_product_admin_routes_are_guarded_too(keyed):
    """POST /admin/rollback (tao_core.serve.admin): refused without an admin key; reached with one (409:
    there is no earlier version to roll back to)."""
    url, keys = f"{keyed['url']}/admin/rollback", keyed["keys"]
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": f"Bearer {keys['alice'][1]}"}).status_code == 403
    reached = httpx.post(url, headers={"Authorization": f"Bearer {keys['ops'][1]}"})
    assert reached.status_code == 409 and reached.json()["error"]["code"] == "no_previous_version"


# --- rate limits ---------------------------------------------------------------------------------

def test_a_key_over_its_rate_limit_is_a_429_with_retry_after(keyed):
    slow = client(keyed["url"], keyed["keys"]["slow"][1])
    slow.models.list()
    slow.models.list()
    with pytest.raises(openai.RateLimitError) as refused:
        slow.models.list()
    response = refused.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 30  # 2 a minute: a token every 30 s
    assert response.json()["error"]["code"] == "rate_limit_exceeded" and "2 requests per minute" in response.text
    assert client(keyed["url"], keyed["keys"]["alice"][1]).models.list().data  # other keys have their own bucket


def test_token_buckets_refill_at_the_rate_and_say_how_long_to_wait():
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    assert [buckets.take("k", 6) for _ in range(6)] == [0.0] * 6  # a full bucket: a minute's worth at once
    assert buckets.take("k", 6) == pytest.approx(10.0)  # 6 a minute: the next token in 10 s
    now[0] = 5.0
    assert buckets.take("k", 6) == pytest.approx(5.0)
    now[0] = 10.0
    assert buckets.take("k", 6) == 0.0 and buckets.take("other", 6) == 0.0
    assert all(buckets.take("k", 0) == 0.0 for _ in range(100))  # 0: unlimited


# --- the other bounds -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/feedback"])
def test_a_body_over_the_limit_is_a_413_whether_declared_or_streamed(keyed, path):
    """``--max-body-bytes`` holds for a declared length and for a chunked body that never says its size."""
    body = json.dumps({"model": MODEL, "prompt": "x" * CONFIG.max_body_bytes}).encode()
    headers = {"Authorization": f"Bearer {keyed['keys']['alice'][1]}", "content-type": "application/json"}

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1024):
            yield body[i:i + 1024]

    declared = httpx.post(f"{keyed['url']}{path}", content=body, headers=headers)
    streamed = httpx.post(f"{keyed['url']}{path}", content=chunks(), headers=headers)
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in streamed.request.headers


# --- the open loopback mode ------------------------------------------------------------------------

def test_loopback_with_no_api_key_is_open_limited_per_address_until_a_key_is_created(lm, tmp_path):
    path = tmp_path / "keys.json"
    new_key(path, "--name", "ops", "--admin")  # an admin key alone leaves /v1 open
    logger = RecordingLogger()
    app = create_app(lm, replace(CONFIG, keys=str(path), rate_limit=2), logger=logger)
    with serving(app) as url:
        open_client = client(url, "anything")  # the openai client always sends some key
        answer = chat(open_client)
        assert logger.find(answer.id)["requester"] is None
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no key at all
        with pytest.raises(openai.RateLimitError) as refused:
            open_client.models.list()  # the 3rd request from 127.0.0.1 within the minute
        assert "address 127.0.0.1" in refused.value.response.text and refused.value.response.headers["retry-after"]
        _, key = new_key(path, "--name", "alice", "--rate-limit", "0")
        with pytest.raises(openai.AuthenticationError):
            chat(open_client)  # the server saw the new api key without a restart
        assert chat(client(url, key)).choices


# --- binding beyond loopback ----------------------------------------------------------------------

def test_binding_beyond_loopback_needs_an_api_key(lm, tmp_path):
    path = tmp_path / "keys.json"
    for host in ("127.0.0.1", "::1", "localhost"):
        check_binding(host, KeyStore(path))
    with pytest.raises(TaoInputError, match="tao keys create") as refused:
        check_binding("0.0.0.0", KeyStore(path))
    assert str(path) in str(refused.value)
    with pytest.raises(TaoInputError, match="tao keys create"):
        create_app(lm, ServeConfig(host="0.0.0.0", keys=str(path)))
    new_key(path, "--name", "ops", "--admin")
    with pytest.raises(TaoInputError):
        check_binding("192.168.1.5", KeyStore(path))  # an admin key is not an api key
    new_key(path, "--name", "alice")
    check_binding("0.0.0.0", KeyStore(path))
    check_binding("0.0.0.0", LiveKeys(KeyStore(path)))


def test_the_serve_command_refuses_a_public_address_before_loading_the_model(tmp_path):
    result = CliRunner().invoke(serve_cmd, ["no-such-model", "--host", "0.0.0.0", "--keys", str(tmp_path / "k.json")])
    assert result.exit_code == 1 and "tao keys create" in result.output
    bad_rate = CliRunner().invoke(serve_cmd, ["no-such-model", "--rate-limit", "fast"])
    assert bad_rate.exit_code == 2 and "--rate-limit" in bad_rate.output


# --- the key store and `tao keys` -----------------------------------------------------------------

def test_the_store_holds_only_digests_in_a_private_file(tmp_path):
    path = tmp_path / "home" / "keys.json"
    key_id, key = new_key(path, "--name", "alice")
    text = path.read_text()
    assert key not in text and key[len(KEY_PREFIX):] not in text and key_id in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43  # 256 random bits
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_tao_keys_create_list_and_revoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))  # the default store: $TAO_HOME/keys.json
    key = keys_cli("create", "--name", "ci bot", "--rate-limit", "60/min").strip()
    admin = keys_cli("create", "--name", "ops", "--admin").strip()
    listed = keys_cli("list")
    stored = KeyStore().load()
    assert KeyStore().path == tmp_path / "home" / "keys.json"
    assert [(k.name, k.role, k.rate_limit) for k in stored] == [("ci bot", "api", 60), ("ops", "admin", None)]
    assert all(k.id in listed for k in stored) and "ci bot" in listed and "admin" in listed
    assert key not in listed and admin not in listed
    assert "revoked" in keys_cli("revoke", stored[0].id)
    assert "revoked" in keys_cli("revoke", stored[0].id)  # twice: nothing more happens
    assert "revoked" in keys_cli("list").splitlines()[1]
    unknown = CliRunner().invoke(keys_group, ["revoke", "key_nope"])
    assert unknown.exit_code == 1 and stored[0].id in unknown.output and "key_nope" in unknown.output
    bad_rate = CliRunner().invoke(keys_group, ["create", "--name", "x", "--rate-limit", "often"])
    assert bad_rate.exit_code == 2 and "N/min" in bad_rate.output
    assert len(KeyStore().load()) == 2  # a refused create stores nothing


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"version": 1, "keys": [{"id": "key_1"}]}',
                                     b'{"version": 99, "keys": []}'])
def test_a_corrupt_store_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    listed = CliRunner().invoke(keys_group, ["list", "--keys", str(path)])
    assert listed.exit_code == 1 and str(path) in listed.output
    created = CliRunner().invoke(keys_group, ["create", "--name", "x", "--keys", str(path)])
    assert created.exit_code == 1 and path.read_bytes() == content  # the bad file is left as it was


def test_a_server_whose_store_turns_corrupt_refuses_rather_than_trusts_old_keys(tmp_path):
    path = tmp_path / "keys.json"
    new_key(path, "--name", "alice")
    guard = Guard(LiveKeys(KeyStore(path)), loopback=True, rate_limit=0)
    with pytest.raises(ApiError) as missing:
        guard.caller("/v1/models", None)
    assert missing.value.status == 401
    path.write_text(json.dumps({"version": 1, "keys": "garbage"}))
    with pytest.raises(ApiError) as unreadable:
        guard.caller("/v1/models", None)
    assert unreadable.value.status == 503 and str(path) not in unreadable.value.message  # the path is for the log
    assert guard.caller("/health", None) is None  # what needs no key still answers
