"""`RedisResponseStore`: stored responses shared by gateway processes on several machines.

One key per item, `ds2oai:resp:{id}`, holding the JSON document of
`ds2oai.store.base.encode_item`; `SET ... EX ttl_seconds` (no expiry when 0), `GET`, `DEL`.
Expiry is Redis's own, counted from the `put`.

The client is `redis.asyncio.Redis.from_pool(BlockingConnectionPool.from_url(url, ...))`, not
`Redis.from_url`: the latter's pool raises `MaxConnectionsError` at once when more than
`max_connections` (default 100) commands are in flight, which a busy gateway reaches; the
blocking pool makes them wait up to `pool_timeout` for a connection instead. Timeouts are
explicit and the retry is short (the library's default of 10 retries would hold a request for
seconds when Redis is down). It connects lazily, so constructing the store does no I/O;
`close()` closes the client and its pool.

SECURITY: `redis_url` may carry a password. Error messages show `redact_url(url)` and the
driver's message with every password scrubbed; the driver's exception is not chained (`from
None`), so a traceback cannot show it either.
"""

from __future__ import annotations

from typing import Final

import redis.asyncio
import redis.exceptions

from ds2oai.redis_client import connect
from ds2oai.store.base import (
    StoredResponse,
    StoreError,
    decode_item,
    encode_item,
    redact_url,
    scrub,
    url_secrets,
)

__all__ = ["KEY_PREFIX", "RedisResponseStore"]

KEY_PREFIX: Final = "ds2oai:resp:"


class RedisResponseStore:
    """Stored responses in the Redis at `url` (`redis://[[user]:password@]host:port/db`)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int = 0,
        key_prefix: str = KEY_PREFIX,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        retries: int = 2,
        max_connections: int = 64,
        pool_timeout: float = 5.0,
    ) -> None:
        self._where = redact_url(url)
        self._secrets = url_secrets(url)
        self._ttl = ttl_seconds
        self._prefix = key_prefix
        self._closed = False
        try:
            self._client = connect(
                url,
                max_connections=max_connections,
                pool_timeout=pool_timeout,
                connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                retries=retries,
                backoff_base=0.05,
                backoff_cap=0.5,
            )
        except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
            raise StoreError(self._message("open", exc)) from None

    def __repr__(self) -> str:
        return f"RedisResponseStore({self._where!r})"

    def key(self, response_id: str) -> str:
        return self._prefix + response_id

    def _message(self, op: str, exc: BaseException) -> str:
        detail = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        return f"redis store {self._where}: {op} failed: {detail}"

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise StoreError(f"redis store {self._where}: {op} after close()")

    async def put(self, item: StoredResponse) -> None:
        self._check_open("put")
        body = encode_item(item)
        try:
            await self._client.set(self.key(item.id), body, ex=self._ttl if self._ttl > 0 else None)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(self._message("put", exc)) from None

    async def get(self, response_id: str) -> StoredResponse | None:
        self._check_open("get")
        try:
            body = await self._client.get(self.key(response_id))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(self._message("get", exc)) from None
        if body is None:
            return None
        if not isinstance(body, bytes | bytearray | memoryview | str):
            raise StoreError(f"redis store {self._where}: get returned {type(body).__name__}")
        return decode_item(body, response_id)

    async def delete(self, response_id: str) -> bool:
        self._check_open("delete")
        try:
            removed = await self._client.delete(self.key(response_id))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(self._message("delete", exc)) from None
        return bool(removed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(self._message("close", exc)) from None
