"""The API key store of ``tao serve``: one JSON file of key hashes, ``$TAO_HOME/keys.json`` by default.

A key (``tao-sk-`` and 43 URL-safe characters: 256 random bits from :mod:`secrets`) is shown once,
when ``tao keys create`` makes it; the file keeps only its SHA-256 digest with a key id, name, role,
creation time and optional rate limit. The id (``key_`` and 12 hex digits) is what logs and the
inference table's ``requester`` column name; the key itself is never written anywhere. A plain hash
suffices because the keys are random, not chosen by people: nothing short of guessing 256 bits
inverts it. A presented key is compared with every stored digest by :func:`hmac.compare_digest`.

Writes take an exclusive lock on ``keys.json.lock`` beside the file (two ``tao keys create`` at once
both land) and replace the file atomically: a complete, fsynced temporary file of mode 0600 renamed
into place, so a reader (a running server) sees the old or the new keys, never a mix. A revoked key
stays in the file, marked with its revocation time, so a logged key id still has a name.
:class:`LiveKeys` is the running server's view: it rereads the file when it changes, so a created or
revoked key counts from the next request on, without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tao_core.errors import TaoInputError, TaoWriteError
from tao_core.fsio import write_file

KEY_PREFIX = "tao-sk-"
ROLES = ("api", "admin")  # api: /v1/*; admin: /v1/* and /admin/*
STORE_VERSION = 1  # the file's "version"; a file of another version is refused, not guessed at
DEFAULT_FILE = "keys.json"  # under $TAO_HOME
_RATE_RE = re.compile(r"\s*(\d+)\s*(?:/\s*min)?\s*")
_FIELDS = {"id": str, "name": str, "role": str, "created": str, "rate_limit": (int, type(None)), "sha256": str,
           "revoked": (str, type(None))}


@dataclass(frozen=True)
class ApiKey:
    """One stored key: everything but the key itself."""

    id: str  # "key_" + 12 hex digits: the requester id in logs and the inference table
    name: str  # what the key is for, given at creation (a person, a service)
    role: str  # "api" (/v1/*) or "admin" (/v1/* and /admin/*)
    created: str  # ISO 8601 UTC time of creation
    rate_limit: int | None  # requests per minute; None: the server's --rate-limit; 0: unlimited
    sha256: str  # hex SHA-256 digest of the key
    revoked: str | None = None  # ISO 8601 UTC time of revocation; None: the key is valid

    @property
    def active(self) -> bool:
        return self.revoked is None


def default_path() -> Path:
    """``$TAO_HOME/keys.json`` (``$TAO_HOME`` defaults to ``~/.cache/tao``, as the model cache)."""
    return Path(os.environ.get("TAO_HOME") or Path.home() / ".cache" / "tao") / DEFAULT_FILE


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_rate_limit(text: str | int | None, where: str) -> int | None:
    """``"N"`` or ``"N/min"`` as requests per minute (0: unlimited); None stays None."""
    if text is None or (isinstance(text, int) and not isinstance(text, bool) and text >= 0):
        return text
    m = _RATE_RE.fullmatch(str(text))
    if m is None:
        raise TaoInputError(f"{where}: {text!r} is not a rate limit; write requests per minute as N or N/min "
                            "(e.g. 60/min; 0: unlimited)")
    return int(m.group(1))


class KeyStore:
    """The key file at ``path`` (None: :func:`default_path`); a missing file holds no keys."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()

    def load(self) -> list[ApiKey]:
        """Every stored key, revoked ones included; a file that is not a key store is a TaoInputError naming it."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise TaoInputError(f"cannot read the key store {self.path}: {e.strerror or e}") from None
        return _parse(raw, self.path)

    def create(self, name: str, role: str = "api", rate_limit: int | None = None) -> tuple[ApiKey, str]:
        """Store a new key; return it with the key itself, which exists nowhere else afterwards."""
        if not name.strip():
            raise TaoInputError("a key needs a name (what or who it is for): tao keys create --name NAME")
        if role not in ROLES:
            raise TaoInputError(f"role must be one of {list(ROLES)}, got {role!r}")
        if rate_limit is not None and (not isinstance(rate_limit, int) or rate_limit < 0):
            raise TaoInputError(f"rate_limit must be requests per minute >= 0 (0: unlimited), got {rate_limit!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            keys = self.load()
            taken = {k.id for k in keys}
            key_id = "key_" + secrets.token_hex(6)
            while key_id in taken:
                key_id = "key_" + secrets.token_hex(6)
            entry = ApiKey(key_id, name.strip(), role, _now(), rate_limit, digest(key))
            self._save([*keys, entry])
        return entry, key

    def revoke(self, key_id: str) -> ApiKey:
        """Mark ``key_id`` revoked (kept in the file so logged ids keep their names); revoking twice is a no-op."""
        with self._locked():
            keys = self.load()
            found = next((k for k in keys if k.id == key_id), None)
            if found is None:
                known = ", ".join(k.id for k in keys) or "none"
                raise TaoInputError(f"no key {key_id!r} in {self.path} (its keys: {known}; tao keys list shows them)")
            if not found.active:
                return found
            revoked = replace(found, revoked=_now())
            self._save([revoked if k.id == key_id else k for k in keys])
        return revoked

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TaoWriteError(e.errno, f"cannot lock the key store {self.path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _save(self, keys: list[ApiKey]) -> None:
        data = json.dumps({"version": STORE_VERSION, "keys": [asdict(k) for k in keys]}, indent=2) + "\n"
        try:
            write_file(self.path, data, mode=0o600)  # a complete, fsynced file renamed into place
        except TaoWriteError as e:
            raise TaoWriteError(e.errno, f"{e}; the key store's previous contents are unchanged") from e


class LiveKeys:
    """A running server's view of a :class:`KeyStore`: reread whenever the file changes (its inode, size,
    or modification time), checked on every lookup, so creates and revokes count without a restart."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._seen: tuple[int, ...] | None = None
        self._keys: list[ApiKey] = []

    def keys(self) -> list[ApiKey]:
        """The current keys; a file turned unreadable or corrupt raises TaoInputError (the server then
        refuses requests rather than trust stale keys)."""
        try:
            st = os.stat(self.store.path)
            seen: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            seen = ()
        except OSError as e:
            raise TaoInputError(f"cannot read the key store {self.store.path}: {e.strerror or e}") from None
        if seen != self._seen:
            self._keys = self.store.load()
            self._seen = seen
        return self._keys

    def has_api_key(self) -> bool:
        """Whether any valid key of role ``api`` exists (the loopback server is open until one does)."""
        return any(k.active and k.role == "api" for k in self.keys())

    def find(self, key: str) -> ApiKey | None:
        """The stored key ``key`` is, revoked or not; None when it is unknown."""
        presented = digest(key)
        found = None
        for k in self.keys():  # every digest is compared, in constant time each
            if hmac.compare_digest(presented, k.sha256):
                found = k
        return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parse(raw: bytes, path: Path) -> list[ApiKey]:
    fix = f"fix or remove {path} (tao keys create starts a new one)"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise TaoInputError(f"the key store {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise TaoInputError(f"the key store {path} is not a key store (expected an object with a \"keys\" array); {fix}")
    if data.get("version") != STORE_VERSION:
        raise TaoInputError(f"the key store {path} has version {data.get('version')!r}; this tao reads version "
                            f"{STORE_VERSION}")
    keys = [_entry(item, i, path, fix) for i, item in enumerate(data["keys"])]
    for field in ("id", "sha256"):  # one key, two entries: which role, rate or revocation counts is a guess
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            j = first.setdefault(getattr(k, field), i)
            if j != i:
                raise TaoInputError(f"the key store {path}: keys[{j}] and keys[{i}] have the same {field}; {fix}")
    return keys


def _entry(item: Any, i: int, path: Path, fix: str) -> ApiKey:
    where = f"the key store {path}, keys[{i}]"
    if not isinstance(item, dict) or set(item) != set(_FIELDS):
        raise TaoInputError(f"{where} must be an object with exactly the fields {sorted(_FIELDS)}; {fix}")
    for name, kind in _FIELDS.items():
        if not isinstance(item[name], kind) or isinstance(item[name], bool):
            raise TaoInputError(f"{where}.{name} has the wrong type ({type(item[name]).__name__}); {fix}")
    if item["role"] not in ROLES:
        raise TaoInputError(f"{where}.role must be one of {list(ROLES)}, got {item['role']!r}; {fix}")
    if not re.fullmatch(r"[0-9a-f]{64}", item["sha256"]):
        raise TaoInputError(f"{where}.sha256 is not a hex SHA-256 digest; {fix}")
    if item["rate_limit"] is not None and item["rate_limit"] < 0:
        raise TaoInputError(f"{where}.rate_limit must be >= 0, got {item['rate_limit']}; {fix}")
    return ApiKey(**item)
