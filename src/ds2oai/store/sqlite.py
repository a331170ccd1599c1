"""`SQLiteResponseStore`: the default store, one SQLite file shared by the gateway's processes.

Stdlib `sqlite3` run in worker threads (`asyncio.to_thread`), so the event loop never waits on
disk. One table, `responses(id TEXT PRIMARY KEY, created_at INTEGER, body BLOB)`, `body` being
the JSON document of `ds2oai.store.base.encode_item`.

Concurrency:
- Within a process: one connection, opened on first use, guarded by a `threading.Lock`. A
  `sqlite3.Connection` must not be used by two threads at once, and thread-local connections
  would be spread over the executor's threads where `close()` cannot reach them. SQLite
  serialises writers to a file anyway and every operation here is one short statement.
- Across processes (`server.workers > 1`, or several gateways on one host): WAL mode (readers
  never block the writer), `busy_timeout` (a writer waits for the lock instead of failing with
  SQLITE_BUSY), and `BEGIN IMMEDIATE` for the one multi-statement write, so a transaction takes
  the write lock up front instead of failing to upgrade a read lock. WAL needs a local
  filesystem: do not put `data_dir` on NFS; use Redis for several machines.
- `synchronous = NORMAL`: in WAL mode a power cut may lose the last commits but never corrupts
  the file; stored responses are a convenience, not a ledger.

Expiry: an item is invisible once `created_at + ttl_seconds` has passed (0 = never expires);
each `put` also deletes up to `PURGE_BATCH` such rows through an index on `created_at`, so the
file does not grow without bound and no put does unbounded work.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from ds2oai.store.base import StoredResponse, StoreError, decode_item, encode_item

__all__ = ["DB_FILENAME", "PURGE_BATCH", "SQLiteResponseStore"]

DB_FILENAME: Final = "responses.sqlite3"
PURGE_BATCH: Final = 500

_T = TypeVar("_T")
_NO_CUTOFF: Final = -(2**63)  # the smallest SQLite integer: nothing is at or below it

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS responses ("
    " id TEXT PRIMARY KEY NOT NULL,"
    " created_at INTEGER NOT NULL,"
    " body BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at)",
)


class SQLiteResponseStore:
    """Stored responses in the SQLite file `path`; its directory is created on first use."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl_seconds: int = 0,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._ttl = ttl_seconds
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SQLiteResponseStore({str(self.path)!r})"

    # -- the ResponseStore interface -------------------------------------------------------

    async def put(self, item: StoredResponse) -> None:
        body = encode_item(item)
        await self._run("put", self._put, item.id, item.created_at, body)

    async def get(self, response_id: str) -> StoredResponse | None:
        body = await self._run("get", self._get, response_id)
        return None if body is None else decode_item(body, response_id)

    async def delete(self, response_id: str) -> bool:
        return await self._run("delete", self._delete, response_id)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    # -- worker-thread side ----------------------------------------------------------------

    async def _run(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.to_thread(self._locked, op, fn, *args)

    def _locked(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError(f"sqlite store {self.path}: {op} after close()")
            try:
                return fn(self._connection(), *args)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {op} failed: {exc}") from exc
            except OSError as exc:
                raise StoreError(f"sqlite store {self.path}: {op} failed: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; the one multi-statement write uses BEGIN IMMEDIATE.
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,  # used from executor threads, one at a time (the lock)
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"sqlite store {self.path}: cannot switch to WAL mode ({mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _cutoff(self) -> int:
        """Rows with `created_at` at or below this are expired."""
        return _NO_CUTOFF if self._ttl <= 0 else int(self._clock()) - self._ttl

    def _put(
        self, conn: sqlite3.Connection, response_id: str, created_at: int, body: bytes
    ) -> None:
        cutoff = self._cutoff()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._ttl > 0:
                conn.execute(
                    "DELETE FROM responses WHERE id IN"
                    " (SELECT id FROM responses WHERE created_at <= ? LIMIT ?)",
                    (cutoff, PURGE_BATCH),
                )
            conn.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, body) VALUES (?, ?, ?)",
                (response_id, created_at, body),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _get(self, conn: sqlite3.Connection, response_id: str) -> bytes | None:
        row = conn.execute(
            "SELECT body FROM responses WHERE id = ? AND created_at > ?",
            (response_id, self._cutoff()),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _delete(self, conn: sqlite3.Connection, response_id: str) -> bool:
        # An expired row stays for the purge: it is already invisible, and not "deleted" here.
        cursor = conn.execute(
            "DELETE FROM responses WHERE id = ? AND created_at > ?",
            (response_id, self._cutoff()),
        )
        return cursor.rowcount > 0

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: close failed: {exc}") from exc
