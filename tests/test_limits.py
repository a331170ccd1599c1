"""Per-key limits: the `limits` middleware against a fake `call_next`, its memory and Redis
backends, the `[limits]` / `[auth.clients.*]` config, and end to end over real sockets.

Redis tests use a real `redis-server` (`tests/redis_server.py`), started once for this module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from ds2oai.chain import Body, Exchange, Reply, Trace, build_middleware
from ds2oai.config import Config, config_from_mapping, load_config
from ds2oai.errors import ClientError, ConfigError
from ds2oai.limits import Decision, KeyRule, LimiterError, MemoryLimiter, open_limiter
from ds2oai.limits.redis import RedisLimiter
from ds2oai.metrics import REGISTRY
from ds2oai.middleware import BUILTINS, BearerAuth, KeyLimits
from ds2oai.middleware.auth import key_id
from ds2oai.middleware.limits import ANONYMOUS, charged_tokens, openai_duration
from tests import conftest
from tests.conftest import GatewayFactory
from tests.fault_upstream import Close, FaultUpstream, Hang, Reset, sse_script, text_events
from tests.redis_server import RedisServer, free_port

CHAIN = ["auth", "limits", "rate_limit", "retry", "reframe"]
KEY = "sk-limits-client-PLANTED-91c3"
OTHER = "sk-limits-other-PLANTED-07ad"
PASSWORD = "limits-PW-s3cret-42"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_exchange(key: str | None = None, **changes: Any) -> Exchange:
    return conftest.make_exchange(
        request_id=uuid.uuid4().hex, trace=Trace(client_key_id=key), **changes
    )


class Upstream:
    """A fake rest-of-the-chain: a streamed body of `parts` that reports `usage` at its end."""

    def __init__(
        self,
        parts: tuple[bytes, ...] = (b"a", b"b"),
        usage: tuple[int, int] | None = None,
        fail: BaseException | None = None,
        raise_: BaseException | None = None,
    ) -> None:
        self.parts = parts
        self.usage = usage
        self.fail = fail
        self.raise_ = raise_
        self.exchanges: list[Exchange] = []
        self.closed = 0

    async def __call__(self, exchange: Exchange) -> Reply:
        self.exchanges.append(exchange)
        if self.raise_ is not None:
            raise self.raise_
        return Reply(200, {"Content-Type": "text/event-stream"}, self._body(exchange))

    async def _body(self, exchange: Exchange) -> Body:
        try:
            for part in self.parts:
                yield part
            if self.fail is not None:
                raise self.fail
            if self.usage is not None:
                exchange.trace.prompt_tokens, exchange.trace.completion_tokens = self.usage
        finally:
            self.closed += 1


async def drain(reply: Reply) -> bytes:
    assert not isinstance(reply.body, bytes)
    out = b""
    try:
        async for part in reply.body:
            out += part
    finally:
        await reply.body.aclose()
    return out


def limits(rule: KeyRule, clock: Clock | None = None, **kwargs: Any) -> KeyLimits:
    limiter = MemoryLimiter(clock=clock or Clock())
    return KeyLimits(limiter, rule, **kwargs)


async def refused(stage: KeyLimits, exchange: Exchange, upstream: Upstream) -> ClientError:
    with pytest.raises(ClientError) as info:
        await stage(exchange, upstream)
    return info.value


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# =========================================================================== headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0204, "21ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9991, "1m0s"),
        (60, "1m0s"),
        (90.25, "1m30.25s"),
        (360, "6m0s"),
    ],
)
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


# =========================================================================== requests per minute


async def test_requests_per_minute_admits_exactly_the_limit_then_429s() -> None:
    stage = limits(KeyRule(requests_per_minute=3))
    upstream = Upstream()
    remaining = []
    for _ in range(3):
        reply = await stage(make_exchange("k1"), upstream)
        remaining.append(reply.headers["x-ratelimit-remaining-requests"])
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert "x-ratelimit-limit-tokens" not in reply.headers
        await drain(reply)
    assert remaining == ["2", "1", "0"]
    error = await refused(stage, make_exchange("k1"), upstream)
    assert (error.status, error.type, error.code) == (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
    )
    assert error.headers["Retry-After"] == "60"
    assert error.headers["retry-after-ms"] == "60000"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert len(upstream.exchanges) == 3  # the refused request never reached the chain


async def test_the_request_window_slides() -> None:
    clock = Clock()
    stage = limits(KeyRule(requests_per_minute=2), clock)
    upstream = Upstream()
    await drain(await stage(make_exchange("k1"), upstream))
    clock.now += 20
    reply = await stage(make_exchange("k1"), upstream)
    assert reply.headers["x-ratelimit-reset-requests"] == "40s"  # the first leaves in 40 s
    await drain(reply)
    clock.now += 10
    error = await refused(stage, make_exchange("k1"), upstream)
    assert error.headers["Retry-After"] == "30"
    clock.now += 30  # the first request is now exactly a minute old: out of the window
    reply = await stage(make_exchange("k1"), upstream)
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    await drain(reply)
    error = await refused(stage, make_exchange("k1"), upstream)
    assert error.headers["Retry-After"] == "20"


async def test_concurrent_requests_are_admitted_exactly() -> None:
    stage = limits(KeyRule(requests_per_minute=100))
    upstream = Upstream(parts=())

    async def attempt() -> int:
        try:
            await drain(await stage(make_exchange("k1"), upstream))
        except ClientError as exc:
            return exc.status
        return 200

    statuses = await asyncio.gather(*(attempt() for _ in range(300)))
    assert statuses.count(200) == 100
    assert statuses.count(429) == 200


async def test_keys_have_their_own_buckets_and_rules() -> None:
    stage = KeyLimits(
        MemoryLimiter(clock=Clock()),
        KeyRule(requests_per_minute=1),
        {"vip": KeyRule(requests_per_minute=3)},
    )
    upstream = Upstream()
    await drain(await stage(make_exchange("k1"), upstream))
    await refused(stage, make_exchange("k1"), upstream)
    await drain(await stage(make_exchange("k2"), upstream))  # another key, its own bucket
    for _ in range(3):
        await drain(await stage(make_exchange("vip"), upstream))
    await refused(stage, make_exchange("vip"), upstream)


async def test_without_auth_everyone_shares_the_anonymous_bucket() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=5))
    reply = await stage(make_exchange(None), Upstream())
    assert limiter.streams_held(ANONYMOUS) == 1
    await drain(reply)
    assert limiter.streams_held(ANONYMOUS) == 0


async def test_unlimited_keys_pass_untouched() -> None:
    stage = KeyLimits(MemoryLimiter(), KeyRule(), {"vip": KeyRule(requests_per_minute=1)})
    upstream = Upstream()
    exchange = make_exchange("k1")
    reply = await stage(exchange, upstream)
    assert upstream.exchanges == [exchange]
    assert "x-ratelimit-limit-requests" not in reply.headers
    await drain(reply)


async def test_untranslated_upstream_errors_keep_their_headers() -> None:
    stage = limits(KeyRule(requests_per_minute=5))

    async def upstream_error(exchange: Exchange) -> Reply:
        return Reply(500, {"content-type": "text/plain"}, b"boom", from_upstream=True)

    reply = await stage(make_exchange("k1"), upstream_error)
    assert reply.headers == {"content-type": "text/plain"}


# =========================================================================== tokens per minute


async def test_tokens_are_charged_when_the_body_ends() -> None:
    clock = Clock()
    stage = limits(KeyRule(tokens_per_minute=100), clock)
    upstream = Upstream(usage=(30, 80))
    first = await stage(make_exchange("k1"), upstream)
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    # Not charged yet: the answer is still running, its size unknown.
    second = await stage(make_exchange("k1"), Upstream(usage=(1, 1)))
    await drain(first)  # 110 tokens charged now
    await drain(second)  # 2 more
    clock.now += 5
    error = await refused(stage, make_exchange("k1"), upstream)
    assert (error.status, error.code) == (429, "tokens_limit_exceeded")
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers["x-ratelimit-reset-tokens"] == "55s"
    assert error.headers["Retry-After"] == "55"
    assert "used 112" in error.message
    clock.now += 55  # both charges leave the window
    reply = await stage(make_exchange("k1"), upstream)
    assert reply.headers["x-ratelimit-remaining-tokens"] == "100"
    await drain(reply)


async def test_tokens_of_a_complete_answer_are_charged_at_once() -> None:
    stage = limits(KeyRule(tokens_per_minute=10))

    async def complete(exchange: Exchange) -> Reply:
        exchange.trace.prompt_tokens, exchange.trace.completion_tokens = 6, 6
        return Reply.json(200, {"ok": True})

    reply = await stage(make_exchange("k1"), complete)
    assert isinstance(reply.body, bytes)
    assert reply.headers["x-ratelimit-limit-tokens"] == "10"
    await refused(stage, make_exchange("k1"), Upstream())


# =========================================================================== concurrent streams


async def test_a_stream_holds_its_slot_until_its_body_ends() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    upstream = Upstream()
    reply = await stage(make_exchange("k1"), upstream)
    assert reply.headers["x-ratelimit-limit-streams"] == "1"
    assert "x-ratelimit-remaining-streams" not in reply.headers
    assert limiter.streams_held("k1") == 1
    error = await refused(stage, make_exchange("k1"), upstream)
    assert (error.status, error.code) == (429, "concurrency_limit_exceeded")
    assert error.headers["Retry-After"] == "1"
    assert error.headers["x-ratelimit-limit-streams"] == "1"
    assert error.headers["x-ratelimit-remaining-streams"] == "0"
    assert await drain(reply) == b"ab"
    assert limiter.streams_held("k1") == 0
    await drain(await stage(make_exchange("k1"), upstream))


async def test_slot_released_when_the_body_fails() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    reply = await stage(make_exchange("k1"), Upstream(fail=RuntimeError("broken")))
    assert not isinstance(reply.body, bytes)
    assert await anext(reply.body) == b"a"
    assert await anext(reply.body) == b"b"
    with pytest.raises(RuntimeError, match="broken"):
        await anext(reply.body)
    assert limiter.streams_held("k1") == 0  # released before anyone called aclose
    await reply.body.aclose()
    assert limiter.streams_held("k1") == 0


async def test_slot_released_when_closed_before_the_first_item() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1, tokens_per_minute=100))
    upstream = Upstream()
    reply = await stage(make_exchange("k1"), upstream)
    assert limiter.streams_held("k1") == 1
    assert not isinstance(reply.body, bytes)
    await reply.body.aclose()
    await reply.body.aclose()  # idempotent
    assert limiter.streams_held("k1") == 0
    with pytest.raises(StopAsyncIteration):
        await anext(reply.body)


async def test_slot_released_when_closed_mid_stream() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    upstream = Upstream(parts=(b"a", b"b", b"c"))
    reply = await stage(make_exchange("k1"), upstream)
    assert not isinstance(reply.body, bytes)
    assert await anext(reply.body) == b"a"
    await reply.body.aclose()
    assert upstream.closed == 1  # the source was closed too
    assert limiter.streams_held("k1") == 0


@pytest.mark.parametrize(
    "error",
    [RuntimeError("no upstream"), ClientError(502, "x", "y", "z"), asyncio.CancelledError()],
)
async def test_slot_released_when_the_rest_of_the_chain_raises(error: BaseException) -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    with pytest.raises(type(error)):
        await stage(make_exchange("k1"), Upstream(raise_=error))
    assert limiter.streams_held("k1") == 0


async def test_slot_released_when_cancelled_while_waiting_for_the_upstream() -> None:
    limiter = MemoryLimiter(clock=Clock())
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    waiting = asyncio.Event()

    async def slow(exchange: Exchange) -> Reply:
        waiting.set()
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    task = asyncio.create_task(stage(make_exchange("k1"), slow))
    await waiting.wait()
    assert limiter.streams_held("k1") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.streams_held("k1") == 0


async def test_a_long_stream_renews_its_lease() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, lease=10)
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1), renew_every=0.01)
    reply = await stage(make_exchange("k1"), Upstream(parts=(b"a",) * 5))
    assert not isinstance(reply.body, bytes)
    for _ in range(5):
        clock.now += 4  # 20 s in all, twice the lease; the timer renews it meanwhile
        await asyncio.sleep(0.05)
        await anext(reply.body)
    assert limiter.streams_held("k1") == 1
    await reply.body.aclose()
    assert limiter.streams_held("k1") == 0


async def test_a_slow_answer_keeps_its_slot_before_its_first_byte() -> None:
    # A non-streamed answer (or the wait for a stream's head) is longer than the lease: the
    # timer renews the slot all along, so no second request gets in meanwhile.
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, lease=10)
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1), renew_every=0.01)

    async def slow(exchange: Exchange) -> Reply:
        for _ in range(5):
            clock.now += 4
            await asyncio.sleep(0.05)
        assert limiter.streams_held("k1") == 1  # 20 s in, twice the lease
        await refused(stage, make_exchange("k1"), Upstream())
        return Reply(200, {}, b"done")

    reply = await stage(make_exchange("k1"), slow)
    assert reply.body == b"done"
    assert limiter.streams_held("k1") == 0


async def test_an_abandoned_slot_expires_with_its_lease() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, lease=10)
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    reply = await stage(make_exchange("k1"), Upstream())  # never closed: as if the task died
    await refused(stage, make_exchange("k1"), Upstream())
    clock.now += 10
    await drain(await stage(make_exchange("k1"), Upstream()))
    await drain(reply)


# =========================================================================== backend failures


class BrokenLimiter(MemoryLimiter):
    async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Any:
        raise LimiterError("redis limits redis://:***@db:6379/0: acquire failed: refused")


async def test_fail_open_lets_requests_through_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stage = KeyLimits(BrokenLimiter(), KeyRule(requests_per_minute=1), on_backend_error="open")
    before = metric("ds2oai_limits_backend_errors_total", operation="acquire", policy="open")
    upstream = Upstream()
    with caplog.at_level(logging.WARNING, logger="ds2oai.limits"):
        for _ in range(3):
            reply = await stage(make_exchange("k1"), upstream)
            assert "x-ratelimit-limit-requests" not in reply.headers
            await drain(reply)
    assert len(upstream.exchanges) == 3
    after = metric("ds2oai_limits_backend_errors_total", operation="acquire", policy="open")
    assert after - before == 3
    records = [r for r in caplog.records if r.name == "ds2oai.limits"]
    assert len(records) == 1  # throttled: one line per 10 s, with the count
    assert records[0].__dict__["operation"] == "acquire"


async def test_fail_closed_refuses_with_503() -> None:
    stage = KeyLimits(BrokenLimiter(), KeyRule(requests_per_minute=1), on_backend_error="closed")
    upstream = Upstream()
    error = await refused(stage, make_exchange("k1"), upstream)
    assert (error.status, error.code) == (503, "limits_unavailable")
    assert error.headers["Retry-After"] == "1"
    assert upstream.exchanges == []
    assert metric("ds2oai_limits_backend_errors_total", operation="acquire", policy="closed") >= 1


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_unreachable_redis_follows_the_policy_without_showing_the_password(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    limiter = RedisLimiter(url)
    stage = KeyLimits(limiter, KeyRule(requests_per_minute=5), on_backend_error=policy)
    upstream = Upstream()
    try:
        with caplog.at_level(logging.WARNING, logger="ds2oai.limits"):
            if policy == "open":
                await drain(await stage(make_exchange("k1"), upstream))
                assert len(upstream.exchanges) == 1
            else:
                error = await refused(stage, make_exchange("k1"), upstream)
                assert error.status == 503
                assert PASSWORD not in repr(error) + error.message
        [record] = [r for r in caplog.records if r.name == "ds2oai.limits"]
        assert "***" in record.__dict__["error"]
        assert PASSWORD not in caplog.text
        assert PASSWORD not in repr(limiter)
    finally:
        await stage.aclose()


class TimedOutLimiter(MemoryLimiter):
    """A backend whose answer was lost after it ran: the slot is taken, the caller sees an error
    (a Redis reply slower than the socket timeout)."""

    async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Any:
        await super().acquire(key_id, rule, lease_id)
        raise LimiterError("redis limits redis://db:6379/0: acquire failed: Timeout")


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_an_acquire_that_failed_after_running_gives_its_slot_back(policy: str) -> None:
    limiter = TimedOutLimiter(clock=Clock())
    rule = KeyRule(concurrent_streams=1)
    stage = KeyLimits(limiter, rule, on_backend_error=policy)
    upstream = Upstream()
    if policy == "open":
        await drain(await stage(make_exchange("k1"), upstream))
    else:
        assert (await refused(stage, make_exchange("k1"), upstream)).status == 503
    for _ in range(3):  # the release runs as its own task
        await asyncio.sleep(0)
    assert limiter.streams_held("k1") == 0


async def test_a_failed_release_is_counted_and_not_raised() -> None:
    class FailingFinish(MemoryLimiter):
        async def finish(self, key_id: str, rule: KeyRule, lease_id: str, tokens: int) -> None:
            raise LimiterError("finish failed")

    stage = KeyLimits(FailingFinish(), KeyRule(concurrent_streams=1))
    before = metric("ds2oai_limits_backend_errors_total", operation="finish", policy="open")
    assert await drain(await stage(make_exchange("k1"), Upstream())) == b"ab"
    after = metric("ds2oai_limits_backend_errors_total", operation="finish", policy="open")
    assert after - before == 1


# =========================================================================== config


def test_limits_section_and_named_clients(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\n\nfile-key-1\n  file-key-2  \n")
    path = tmp_path / "gw.toml"
    path.write_text(
        f"""
