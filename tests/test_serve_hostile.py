"""`tao serve` against hostile input: header tricks, a broken key store, bodies JSON parsers choke on,
reload paths that cannot be resolved, weights that are not a regular file or change while they are read.

Servers run on a loopback port (the real app under uvicorn) and log to a real inference table, so a
refused request is checked to be logged too. Weights cut short while they are read are tested in a
child process: a reader that maps the file dies of SIGBUS there, not the test session.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import torch  # noqa: E402

from tao_core.errors import TaoInputError  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.app import create_app  # noqa: E402
from tao_core.serve.keys import KeyStore  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.serve.versions import VersionError, read_weights  # noqa: E402
from tao_core.table import InferenceTable  # noqa: E402
from tests.conftest import make_tiny_model_dir  # noqa: E402
from tests.test_serve import MODEL  # noqa: E402
from tests.test_serve_auth import new_key, serving  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "tao_home")

ADMIN = "hostile-admin-token-" + "y" * 32
CONFIG = ServeConfig(served_model=MODEL, max_tokens_limit=8, default_max_tokens=2, rate_limit=0)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """A model of the served architecture with other weights."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    """(url, api key, store path, table) of a server with one api key, logging to a real table."""
    home = tmp_path_factory.mktemp("hostile")
    store = home / "keys.json"
    _, key = new_key(store, "--name", "alice")
    table = InferenceTable.open(home / "inference.db")
    app = create_app(lm, replace(CONFIG, keys=str(store)), logger=table, admin_token=ADMIN)
    with serving(app) as url:
        yield url, key, store, table, app
    table.close()


def post(url: str, path: str, body: bytes | dict, headers: list[tuple[str, str]]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=[("Content-Type", "application/json"), *headers],
                      timeout=60)


def logged(table: InferenceTable, request_id: str) -> dict | None:
    assert table.flush(30)
    with table.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT status_code, request_json FROM exchanges WHERE request_id = ?",
                                   (request_id,)).first()
    return None if row is None else {"status_code": row[0], "request_json": row[1]}


def test_two_authorization_headers_are_refused_whichever_comes_first(server):
    url, key, *_ = server
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for pair in ([key, "not-a-key"], ["not-a-key", key]):
        r = post(url, "/v1/completions", body, [("Authorization", f"Bearer {k}") for k in pair])
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_authorization_header"
    assert post(url, "/v1/completions", body, [("Authorization", f"bearer   {key}")]).status_code == 200


def test_an_authorization_header_of_another_scheme_is_named(server):
    url, *_ = server
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi"}, [("Authorization", "Basic YWxpY2U6eA==")])
    assert r.status_code == 401 and "not of that form" in r.json()["error"]["message"]


def test_a_broken_key_store_is_a_503_that_does_not_show_callers_its_path(server):
    url, key, store, *_ = server
    good = store.read_bytes()
    try:
        store.write_text('{"version": 1, "keys": [')
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi"}, [("Authorization", f"Bearer {key}")])
        assert r.status_code == 503 and r.json()["error"]["code"] == "key_store_unreadable"
        assert str(store) not in r.text and "JSON" not in r.text
    finally:
        store.write_bytes(good)
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                [("Authorization", f"Bearer {key}")]).status_code == 200


@pytest.mark.parametrize("field", ["id", "sha256"])
def test_a_key_store_holding_one_key_twice_is_refused(tmp_path, field):
    path = tmp_path / "keys.json"
    new_key(path, "--name", "alice")
    new_key(path, "--name", "bob")
    data = json.loads(path.read_text())
    data["keys"][1][field] = data["keys"][0][field]  # e.g. a revoked entry copied back by hand
    path.write_text(json.dumps(data))
    with pytest.raises(TaoInputError, match=rf"keys\[0\] and keys\[1\] have the same {field}"):
        KeyStore(path).load()


DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize("body, message", [
    (DEEP, "nests arrays or objects too deeply"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1, "user": "\\ud800"}', "unpaired UTF-16 surrogate"),
    (b'{"model": "tiny", "prompt": "\\udfff", "max_tokens": 1}', "unpaired UTF-16 surrogate"),
])
def test_bodies_a_parser_or_the_table_chokes_on_are_400s_and_logged(server, body, message):
    url, key, _, table, _ = server
    r = post(url, "/v1/completions", body, [("Authorization", f"Bearer {key}")])
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    row = logged(table, r.headers["x-request-id"])
    assert row is not None and row["status_code"] == 400  # a request the table could not store is still logged
    for path, headers in (("/v1/feedback", [("Authorization", f"Bearer {key}")]),
                          ("/admin/reload", [("Authorization", f"Bearer {ADMIN}")])):
        r = post(url, path, body, headers)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)


def test_reload_paths_that_cannot_be_resolved_are_400s_naming_the_model(server, tmp_path):
    url, *_, app = server
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for model in (str(tmp_path / "a"), "/tmp/x\u0000y", "/" + "a" * 5000, "/" + "a/" * 3000):
        r = post(url, "/admin/reload", json.dumps({"model": model}).encode(), [("Authorization", f"Bearer {ADMIN}")])
        assert r.status_code == 400, (model[:40], r.text)
        assert r.json()["error"]["param"] == "model" and len(r.text) < 2000
    with pytest.raises(VersionError, match="not a usable directory path"):  # what the body check lets no client send
        asyncio.run(app.state.tao.versions.reload("/tmp/\ud800"))  # refused before it waits on the server's loop
    assert app.state.tao.versions.current == CONFIG.model_version


def test_weights_that_are_not_a_regular_file_are_refused_without_blocking(server, other_dir, tmp_path):
    url, *_, app = server
    model = tmp_path / "fifo"
    model.mkdir()
    (model / "config.json").write_bytes((other_dir / "config.json").read_bytes())
    os.mkfifo(model / "model.safetensors")  # opening it for reading would wait for a writer, forever
    r = post(url, "/admin/reload", {"model": str(model)}, [("Authorization", f"Bearer {ADMIN}")])
    assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert app.state.tao.versions.current == CONFIG.model_version


CUT_WHILE_READ = """
import sys
from pathlib import Path

