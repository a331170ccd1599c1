"""The stored-responses interface: `StoredResponse`, `ResponseStore`, `StoreConfig`, `StoreError`.

A stored response is what `store: true` keeps (SPEC §5): the Response object as returned to the
client, this request's input items, and the full DeepSeek chat conversation up to and including
the assistant's output, which is what `previous_response_id` continues from.

Every backend keeps an item as one JSON document (`encode_item` / `decode_item`, orjson via
`ds2oai.jsonutil`), so all of them give the same answers: `get` returns a fresh copy, never an
object shared with the caller of `put`. Every backend failure is a `StoreError` whose message
never contains credentials (`redact_url`, `scrub`). Nothing here imports a backend driver.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from ds2oai import jsonutil
from ds2oai.errors import ConfigError, GatewayError

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "MemoryResponseStore",
    "ResponseStore",
    "StoreConfig",
    "StoreError",
    "StoredResponse",
    "decode_item",
    "encode_item",
    "redact_url",
    "scrub",
    "url_secrets",
]

BACKENDS: Final = ("sqlite", "redis", "memory")
FORMAT_VERSION: Final = 1


class StoreError(GatewayError):
    """A stored-responses backend failed (unreachable, locked too long, corrupt data, closed).

    The message names the backend and the operation, never a password from a URL.
    """


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """`[store]`: where stored responses live.

    `backend`: "sqlite" (default, a file at `{data_dir}/responses.sqlite3`), "redis" (shared by
    several processes or machines; `redis_url`), or "memory" (one process, lost on restart;
    `max_items` bounds it, 0 = unlimited). `ttl_seconds`: how long an item lives, 0 = forever.
    """

    backend: str = "sqlite"
    data_dir: str = "data"
    # SECURITY: the URL may carry a password (redis://:pw@host); keep it out of reprs.
    redis_url: str = field(default="", repr=False)
    ttl_seconds: int = 30 * 24 * 3600
    max_items: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"store.backend: one of {', '.join(BACKENDS)}")
        if self.backend == "redis" and not self.redis_url:
            raise ConfigError("store.redis_url: required when store.backend = redis")
        if self.backend == "sqlite" and not self.data_dir:
            raise ConfigError("store.data_dir: must not be empty")
        if self.ttl_seconds < 0:
            raise ConfigError("store.ttl_seconds: must be >= 0 (0 = never expire)")
        if self.max_items < 0:
            raise ConfigError("store.max_items: must be >= 0 (0 = unlimited)")


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response; see the module docstring for what each part is for."""

    id: str
    created_at: int
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    owner: str | None = None  # hash of the client key that created it (None without auth)


