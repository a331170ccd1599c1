"""Stored responses (SPEC §5): one async interface, a SQLite default, Redis for shared state.

Usage, typically in an aiohttp `cleanup_ctx`::

    store = open_store(config.store)   # no I/O yet: files and connections open on first use
    try:
        await store.put(StoredResponse(...))
        item = await store.get(response_id)    # None when unknown or expired
    finally:
        await store.close()

Every failure is a `StoreError` (a `GatewayError`) whose message never contains a password.
The `redis` package is imported only when the Redis backend is chosen.
"""

from __future__ import annotations

from pathlib import Path

from ds2oai.store.base import (
    MemoryResponseStore,
    ResponseStore,
    StoreConfig,
    StoredResponse,
    StoreError,
)
from ds2oai.store.sqlite import DB_FILENAME, SQLiteResponseStore

__all__ = [
    "MemoryResponseStore",
    "ResponseStore",
    "SQLiteResponseStore",
    "StoreConfig",
    "StoreError",
    "StoredResponse",
    "open_store",
]


def open_store(config: StoreConfig) -> ResponseStore:
    """The store `config` describes. Does no I/O; an unusable redis URL is a `StoreError`."""
    if config.backend == "memory":
        return MemoryResponseStore(ttl_seconds=config.ttl_seconds, max_items=config.max_items)
    if config.backend == "redis":
        try:
            from ds2oai.store.redis import RedisResponseStore
        except ImportError as exc:  # pragma: no cover - redis is a declared dependency
            raise StoreError(f"store.backend = redis needs the redis package ({exc})") from None
        return RedisResponseStore(config.redis_url, ttl_seconds=config.ttl_seconds)
    if config.backend == "sqlite":
        return SQLiteResponseStore(
            Path(config.data_dir) / DB_FILENAME, ttl_seconds=config.ttl_seconds
        )
    raise StoreError(f"unknown store backend {config.backend!r}")  # StoreConfig rejects it first