import torch

from tao_core.models import load_model
from tao_core.serve.versions import VersionError, read_weights

lm = load_model(sys.argv[1])
weights = Path(sys.argv[2]) / "model.safetensors"
real = torch.empty_like


def cut(*args, **kwargs):  # called once the first tensor is read: the file is written again from scratch
    torch.empty_like = real
    with open(weights, "r+b") as f:
        f.truncate(0)
    return real(*args, **kwargs)


torch.empty_like = cut
try:
    read_weights(lm.model, Path(sys.argv[2]))
    print("READ")
except VersionError as e:
    print("REFUSED", e.status, e)
"""


def test_weights_cut_short_while_read_are_refused_not_a_crash(lm, tiny_model_dir, other_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in other_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    done = subprocess.run([sys.executable, "-c", CUT_WHILE_READ, str(tiny_model_dir), str(model)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the reader died (signal {-done.returncode}): {done.stderr[-2000:]}"
    assert "REFUSED 400" in done.stdout and "cannot read the weights" in done.stdout, done.stdout


def test_weights_written_while_read_are_refused(lm, other_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    for f in other_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    weights = model / "model.safetensors"
    real = torch.empty_like

    def rewrite(*args, **kwargs):  # the same bytes written again in place, as a trainer saving over it would
        monkeypatch.setattr(torch, "empty_like", real)
        weights.write_bytes(weights.read_bytes())
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty_like", rewrite)
    with pytest.raises(VersionError, match="changed while it was read") as refused:
        read_weights(lm.model, model)
    assert refused.value.status == 400
    assert set(read_weights(lm.model, model)) == {n for n, _ in lm.model.named_parameters()}  # complete: it reads