class ResponseStore(Protocol):
    """The one async interface every backend implements.

    `put` inserts or replaces the item with `item.id`; `get` returns None for an unknown or
    expired id; `delete` returns True if a live item was removed. `close` is idempotent; any
    other call after it raises `StoreError`. Every failure is a `StoreError`.
    """

    async def put(self, item: StoredResponse) -> None: ...

    async def get(self, response_id: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemoryResponseStore:
    """One process's dict of encoded items, for tests and `backend = "memory"`.

    Items are kept encoded, so the memory backend behaves like the others (a `get` is a copy;
    an item that is not JSON fails at `put`). Expiry: an item is gone `ttl_seconds` after its
    `created_at` (0 = never). `max_items` > 0 evicts the least recently put items beyond it.
    All methods run on the event loop without awaiting, so no lock is needed.
    """

    def __init__(
        self,
        *,
        ttl_seconds: int = 0,
        max_items: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl_seconds
        self._max_items = max_items
        self._clock = clock
        self._items: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store: used after close()")

    def _expired(self, created_at: int) -> bool:
        # The same rule as the SQLite store: whole seconds, expired at created_at + ttl.
        return self._ttl > 0 and created_at <= int(self._clock()) - self._ttl

    async def put(self, item: StoredResponse) -> None:
        self._check_open()
        body = encode_item(item)
        self._items.pop(item.id, None)
        self._items[item.id] = (item.created_at, body)
        # Kept in put order, which is creation order within a few seconds: the expired ones
        # are at the front, so a put frees them (otherwise only a `get` of each would).
        while self._items:
            created_at, _ = next(iter(self._items.values()))
            if not self._expired(created_at):
                break
            self._items.popitem(last=False)
        if self._max_items > 0:
            while len(self._items) > self._max_items:
                self._items.popitem(last=False)

    async def get(self, response_id: str) -> StoredResponse | None:
        self._check_open()
        entry = self._items.get(response_id)
        if entry is None:
            return None
        created_at, body = entry
        if self._expired(created_at):
            del self._items[response_id]
            return None
        return decode_item(body, response_id)

    async def delete(self, response_id: str) -> bool:
        self._check_open()
        entry = self._items.pop(response_id, None)
        return entry is not None and not self._expired(entry[0])

    async def close(self) -> None:
        self._closed = True
        self._items.clear()


def encode_item(item: StoredResponse) -> bytes:
    """The JSON document a backend stores for `item`."""
    doc = {
        "v": FORMAT_VERSION,
        "id": item.id,
        "created_at": item.created_at,
        "response": item.response,
        "input_items": item.input_items,
        "messages": item.messages,
        "owner": item.owner,
    }
    try:
        return jsonutil.dumps(doc)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise StoreError(f"response {item.id!r} cannot be stored as JSON: {exc}") from None


def decode_item(body: bytes | bytearray | memoryview | str, response_id: str) -> StoredResponse:
    """The item from a stored document; `StoreError` if the document is not one we wrote."""
    try:
        doc = jsonutil.loads(body)
    except jsonutil.JSONDecodeError:
        raise StoreError(f"stored response {response_id!r} is not valid JSON") from None
    if (
        not isinstance(doc, dict)
        or doc.get("v") != FORMAT_VERSION
        or doc.get("id") != response_id
        or isinstance(doc.get("created_at"), bool)
        or not isinstance(doc.get("created_at"), int)
        or not isinstance(doc.get("response"), dict)
        or not isinstance(doc.get("input_items"), list)
        or not isinstance(doc.get("messages"), list)
    ):
        raise StoreError(f"stored response {response_id!r} has an unknown format")
    return StoredResponse(
        id=doc["id"],
        created_at=doc["created_at"],
        response=doc["response"],
        input_items=doc["input_items"],
        messages=doc["messages"],
        owner=doc["owner"] if isinstance(doc.get("owner"), str) else None,
    )


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***` (`redis://:***@host:6379/0`), for messages; a
    user name without a password is masked too."""
    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            # SECURITY: a password can also hide in the query (`?password=...`).
            return url.partition("?")[0] + "?***" if parts.query else url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        if parts.password is None:
            # `redis://secret@host`: a password written without its colon; Redis takes it
            # for a user name, but it was meant as the password.
            netloc = f"***@{host}{port}"
        else:
            netloc = f"{parts.username or ''}:***@{host}{port}"
        query = "***" if parts.query else ""
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable url>"


def url_secrets(url: str) -> list[str]:
    """The passwords in `url` (userinfo or `?password=`; a user name without a password), raw
    and percent-decoded, for `scrub`."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        # A lone user name may be a password written without its colon (see redact_url).
        candidates: list[str | None] = [
            parts.password if parts.password is not None else parts.username
        ]
        for pair in parts.query.split("&"):
            key, _, value = pair.partition("=")
            if key.lower() == "password":
                candidates.append(value)
    except ValueError:
        # Not parsable: fall back to the whole userinfo part, whatever it is.
        candidates = [url.rpartition("@")[0].partition("://")[2]] if "@" in url else []
    for candidate in candidates:
        if candidate:
            found.extend({candidate, unquote(candidate)})
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text
