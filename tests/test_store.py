"""The stored-responses store: one set of behaviours, checked on memory, SQLite and real Redis.

The Redis tests run against a real `redis-server` (`tests/redis_server.py`), started once per
session and only when a Redis test is selected.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from ds2oai.config import config_from_mapping
from ds2oai.errors import ConfigError, GatewayError
from ds2oai.store import (
    MemoryResponseStore,
    ResponseStore,
    SQLiteResponseStore,
    StoreConfig,
    StoredResponse,
    StoreError,
    open_store,
)
from ds2oai.store.base import redact_url, url_secrets
from ds2oai.store.redis import KEY_PREFIX, RedisResponseStore
from tests.redis_server import RedisServer, free_port

OpenStore = Callable[..., ResponseStore]

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (skipped without one; see redis_server.py)."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def open_test_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OpenStore]:
    """`open_test_store(**StoreConfig overrides)`; every store opened is closed afterwards.

    SQLite stores share `tmp_path/data`, Redis stores share the session's server, so two stores
    opened in one test see the same data, as two gateway workers would.
    """
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    opened: list[ResponseStore] = []

    def open_(**overrides: Any) -> ResponseStore:
        settings: dict[str, Any] = {
            "backend": backend,
            "data_dir": str(tmp_path / "data"),
            "redis_url": redis_url,
        }
        settings.update(overrides)
        store = open_store(StoreConfig(**settings))
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


def new_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def make_item(response_id: str | None = None, *, created_at: int | None = None) -> StoredResponse:
    rid = response_id or new_id()
    now = int(time.time()) if created_at is None else created_at
    return StoredResponse(
        id=rid,
        created_at=now,
        response={
            "id": rid,
            "object": "response",
            "created_at": now,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": "Grüße 👋 — 你好\u2028next\x00end",
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            ],
            "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
            "temperature": 0.7,
            "previous_response_id": None,
            "metadata": {"nested": {"deeper": [1, 2.5, True, None, {"k": "v"}]}},
        },
        input_items=[
            {
                "id": "msg_in_1",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": 'Héllo "quoted" \\ back'}],
            }
        ],
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": 'Héllo "quoted" \\ back'},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "thinking… 🤔",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
                    }
                ],
            },
        ],
    )


# -- the same behaviour on every backend ---------------------------------------------------


async def test_get_returns_what_put_stored_including_unicode_and_nesting(
    open_test_store: OpenStore,
) -> None:
    store = open_test_store()
    item = make_item()
    await store.put(item)
    assert await store.get(item.id) == item


async def test_get_unknown_id_returns_none(open_test_store: OpenStore) -> None:
    store = open_test_store()
    assert await store.get(new_id()) is None


async def test_delete_reports_whether_the_item_existed(open_test_store: OpenStore) -> None:
    store = open_test_store()
    item = make_item()
    await store.put(item)
    assert await store.delete(item.id) is True
    assert await store.get(item.id) is None
    assert await store.delete(item.id) is False
    assert await store.delete(new_id()) is False


async def test_put_with_same_id_replaces_the_item(open_test_store: OpenStore) -> None:
    store = open_test_store()
    first = make_item()
    second = StoredResponse(
        id=first.id,
        created_at=first.created_at + 1,
        response={"id": first.id, "status": "incomplete"},
        input_items=[],
        messages=[{"role": "user", "content": "again"}],
    )
    await store.put(first)
    await store.put(second)
    assert await store.get(first.id) == second


async def test_stored_item_is_a_snapshot_not_shared_with_the_caller(
    open_test_store: OpenStore,
) -> None:
    store = open_test_store()
    item = make_item()
    expected = make_item(item.id, created_at=item.created_at)
    await store.put(item)
    item.response["status"] = "mutated after put"
    item.messages.append({"role": "user", "content": "mutated"})
    got = await store.get(item.id)
    assert got == expected
    assert got is not None
    got.response["status"] = "mutated after get"
    assert await store.get(item.id) == expected


async def test_concurrent_puts_from_many_tasks_all_land(open_test_store: OpenStore) -> None:
    store = open_test_store()
    items = [make_item() for _ in range(200)]
    await asyncio.gather(*(store.put(item) for item in items))
    got = await asyncio.gather(*(store.get(item.id) for item in items))
    assert got == items


async def test_unserialisable_item_is_a_store_error(open_test_store: OpenStore) -> None:
    store = open_test_store()
    item = StoredResponse(
        id=new_id(), created_at=0, response={"x": object()}, input_items=[], messages=[]
    )
    with pytest.raises(StoreError, match="cannot be stored as JSON"):
        await store.put(item)


async def test_store_used_after_close_raises_store_error(open_test_store: OpenStore) -> None:
    store = open_test_store()
    item = make_item()
    await store.put(item)
    await store.close()
    await store.close()  # idempotent
    calls = (lambda: store.put(item), lambda: store.get(item.id), lambda: store.delete(item.id))
    for call in calls:
        with pytest.raises(StoreError, match=r"after close\(\)"):
            await call()


async def test_store_error_is_a_gateway_error() -> None:
    assert issubclass(StoreError, GatewayError)


# -- backends shared between processes -----------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
async def test_two_stores_on_one_backend_see_each_others_writes(
    open_test_store: OpenStore,
) -> None:
    worker_a, worker_b = open_test_store(), open_test_store()
    item = make_item()
    await worker_a.put(item)
    assert await worker_b.get(item.id) == item
    assert await worker_b.delete(item.id) is True
    assert await worker_a.get(item.id) is None
    items = [make_item() for _ in range(50)]
    await asyncio.gather(*(w.put(i) for w, i in zip([worker_a, worker_b] * 25, items, strict=True)))
    assert await asyncio.gather(*(worker_a.get(i.id) for i in items)) == items


_WRITER = """
import asyncio, sys
from ds2oai.store import SQLiteResponseStore, StoredResponse