[auth]
api_keys = ["file-list-key"]
key_file = "{key_file}"
[auth.clients.alice]
key = "{KEY}"
models = ["deepseek-chat"]
requests_per_minute = 10
concurrent_streams = 0
[auth.clients.bob]
key_env = "BOB_KEY"
tokens_per_minute = 500
[limits]
requests_per_minute = 60
tokens_per_minute = 1000
concurrent_streams = 4
redis_url = "redis://127.0.0.1:6379/0"
on_redis_error = "closed"
[middleware]
chain = {CHAIN!r}
"""
    )
    env = {
        "BOB_KEY": OTHER,
        "DS2OAI_API_KEYS": "env-key-1, env-key-2,,",
        "DS2OAI_LIMITS_REDIS_URL": f"redis://:{PASSWORD}@10.0.0.1:6379/1",
    }
    config = load_config(path, env=env)
    auth = config.auth
    assert auth.api_keys == (
        "file-list-key",
        "file-key-1",
        "file-key-2",
        "env-key-1",
        "env-key-2",
    )
    assert auth.clients["alice"].key == KEY
    assert auth.clients["alice"].models == ("deepseek-chat",)
    assert auth.clients["bob"].key == OTHER
    assert config.limits.redis_url.endswith("10.0.0.1:6379/1")
    assert config.limits.on_redis_error == "closed"
    for text in (repr(config), str(config)):
        for secret in (KEY, OTHER, PASSWORD, "file-key-1", "env-key-1"):
            assert secret not in text
    stage = KeyLimits.from_config(config)
    assert stage.rule_for(key_id(KEY)) == KeyRule(10, 1000, 0)
    assert stage.rule_for(key_id(OTHER)) == KeyRule(60, 500, 4)
    assert stage.rule_for(key_id("file-key-1")) == KeyRule(60, 1000, 4)
    assert isinstance(stage.limiter, RedisLimiter)
    assert PASSWORD not in repr(stage.limiter)
    names = [m.name for m in build_middleware(config, BUILTINS)]
    assert names == ["auth", "limits", "rate_limit", "retry", "reframe"]


def test_defaults_are_unlimited_and_in_memory() -> None:
    config = Config()
    assert not config.limits.sets_limits()
    assert config.limits.on_redis_error == "open"
    assert isinstance(open_limiter(config.limits), MemoryLimiter)


def test_limits_without_the_limits_stage_refuse_to_start() -> None:
    for data in (
        {"limits": {"requests_per_minute": 5}},
        {"auth": {"clients": {"a": {"key": KEY, "concurrent_streams": 2}}}},
    ):
        with pytest.raises(ConfigError, match="'limits' is not in") as info:
            build_middleware(config_from_mapping(data), BUILTINS)
        assert KEY not in str(info.value)
    # Zero means unlimited: no stage needed.
    build_middleware(config_from_mapping({"limits": {"requests_per_minute": 0}}), BUILTINS)


def test_limits_before_auth_refuses_to_start() -> None:
    config = config_from_mapping(
        {
            "middleware": {"chain": ["limits", "auth", "reframe"]},
            "limits": {"concurrent_streams": 1},
        }
    )
    with pytest.raises(ConfigError, match="after 'auth'"):
        build_middleware(config, BUILTINS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": {"requests_per_minutes": 1}}, "limits.requests_per_minutes: unknown key"),
        ({"limits": {"requests_per_minute": -1}}, "limits.requests_per_minute: must be >= 0"),
        ({"limits": {"tokens_per_minute": "1k"}}, "limits.tokens_per_minute: expected an integer"),
        ({"limits": {"on_redis_error": "maybe"}}, "limits.on_redis_error: one of open, closed"),
        ({"limits": {"redis_url": "127.0.0.1:6379"}}, "limits.redis_url: must start with"),
        (
            {"auth": {"clients": {"a": {"key": "k", "modles": []}}}},
            "auth.clients.a.modles: unknown",
        ),
        ({"auth": {"clients": {"a": {"models": []}}}}, "auth.clients.a: set key or key_env"),
        ({"auth": {"clients": {"a": {"key": "k", "key_env": "K"}}}}, "auth.clients.a.key: set key"),
        ({"auth": {"clients": {"a": {"key": "k", "concurrent_streams": -2}}}}, ">= 0"),
        ({"auth": {"clients": {"a": {"key": "k", "requests_per_minute": 1.5}}}}, "integer"),
        ({"auth": {"clients": {"a": {"key": "k", "models": [""]}}}}, "auth.clients.a.models"),
        ({"auth": {"clients": {"a": "k"}}}, "auth.clients.a: expected a table"),
        ({"auth": {"clients": ["a"]}}, "auth.clients: expected a table"),
        (
            {"auth": {"clients": {"a": {"key": KEY}, "b": {"key": KEY}}}},
            "auth.clients.b: same key as auth.clients.a",
        ),
    ],
)
def test_bad_limits_and_clients_are_errors_naming_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    assert message in str(info.value)
    assert KEY not in str(info.value)


def test_key_env_that_is_not_set_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[auth.clients.ci]\nkey_env = "CI_GATEWAY_KEY"\n')
    with pytest.raises(ConfigError, match=r"auth\.clients\.ci\.key_env: .*CI_GATEWAY_KEY"):
        load_config(path, env={})
    # Without the environment applied, auth must not start open.
    with pytest.raises(ConfigError, match=r"auth\.clients\.ci"):
        BearerAuth.from_config(config_from_mapping({"auth": {"clients": {"ci": {"key_env": "X"}}}}))


def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.key_file: cannot read"):
        config_from_mapping({"auth": {"key_file": str(tmp_path / "missing")}})


# =========================================================================== auth: models


async def test_a_key_limited_to_models_gets_403_for_others() -> None:
    config = config_from_mapping(
        {
            "auth": {
                "api_keys": [OTHER],
                "clients": {"alice": {"key": KEY, "models": ["deepseek-chat"]}},
            }
        }
    )
    auth = BearerAuth.from_config(config)
    upstream = Upstream()
    headers = {"authorization": f"Bearer {KEY}"}
    await drain(await auth(make_exchange(client_headers=headers), upstream))
    exchange = make_exchange(client_headers=headers, exposed_model="deepseek-reasoner")
    with pytest.raises(ClientError) as info:
        await auth(exchange, upstream)
    error = info.value
    assert (error.status, error.type, error.code) == (403, "permission_error", "model_not_allowed")
    assert exchange.trace.client_key_id == key_id(KEY)
    assert KEY not in error.message
    other = make_exchange(
        client_headers={"authorization": f"Bearer {OTHER}"}, exposed_model="deepseek-reasoner"
    )
    await drain(await auth(other, upstream))  # a key without a list may use any model
    assert len(upstream.exchanges) == 2


# =========================================================================== Redis backend


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer(password=PASSWORD) as server:
        yield server.url


@pytest.fixture
async def redis_limiters(redis_url: str) -> AsyncIterator[list[RedisLimiter]]:
    """Limiters opened by a test (two stand for two gateway processes); closed afterwards."""
    opened: list[RedisLimiter] = []
    yield opened
    for limiter in opened:
        await limiter.close()


async def test_redis_counts_exactly_across_clients(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    redis_limiters += [RedisLimiter(redis_url), RedisLimiter(redis_url)]
    key, rule = uuid.uuid4().hex[:12], KeyRule(requests_per_minute=100)
    decisions = await asyncio.gather(
        *(redis_limiters[i % 2].acquire(key, rule, uuid.uuid4().hex) for i in range(300))
    )
    admitted = [d for d in decisions if d.refused is None]
    assert len(admitted) == 100
    assert sorted(d.requests_used for d in admitted) == list(range(1, 101))
    for decision in decisions:
        if decision.refused is not None:
            assert decision.refused == "requests"
            assert 0 < decision.retry_after <= 60
            assert decision.requests_used == 100


async def test_redis_window_slides_and_keys_expire(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    limiter = RedisLimiter(redis_url, window=0.5)
    redis_limiters.append(limiter)
    key, rule = uuid.uuid4().hex[:12], KeyRule(requests_per_minute=2)
    for _ in range(2):
        assert (await limiter.acquire(key, rule, uuid.uuid4().hex)).refused is None
    refusal = await limiter.acquire(key, rule, uuid.uuid4().hex)
    assert refusal.refused == "requests"
    assert 0 < refusal.retry_after <= 0.5
    async with redis.asyncio.Redis.from_url(redis_url) as raw:
        req_key = limiter.keys(key)[0]
        assert req_key == f"ds2oai:lim:{{{key}}}:req"
        assert 0 < await raw.pttl(req_key) <= 500
    await asyncio.sleep(refusal.retry_after + 0.05)
    assert (await limiter.acquire(key, rule, uuid.uuid4().hex)).refused is None


async def test_redis_tokens_are_charged_at_finish(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    limiter = RedisLimiter(redis_url)
    redis_limiters.append(limiter)
    key, rule = uuid.uuid4().hex[:12], KeyRule(tokens_per_minute=100)
    lease = uuid.uuid4().hex
    assert (await limiter.acquire(key, rule, lease)).refused is None
    await limiter.finish(key, rule, lease, 60)
    decision = await limiter.acquire(key, rule, uuid.uuid4().hex)
    assert (decision.refused, decision.tokens_used) == (None, 60)
    await limiter.finish(key, rule, uuid.uuid4().hex, 50)
    decision = await limiter.acquire(key, rule, uuid.uuid4().hex)
    assert (decision.refused, decision.tokens_used) == ("tokens", 110)
    # Dropping the first charge (60) brings 110 under 100: the wait is until it leaves.
    assert 59 < decision.retry_after <= 60
    assert decision.tokens_reset == decision.retry_after


async def test_redis_slots_are_released_or_expire_with_their_lease(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    crashed = RedisLimiter(redis_url, lease=0.3)  # a process that dies holding a slot
    alive = RedisLimiter(redis_url, lease=0.3)
    redis_limiters += [crashed, alive]
    key, rule = uuid.uuid4().hex[:12], KeyRule(concurrent_streams=2)
    held = uuid.uuid4().hex
    assert (await crashed.acquire(key, rule, uuid.uuid4().hex)).refused is None
    assert (await alive.acquire(key, rule, held)).refused is None
    assert (await alive.acquire(key, rule, uuid.uuid4().hex)).refused == "streams"
    for _ in range(3):  # `alive` renews its slot; the crashed one does not
        await asyncio.sleep(0.15)
        await alive.renew(key, held)
    assert (await alive.acquire(key, rule, uuid.uuid4().hex)).refused is None  # expired one
    assert (await alive.acquire(key, rule, uuid.uuid4().hex)).refused == "streams"
    await alive.finish(key, rule, held, 0)
    assert (await alive.acquire(key, rule, uuid.uuid4().hex)).refused is None


async def test_redis_acquire_sent_twice_is_admitted_once(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    # The client re-sends a script after a timeout; Redis may have run the first one.
    limiter = RedisLimiter(redis_url)
    redis_limiters.append(limiter)
    key, lease = uuid.uuid4().hex[:12], uuid.uuid4().hex
    rule = KeyRule(requests_per_minute=1, tokens_per_minute=10, concurrent_streams=1)
    first = await limiter.acquire(key, rule, lease)
    await limiter.finish(key, rule, uuid.uuid4().hex, 10)  # another request used the tokens
    again = await limiter.acquire(key, rule, lease)
    assert (first.refused, again.refused) == (None, None)
    assert (first.requests_used, again.requests_used) == (1, 1)
    other = await limiter.acquire(key, rule, uuid.uuid4().hex)
    assert other.refused == "requests"
    await limiter.finish(key, rule, lease, 0)
    async with redis.asyncio.Redis.from_url(redis_url) as raw:
        assert await raw.zcard(limiter.keys(key)[2]) == 0


async def test_redis_scripts_survive_a_script_flush(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    limiter = RedisLimiter(redis_url)
    redis_limiters.append(limiter)
    rule = KeyRule(requests_per_minute=5, concurrent_streams=1)
    key, lease = uuid.uuid4().hex[:12], uuid.uuid4().hex
    await limiter.acquire(key, rule, lease)
    async with redis.asyncio.Redis.from_url(redis_url) as raw:
        await raw.script_flush()
    await limiter.finish(key, rule, lease, 0)
    assert (await limiter.acquire(key, rule, uuid.uuid4().hex)).requests_used == 2


async def test_redis_limiter_after_close_is_an_error(redis_url: str) -> None:
    limiter = RedisLimiter(redis_url)
    await limiter.close()
    await limiter.close()
    with pytest.raises(LimiterError, match="after close"):
        await limiter.acquire("k", KeyRule(requests_per_minute=1), "x")


async def test_middleware_over_redis_releases_slots(
    redis_url: str, redis_limiters: list[RedisLimiter]
) -> None:
    limiter = RedisLimiter(redis_url)
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1, tokens_per_minute=1000))
    key = uuid.uuid4().hex[:12]
    try:
        reply = await stage(make_exchange(key), Upstream(usage=(3, 4)))
        await refused(stage, make_exchange(key), Upstream())
        await drain(reply)
        reply = await stage(make_exchange(key), Upstream())
        assert reply.headers["x-ratelimit-remaining-tokens"] == str(1000 - 7)
        await drain(reply)
    finally:
        await stage.aclose()


# =========================================================================== end to end


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def auth_header(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_e2e_headers_on_success_and_429_json_when_over(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url,
        auth={"clients": {"alice": {"key": KEY, "requests_per_minute": 2}}},
        limits={"tokens_per_minute": 1000},
        middleware={"chain": CHAIN},
    )
    url = server.make_url("/v1/chat/completions")
    for remaining in ("1", "0"):
        async with client.post(url, json=chat(stream=True), headers=auth_header()) as resp:
            assert resp.status == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "2"
            assert resp.headers["x-ratelimit-remaining-requests"] == remaining
            assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
            await resp.read()
    await asyncio.sleep(0.1)  # the server charges the tokens as it unwinds, after the last byte
    async with client.post(url, json=chat(), headers=auth_header()) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        # 5 prompt + 2 completion tokens per answer of the fault upstream's default script
        assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14)
        error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert len(fault_upstream.requests) == 2


async def test_e2e_client_disconnect_mid_stream_releases_the_slot(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script(text_events(["Hel", "lo"])[:2], end=Hang()))
    server = await gateway(
        fault_upstream.url, limits={"concurrent_streams": 1}, middleware={"chain": CHAIN}
    )
    url = server.make_url("/v1/chat/completions")
    resp = await client.post(url, json=chat(stream=True))
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    async with client.post(url, json=chat(stream=True)) as second:
        assert second.status == 429
        assert (await second.json())["error"]["code"] == "concurrency_limit_exceeded"
    resp.close()
    await fault_upstream.wait_client_disconnect(timeout=3)
    await wait_admitted(client, url)


async def test_e2e_a_stream_cut_before_its_usage_is_charged_an_estimate(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # The client leaves before the usage chunk: without an estimate the answer cost nothing,
    # and tokens_per_minute could be dodged by cutting every stream.
    fault_upstream.queue(sse_script(text_events(["tok"] * 8)[:-2], end=Hang()))
    server = await gateway(
        fault_upstream.url, limits={"tokens_per_minute": 1000}, middleware={"chain": CHAIN}
    )
    url = server.make_url("/v1/chat/completions")
    resp = await client.post(url, json=chat(stream=True))
    assert resp.status == 200
    for _ in range(9):  # response.created and the eight deltas
        await resp.content.readuntil(b"\n\n")
    resp.close()
    await fault_upstream.wait_client_disconnect(timeout=3)
    await asyncio.sleep(0.1)
    async with client.post(url, json=chat()) as after:
        assert after.status == 200
        # The prompt `[{"role":"user","content":"hi"}]` (32 ASCII characters x 0.3 -> 10)
        # and one token per upstream event (the role chunk and eight texts).
        assert after.headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 - 9)


def test_charged_tokens_are_the_usage_or_an_estimate_once_a_token_came() -> None:
    messages = [{"role": "user", "content": "你好" * 10}]  # 30 ASCII, 20 other characters
    exchange = make_exchange("k1", upstream_body={"messages": messages})
    exchange.trace.upstream_chunks = 1  # an error event, say: no token yet
    assert charged_tokens(exchange) == 0
    exchange.trace.first_token_at = time.monotonic()
    exchange.trace.upstream_chunks = 4
    assert charged_tokens(exchange) == math.ceil(0.3 * 30 + 0.6 * 20) + 4
    exchange.trace.prompt_tokens, exchange.trace.completion_tokens = 12, 30
    assert charged_tokens(exchange) == 42


async def test_e2e_disconnect_while_waiting_for_upstream_headers_releases_the_slot(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue((Hang(),))
    server = await gateway(
        fault_upstream.url, limits={"concurrent_streams": 1}, middleware={"chain": CHAIN}
    )
    url = server.make_url("/v1/chat/completions")
    task = asyncio.create_task(client.post(url, json=chat(stream=True)))
    await fault_upstream.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fault_upstream.wait_client_disconnect(timeout=3)
    await wait_admitted(client, url)


async def test_e2e_broken_upstream_streams_release_their_slots(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    events = text_events(["Hel", "lo"])
    fault_upstream.queue(
        sse_script(events[:2], end=Close()),  # broken after the first byte: terminal event
        sse_script([], end=Reset()),  # broken before any event: a plain HTTP error
    )
    server = await gateway(
        fault_upstream.url,
        limits={"concurrent_streams": 1},
        middleware={"chain": CHAIN},
        retry={"max_retries": 0},
    )
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=chat(stream=True)) as resp:
        assert resp.status == 200
        assert b"upstream_stream_broken" in await resp.read()
    async with client.post(url, json=chat(stream=True)) as resp:
        assert resp.status == 502
    async with client.post(url, json=chat(stream=True)) as resp:
        assert resp.status == 200
        await resp.read()


async def wait_admitted(client: aiohttp.ClientSession, url: Any, limit: float = 3.0) -> None:
    """Poll until a request is admitted again (the release runs as the server unwinds)."""
    deadline = time.monotonic() + limit
    while True:
        async with client.post(url, json=chat(stream=True)) as resp:
            await resp.read()
            if resp.status == 200:
                return
            assert resp.status == 429
        assert time.monotonic() < deadline, "the slot was never released"
        await asyncio.sleep(0.02)


async def test_e2e_model_not_allowed_is_403(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url,
        auth={"clients": {"alice": {"key": KEY, "models": ["gpt-4.1-compatible"]}}},
        models={"aliases": {"gpt-4.1-compatible": "deepseek-chat"}},
    )
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=chat(), headers=auth_header()) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("permission_error", "model_not_allowed")
    body = chat(model="gpt-4.1-compatible")
    async with client.post(url, json=body, headers=auth_header()) as resp:
        assert resp.status == 200
    assert len(fault_upstream.requests) == 1


async def test_slot_taken_while_the_client_left_during_acquire_is_given_back() -> None:
    class SlowLimiter(MemoryLimiter):
        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.go_on = asyncio.Event()
            self.admitted = 0

        async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Decision:
            self.entered.set()
            await self.go_on.wait()  # Redis is slow to answer; the script runs anyway
            decision = await super().acquire(key_id, rule, lease_id)
            self.admitted += decision.refused is None
            return decision

    limiter = SlowLimiter()
    stage = KeyLimits(limiter, KeyRule(concurrent_streams=1))
    task = asyncio.create_task(stage(make_exchange("k1"), Upstream()))
    await limiter.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limiter.go_on.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert limiter.admitted == 1  # the slot was taken after the client left ...
    assert limiter.streams_held("k1") == 0  # ... and given back