async def main() -> None:
    store = SQLiteResponseStore(sys.argv[1])
    for n in range(int(sys.argv[2])):
        rid = f"resp_child_{n}"
        await store.put(StoredResponse(rid, 1_700_000_000, {"n": n}, [], []))
        assert (await store.get(rid)) is not None
    await store.close()

asyncio.run(main())
"""


async def test_sqlite_file_shared_with_a_writer_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "data" / "responses.sqlite3"
    store = SQLiteResponseStore(path, ttl_seconds=0)
    await store.put(make_item())  # create the file and switch it to WAL before the race
    count = 200
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), str(count)
    )
    try:
        mine = [make_item() for _ in range(count)]
        for item in mine:
            await store.put(item)
        assert await asyncio.wait_for(child.wait(), timeout=60) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    for n in range(count):
        got = await store.get(f"resp_child_{n}")
        assert got is not None
        assert got.response == {"n": n}
    assert await asyncio.gather(*(store.get(i.id) for i in mine)) == mine
    await store.close()


# -- expiry --------------------------------------------------------------------------------


async def test_redis_item_expires_after_ttl(redis_url: str) -> None:
    store = RedisResponseStore(redis_url, ttl_seconds=1)
    try:
        item = make_item()
        await store.put(item)
        started = time.monotonic()
        assert await store.get(item.id) == item
        while await store.get(item.id) is not None:
            assert time.monotonic() - started < 5, "item outlived its 1 s ttl"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started > 0.5
        assert await store.delete(item.id) is False
    finally:
        await store.close()


async def test_redis_keys_carry_the_configured_ttl(redis_url: str) -> None:
    store = open_store(StoreConfig(backend="redis", redis_url=redis_url))
    forever = open_store(StoreConfig(backend="redis", redis_url=redis_url, ttl_seconds=0))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        item, kept = make_item(), make_item()
        await store.put(item)
        await forever.put(kept)
        ttl = await client.ttl(KEY_PREFIX + item.id)
        assert 30 * 24 * 3600 - 60 < ttl <= 30 * 24 * 3600
        assert await client.ttl(KEY_PREFIX + kept.id) == -1  # no expiry
        await forever.delete(kept.id)
    finally:
        await client.aclose()
        await store.close()
        await forever.close()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_item_expires_ttl_seconds_after_its_created_at(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    store: ResponseStore
    if kind == "memory":
        store = MemoryResponseStore(ttl_seconds=60, clock=clock)
    else:
        store = SQLiteResponseStore(tmp_path / "r.sqlite3", ttl_seconds=60, clock=clock)
    try:
        item = make_item(created_at=1_000_000)
        await store.put(item)
        clock.now = 1_000_059.9
        assert await store.get(item.id) == item
        clock.now = 1_000_060.0
        assert await store.get(item.id) is None
        assert await store.delete(item.id) is False
    finally:
        await store.close()


def sqlite_ids(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM responses")}
    finally:
        conn.close()


async def test_sqlite_put_purges_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    clock = FakeClock(1_000_000.0)
    store = SQLiteResponseStore(path, ttl_seconds=60, clock=clock)
    try:
        old, fresh = make_item(created_at=1_000_000), make_item(created_at=1_000_100)
        await store.put(old)
        clock.now = 1_000_100.0
        assert sqlite_ids(path) == {old.id}  # expired but not yet purged
        await store.put(fresh)
        assert sqlite_ids(path) == {fresh.id}
    finally:
        await store.close()


async def test_memory_put_frees_expired_items() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryResponseStore(ttl_seconds=60, clock=clock)
    try:
        for second in range(600):  # one put a second for ten minutes, none read back
            clock.now = 1_000_000.0 + second
            await store.put(make_item(created_at=int(clock.now)))
        assert len(store) == 60
    finally:
        await store.close()


async def test_memory_store_honours_max_items() -> None:
    store = open_store(StoreConfig(backend="memory", max_items=2))
    a, b, c = make_item(), make_item(), make_item()
    await store.put(a)
    await store.put(b)
    await store.put(a)  # a is now the most recent
    await store.put(c)
    assert await store.get(b.id) is None
    assert await store.get(a.id) == a
    assert await store.get(c.id) == c
    await store.close()


# -- SQLite files --------------------------------------------------------------------------


async def test_sqlite_data_dir_is_created_on_first_use_in_wal_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b" / "c"
    store = open_store(StoreConfig(backend="sqlite", data_dir=str(data_dir)))
    assert not data_dir.exists()  # opening does no I/O
    try:
        item = make_item()
        await store.put(item)
        db = data_dir / "responses.sqlite3"
        assert db.is_file()
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            conn.close()
        assert await store.get(item.id) == item
    finally:
        await store.close()


async def test_sqlite_unusable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_store(StoreConfig(backend="sqlite", data_dir=str(blocker / "data")))
    try:
        with pytest.raises(StoreError, match="sqlite store"):
            await store.get(new_id())
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
async def test_corrupt_stored_document_is_a_store_error(
    backend: str, open_test_store: OpenStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = open_test_store()
    item = make_item()
    await store.put(item)
    if backend == "sqlite":
        conn = sqlite3.connect(tmp_path / "data" / "responses.sqlite3")
        try:
            with conn:
                conn.execute("UPDATE responses SET body = ? WHERE id = ?", (b"{not json", item.id))
        finally:
            conn.close()
    else:
        client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
        try:
            await client.set(KEY_PREFIX + item.id, b'{"v": 99}')
        finally:
            await client.aclose()
    with pytest.raises(StoreError, match=item.id):
        await store.get(item.id)


# -- credentials never leak ----------------------------------------------------------------


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize(
    "userinfo", [f":{PASSWORD}", f"alice:{PASSWORD}", f"alice:{PASSWORD.replace('P', '%50')}"]
)
async def test_redis_error_does_not_leak_the_url_password(userinfo: str) -> None:
    url = f"redis://{userinfo}@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = open_store(StoreConfig(backend="redis", redis_url=url))
    assert PASSWORD not in repr(store)
    try:
        calls = (
            lambda: store.put(make_item()),
            lambda: store.get(new_id()),
            lambda: store.delete(new_id()),
        )
        for call in calls:
            with pytest.raises(StoreError) as info:
                await call()
            assert "127.0.0.1" in str(info.value)
            assert_no_secret(info.value, PASSWORD, userinfo.partition(":")[2])
    finally:
        await store.close()


async def test_redis_with_password_works_and_a_wrong_one_does_not_leak() -> None:
    with RedisServer(password="right-Pa55") as server:
        good = RedisResponseStore(server.url)
        bad = RedisResponseStore(server.url.replace("right-Pa55", PASSWORD))
        try:
            item = make_item()
            await good.put(item)
            assert await good.get(item.id) == item
            with pytest.raises(StoreError) as info:
                await bad.get(item.id)
            assert_no_secret(info.value, PASSWORD, "right-Pa55")
        finally:
            await good.close()
            await bad.close()


@pytest.mark.parametrize(
    "url",
    [
        f"http://:{PASSWORD}@127.0.0.1:6379/0",
        f"redis://:{PASSWORD}@127.0.0.1:notaport/0",
        f"unix:///tmp/redis.sock?password={PASSWORD}&db=zero",
    ],
)
async def test_invalid_redis_url_is_a_store_error_without_the_password(url: str) -> None:
    try:
        store = open_store(StoreConfig(backend="redis", redis_url=url))
    except StoreError as exc:
        assert_no_secret(exc, PASSWORD)
        return
    try:  # some URLs only fail on use
        with pytest.raises(StoreError) as info:
            await store.get(new_id())
        assert_no_secret(info.value, PASSWORD)
    finally:
        await store.close()


def test_redact_url_hides_passwords() -> None:
    assert redact_url(f"redis://:{PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url(f"rediss://bob:{PASSWORD}@[::1]:6380/2") == "rediss://bob:***@[::1]:6380/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert PASSWORD not in redact_url(f"unix:///s.sock?password={PASSWORD}")
    # A password written without its colon reads as a user name: masked all the same.
    assert redact_url(f"redis://{PASSWORD}@h:6379/0") == "redis://***@h:6379/0"
    assert url_secrets(f"redis://{PASSWORD}@h:6379/0") == [PASSWORD]


# -- configuration -------------------------------------------------------------------------


def test_a_store_redis_url_that_is_not_one_is_refused_at_load() -> None:
    data = {"store": {"backend": "redis", "redis_url": f"notaurl://:{PASSWORD}@h"}}
    with pytest.raises(ConfigError, match=r"store\.redis_url: must start with") as info:
        config_from_mapping(data)
    assert PASSWORD not in str(info.value)


def test_store_config_defaults_are_a_sqlite_file_under_data() -> None:
    config = StoreConfig()
    assert (config.backend, config.data_dir, config.ttl_seconds) == ("sqlite", "data", 2592000)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "postgres"}, "store.backend"),
        ({"backend": "redis"}, "store.redis_url"),
        ({"ttl_seconds": -1}, "store.ttl_seconds"),
        ({"max_items": -1}, "store.max_items"),
        ({"data_dir": ""}, "store.data_dir"),
    ],
)
def test_store_config_rejects_bad_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StoreConfig(**settings)


def test_store_config_repr_hides_the_redis_url() -> None:
    config = StoreConfig(backend="redis", redis_url=f"redis://:{PASSWORD}@h:6379/0")
    assert PASSWORD not in repr(config)


def test_redis_server_helper_leaves_nothing_running() -> None:
    with RedisServer() as server:
        proc = server.proc
        assert proc is not None
        port = server.port
    assert proc.returncode is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
