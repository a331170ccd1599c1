"""Chain tests against a fake `call_next`: fold order, building the chain from config, and the
built-in `auth`, `retry` and `rate_limit` stages. No sockets."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ds2oai.chain import Body, Exchange, Middleware, Next, Reply, build_middleware, fold
from ds2oai.config import Config, RetryConfig, config_from_mapping
from ds2oai.errors import ClientError, ConfigError, UpstreamConnectError, UpstreamTimeoutError
from ds2oai.middleware import BUILTINS, BearerAuth, RateLimitTranslator, Reframe, Retry
from ds2oai.middleware.auth import key_id
from tests import conftest


def make_exchange(headers: dict[str, str] | None = None) -> Exchange:
    return conftest.make_exchange(client_headers=headers or {})


async def make_body(*parts: bytes) -> Body:
    for part in parts:
        yield part


async def is_closed(body: Body | bytes) -> bool:
    """True when the async-generator body was closed (a closed generator yields nothing)."""
    assert not isinstance(body, bytes)
    try:
        await anext(body)
    except StopAsyncIteration:
        return True
    await body.aclose()
    return False


class Endpoint:
    """A fake innermost handler that records the exchanges it receives."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.exchanges: list[Exchange] = []

    async def __call__(self, exchange: Exchange) -> Reply:
        self.exchanges.append(exchange)
        return Reply(self.status, {}, make_body(b"ok"))


# =========================================================================== fold


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        self.log.append(f"{self.name}>")
        via = exchange.upstream_headers.get("x-via", "") + self.name
        reply = await call_next(
            dataclasses.replace(
                exchange, upstream_headers={**exchange.upstream_headers, "x-via": via}
            )
        )
        self.log.append(f"<{self.name}")
        return Reply(
            reply.status,
            {**reply.headers, "x-out": reply.headers.get("x-out", "") + self.name},
            reply.body,
        )


async def test_fold_runs_first_entry_outermost() -> None:
    log: list[str] = []
    endpoint = Endpoint()

    async def recording_endpoint(exchange: Exchange) -> Reply:
        log.append("endpoint")
        return await endpoint(exchange)

    handler = fold([Recorder("a", log), Recorder("b", log), Recorder("c", log)], recording_endpoint)
    original = make_exchange()
    reply = await handler(original)
    assert log == ["a>", "b>", "c>", "endpoint", "<c", "<b", "<a"]
    assert endpoint.exchanges[0].upstream_headers["x-via"] == "abc"
    assert reply.headers["x-out"] == "cba"
    assert original.upstream_headers == {}  # replaced, never mutated
    await is_closed(reply.body)


async def test_fold_of_no_middleware_is_the_endpoint() -> None:
    endpoint = Endpoint()
    assert fold([], endpoint) is endpoint


async def test_folded_chain_can_be_called_many_times() -> None:
    log: list[str] = []
    endpoint = Endpoint()
    handler = fold([Recorder("a", log)], endpoint)
    for _ in range(3):
        await is_closed((await handler(make_exchange())).body)
    assert log == ["a>", "<a"] * 3


# =========================================================================== build_middleware

EXTRA_SOURCE = '''
from ds2oai.chain import Exchange, Next, Reply
import dataclasses


class Tagger:
    """Adds `x-tag` to the upstream headers."""

    name = "tagger"

    def __init__(self, tag: str, times: int = 1) -> None:
        self.tag = tag
        self.times = times

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        headers = {**exchange.upstream_headers, "x-tag": self.tag * self.times}
        return await call_next(dataclasses.replace(exchange, upstream_headers=headers))


class Namespace:
    Tagger = Tagger


class NoArgs:
    name = "noargs"

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        return await call_next(exchange)


class FakeAuth(NoArgs):
    name = "auth"


class Nameless:
    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        return await call_next(exchange)


class SyncCall:
    name = "sync"

    def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        raise AssertionError("never called")


class OneArgument:
    name = "one_argument"

    async def __call__(self, exchange: Exchange) -> Reply:
        raise AssertionError("never called")


class ThreeArguments:
    name = "three_arguments"

    async def __call__(self, exchange: Exchange, call_next: Next, extra: int) -> Reply:
        raise AssertionError("never called")


class Exploding:
    name = "exploding"

    def __init__(self) -> None:
        raise RuntimeError("cannot start: missing resource")


NOT_CALLABLE = 3
'''


@pytest.fixture
def extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A middleware module written into tmp_path: (module name, its directory)."""
    module = f"ds2oai_test_extra_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(EXTRA_SOURCE), encoding="utf-8")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader prepends `paths`; undo it
    yield module, str(tmp_path)
    sys.modules.pop(module, None)


def middleware_config(chain: list[str], **section: Any) -> Config:
    return config_from_mapping({"middleware": {"chain": chain, **section}})


def build_error(config: Config) -> str:
    with pytest.raises(ConfigError) as info:
        build_middleware(config, BUILTINS)
    return str(info.value)


def test_default_chain_builds_the_builtins_in_order() -> None:
    built = build_middleware(Config(), BUILTINS)
    assert [m.name for m in built] == ["auth", "rate_limit", "retry", "reframe"]
    assert [type(m) for m in built] == [BearerAuth, RateLimitTranslator, Retry, Reframe]
    assert all(isinstance(m, Middleware) for m in built)


@pytest.mark.parametrize(
    "auth",
    [
        {"api_keys": ["sk-secret-client-key"]},
        {"clients": {"team": {"key": "sk-secret-client-key"}}},
    ],
)
def test_client_keys_without_the_auth_stage_refuse_to_start(auth: dict[str, Any]) -> None:
    # Else both chat routes would answer requests without a key.
    config = config_from_mapping({"auth": auth, "middleware": {"chain": ["retry", "reframe"]}})
    message = build_error(config)
    assert "'auth' is not in [middleware] chain" in message
    assert "sk-secret-client-key" not in message
    # Without keys the stage is optional.
    build_middleware(middleware_config(["retry", "reframe"]), BUILTINS)


def test_an_unknown_name_is_an_error_listing_the_built_ins() -> None:
    message = build_error(middleware_config(["limitz", "reframe"]))
    assert "'limitz'" in message
    assert "auth, limits, rate_limit, reframe, retry" in message


def test_extra_from_module_attr_gets_its_options_as_keyword_arguments(
    extra: tuple[str, str],
) -> None:
    module, path = extra
    config = middleware_config(
        ["auth", f"{module}:Tagger", "reframe"], paths=[path], tagger={"tag": "ab", "times": 3}
    )
    built = build_middleware(config, BUILTINS)
    assert [m.name for m in built] == ["auth", "tagger", "reframe"]
    tagger = built[1]
    assert type(tagger).__module__ == module
    assert vars(tagger) == {"tag": "ab", "times": 3}


async def test_loaded_extra_works_inside_the_folded_chain(extra: tuple[str, str]) -> None:
    module, path = extra
    config = middleware_config([f"{module}:Tagger", "reframe"], paths=[path], tagger={"tag": "x"})
    tagger = build_middleware(config, BUILTINS)[0]
    endpoint = Endpoint()
    reply = await fold([tagger], endpoint)(make_exchange())
    assert endpoint.exchanges[0].upstream_headers == {"x-tag": "x"}
    assert not await is_closed(reply.body)


def test_extra_by_dotted_attribute_path(extra: tuple[str, str]) -> None:
    module, path = extra
    config = middleware_config(
        [f"{module}:Namespace.Tagger", "reframe"], paths=[path], tagger={"tag": "t"}
    )
    assert [m.name for m in build_middleware(config, BUILTINS)] == ["tagger", "reframe"]


@pytest.mark.parametrize("entry", ["ratelimit", "Auth", "retries", "re-frame"])
def test_unknown_builtin_looking_name_is_an_error_naming_it(entry: str) -> None:
    message = build_error(middleware_config(["auth", entry, "reframe"]))
    assert repr(entry) in message


@pytest.mark.parametrize("entry", [":Thing", "module:", ":"])
def test_half_module_attr_is_an_error_naming_it(entry: str) -> None:
    assert repr(entry) in build_error(middleware_config([entry, "reframe"]))


def test_module_that_cannot_be_imported_is_an_error_naming_it() -> None:
    entry = f"no_such_module_{uuid.uuid4().hex}:Thing"
    message = build_error(middleware_config([entry, "reframe"]))
    assert "cannot import" in message
    assert repr(entry) in message


def test_missing_attribute_is_an_error_naming_it(extra: tuple[str, str]) -> None:
    module, path = extra
    entry = f"{module}:Missing"
    message = build_error(middleware_config([entry, "reframe"], paths=[path]))
    assert repr(entry) in message
    assert "Missing" in message


def test_attribute_that_is_not_callable_is_an_error(extra: tuple[str, str]) -> None:
    module, path = extra
    entry = f"{module}:NOT_CALLABLE"
    assert repr(entry) in build_error(middleware_config([entry, "reframe"], paths=[path]))


@pytest.mark.parametrize("attr", ["Nameless", "SyncCall", "OneArgument", "ThreeArguments"])
def test_object_that_is_not_a_middleware_is_an_error(extra: tuple[str, str], attr: str) -> None:
    module, path = extra
    entry = f"{module}:{attr}"
    assert repr(entry) in build_error(middleware_config([entry, "reframe"], paths=[path]))


def test_factory_that_fails_is_an_error_naming_it(extra: tuple[str, str]) -> None:
    module, path = extra
    entry = f"{module}:Exploding"
    message = build_error(middleware_config([entry, "reframe"], paths=[path]))
    assert repr(entry) in message
    assert "missing resource" in message


@pytest.mark.parametrize(
    "options",
    [{}, {"tag": "x", "colour": "red"}],
    ids=["missing_required_option", "unknown_option"],
)
def test_bad_options_are_an_error_naming_the_middleware(
    extra: tuple[str, str], options: dict[str, Any]
) -> None:
    module, path = extra
    chain = [f"{module}:Tagger", "reframe"]
    config = (
        middleware_config(chain, paths=[path], tagger=options)
        if options
        else middleware_config(chain, paths=[path])
    )
    assert build_error(config).startswith("middleware.tagger:")


def test_duplicate_builtin_names_are_an_error() -> None:
    message = build_error(middleware_config(["auth", "retry", "auth", "reframe"]))
    assert "duplicate" in message
    assert "'auth'" in message


def test_duplicate_name_between_extra_and_builtin_is_an_error(extra: tuple[str, str]) -> None:
    module, path = extra
    message = build_error(
        middleware_config(["auth", f"{module}:FakeAuth", "reframe"], paths=[path])
    )
    assert "duplicate" in message
    assert "'auth'" in message


def test_same_extra_twice_is_an_error(extra: tuple[str, str]) -> None:
    module, path = extra
    entry = f"{module}:NoArgs"
    message = build_error(middleware_config([entry, entry, "reframe"], paths=[path]))
    assert "duplicate" in message
    assert "'noargs'" in message


def test_options_for_a_middleware_not_in_the_chain_are_an_error() -> None:
    message = build_error(middleware_config(["auth", "reframe"], ghost={"level": 1}))
    assert message.startswith("middleware.ghost:")
    assert "not in the chain" in message


def test_options_for_a_builtin_in_the_middleware_section_are_an_error() -> None:
    message = build_error(middleware_config(["retry", "reframe"], retry={"max_retries": 1}))
    assert message.startswith("middleware.retry:")


@pytest.mark.parametrize(
    "chain", [["auth", "retry"], ["auth", "rate_limit", "retry"]], ids=["two", "three"]
)
def test_missing_reframe_is_an_error_naming_it(chain: list[str]) -> None:
    assert "'reframe'" in build_error(middleware_config(chain))


def test_reframe_twice_is_an_error() -> None:
    assert "'reframe'" in build_error(middleware_config(["reframe", "reframe"]))


# =========================================================================== auth

KEYS = ("client-key-one", "client-key-two")


async def test_auth_without_keys_passes_everything() -> None:
    endpoint = Endpoint()
    exchange = make_exchange()
    reply = await BearerAuth(())(exchange, endpoint)
    assert reply.status == 200
    assert endpoint.exchanges == [exchange]
    assert endpoint.exchanges[0].client_key is None
    await is_closed(reply.body)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer "},
        {"authorization": "Bearer client-key-wrong"},
        {"authorization": "Bearer client-key-on"},  # a prefix of a real key
        {"authorization": "Bearer client-key-one-and-more"},
        {"authorization": "Basic client-key-one"},
        {"authorization": "client-key-one"},
        {"x-api-key": "nope"},
        {"authorization": "Bearer wrong", "x-api-key": "client-key-one"},
    ],
    ids=[
        "missing",
        "empty_header",
        "empty_bearer",
        "wrong",
        "prefix",
        "longer",
        "basic_scheme",
        "no_scheme",
        "wrong_x_api_key",
        "authorization_wins",
    ],
)
async def test_auth_rejects_missing_or_wrong_key_with_401(headers: dict[str, str]) -> None:
    endpoint = Endpoint()
    with pytest.raises(ClientError) as info:
        await BearerAuth(KEYS)(make_exchange(headers), endpoint)
    error = info.value
    assert (error.status, error.type, error.code) == (
        401,
        "authentication_error",
        "invalid_api_key",
    )
    assert endpoint.exchanges == []  # fails closed: nothing behind auth runs
    for presented in ("client-key", "wrong", "nope"):
        assert presented not in error.message


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer client-key-one"}, "client-key-one"),
        ({"authorization": "Bearer client-key-two"}, "client-key-two"),
        ({"authorization": "bearer client-key-one"}, "client-key-one"),
        ({"authorization": "Bearer   client-key-two  "}, "client-key-two"),
        ({"api-key": "client-key-one"}, "client-key-one"),
        ({"x-api-key": "client-key-two"}, "client-key-two"),
    ],
)
async def test_auth_right_key_passes_with_client_key_set(headers: dict[str, str], key: str) -> None:
    endpoint = Endpoint()
    exchange = make_exchange(headers)
    reply = await BearerAuth(KEYS)(exchange, endpoint)
    assert reply.status == 200
    [seen] = endpoint.exchanges
    assert seen.client_key == key
    assert exchange.client_key is None  # replaced, not mutated
    assert seen.trace.client_key_id == key_id(key)
    assert key not in (seen.trace.client_key_id or "")
    await is_closed(reply.body)


@pytest.mark.parametrize("header", ["authorization", "api-key", "x-api-key"])
async def test_repr_of_the_authenticated_exchange_never_shows_the_client_key(header: str) -> None:
    endpoint = Endpoint()
    value = "Bearer client-key-one" if header == "authorization" else "client-key-one"
    reply = await BearerAuth(KEYS)(make_exchange({header: value}), endpoint)
    await is_closed(reply.body)
    [seen] = endpoint.exchanges
    assert seen.client_key == "client-key-one"
    assert "client-key-one" not in repr(seen)


async def test_auth_from_config_uses_the_configured_keys() -> None:
    auth = BearerAuth.from_config(config_from_mapping({"auth": {"api_keys": ["k-1"]}}))
    assert auth.name == "auth"
    with pytest.raises(ClientError):
        await auth(make_exchange({"authorization": "Bearer k-2"}), Endpoint())
    reply = await auth(make_exchange({"authorization": "Bearer k-1"}), Endpoint())
    assert reply.status == 200
    await is_closed(reply.body)


# =========================================================================== retry

Step = int | tuple[int, dict[str, str]] | str


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSleep:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.now += delay


class ScriptedUpstream:
    """Fake `call_next`: one step per attempt (the last step repeats). A step is a status, a
    (status, headers) pair, or "connect"/"timeout" to raise that error."""

    def __init__(self, *steps: Step, clock: FakeClock | None = None, takes: float = 0.0) -> None:
        self.steps = steps
        self.clock = clock
        self.takes = takes
        self.exchanges: list[Exchange] = []
        self.bodies: list[Body] = []

    async def __call__(self, exchange: Exchange) -> Reply:
        self.exchanges.append(exchange)
        if self.clock is not None:
            self.clock.now += self.takes
        step = self.steps[min(len(self.exchanges), len(self.steps)) - 1]
        if step == "connect":
            raise UpstreamConnectError("connection refused")
        if step == "timeout":
            raise UpstreamTimeoutError("no headers")
        assert not isinstance(step, str), step
        status, headers = (step, {}) if isinstance(step, int) else step
        body = make_body(f"attempt {len(self.exchanges)}".encode())
        self.bodies.append(body)
        return Reply(status, headers, body)


class RetryRig:
    def __init__(self, rand: Callable[[], float] = lambda: 0.5, **config: Any) -> None:
        defaults: dict[str, Any] = {
            "max_retries": 2,
            "base_delay": 0.5,
            "max_delay": 8.0,
            "retry_after_cap": 30.0,
            "deadline": 60.0,
        }
        self.clock = FakeClock()
        self.sleep = RecordingSleep(self.clock)
        self.retry = Retry(
            RetryConfig(**{**defaults, **config}), sleep=self.sleep, rand=rand, clock=self.clock
        )

    async def __call__(self, upstream: ScriptedUpstream) -> Reply:
        return await self.retry(make_exchange(), upstream)


async def closed_flags(upstream: ScriptedUpstream) -> list[bool]:
    return [await is_closed(body) for body in upstream.bodies]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retry_retries_retryable_statuses_up_to_max_retries(status: int) -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream(status)
    reply = await rig(upstream)
    assert len(upstream.exchanges) == 3
    assert reply.status == status
    assert reply.body is upstream.bodies[-1]
    assert rig.sleep.delays == [0.25, 0.5]  # rand 0.5 * 0.5 * 2**n
    # every discarded reply was closed; the one returned is still readable
    assert await closed_flags(upstream) == [True, True, False]
    assert reply.retried  # so the client is told not to retry on top


async def test_retry_returns_the_first_good_reply() -> None:
    rig = RetryRig(max_retries=3)
    upstream = ScriptedUpstream(503, 502, 200, 500)
    reply = await rig(upstream)
    assert reply.status == 200
    assert len(upstream.exchanges) == 3
    assert await closed_flags(upstream) == [True, True, False]


async def test_retry_numbers_the_attempts_without_mutating_the_exchange() -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream(500)
    exchange = make_exchange()
    await is_closed((await rig.retry(exchange, upstream)).body)
    assert [e.attempt for e in upstream.exchanges] == [0, 1, 2]
    assert exchange.attempt == 0
    assert all(e.trace is exchange.trace for e in upstream.exchanges)


@pytest.mark.parametrize("status", [200, 400, 401, 402, 403, 404, 422])
async def test_retry_does_not_retry_other_statuses(status: int) -> None:
    rig = RetryRig(max_retries=3)
    upstream = ScriptedUpstream(status, 200)
    reply = await rig(upstream)
    assert reply.status == status
    assert len(upstream.exchanges) == 1
    assert rig.sleep.delays == []
    assert await closed_flags(upstream) == [False]


async def test_retry_with_zero_max_retries_makes_one_attempt() -> None:
    rig = RetryRig(max_retries=0)
    upstream = ScriptedUpstream(503, 200)
    reply = await rig(upstream)
    assert reply.status == 503
    assert len(upstream.exchanges) == 1
    assert not reply.retried  # the client's own retries are the only ones


async def test_a_connect_error_says_whether_the_gateway_retried() -> None:
    with pytest.raises(UpstreamConnectError) as once:
        await RetryRig(max_retries=0)(ScriptedUpstream("connect"))
    assert not once.value.retried
    with pytest.raises(UpstreamConnectError) as again:
        await RetryRig(max_retries=1)(ScriptedUpstream("connect"))
    assert again.value.retried


async def test_retry_retries_connect_errors_then_succeeds() -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream("connect", "connect", 200)
    reply = await rig(upstream)
    assert reply.status == 200
    assert len(upstream.exchanges) == 3
    assert rig.sleep.delays == [0.25, 0.5]
    await is_closed(reply.body)


async def test_retry_raises_the_connect_error_after_max_retries() -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream("connect")
    with pytest.raises(UpstreamConnectError):
        await rig(upstream)
    assert len(upstream.exchanges) == 3


async def test_retry_does_not_retry_timeouts_or_client_errors() -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream("timeout", 200)
    with pytest.raises(UpstreamTimeoutError):
        await rig(upstream)
    assert len(upstream.exchanges) == 1


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "12.5"}, 12.5),
    ],
)
async def test_retry_honours_retry_after(headers: dict[str, str], delay: float) -> None:
    rig = RetryRig(rand=lambda: 1.0)
    upstream = ScriptedUpstream((429, headers), 200)
    reply = await rig(upstream)
    assert reply.status == 200
    assert rig.sleep.delays == [delay]
    await is_closed(reply.body)


async def test_retry_after_above_the_cap_returns_the_reply_without_waiting() -> None:
    rig = RetryRig(retry_after_cap=30.0, max_retries=5)
    upstream = ScriptedUpstream((429, {"retry-after": "31"}), 200)
    reply = await rig(upstream)
    assert reply.status == 429
    assert reply.headers == {"retry-after": "31"}
    assert len(upstream.exchanges) == 1
    assert rig.sleep.delays == []
    assert await closed_flags(upstream) == [False]


async def test_retry_after_at_the_cap_is_waited_for() -> None:
    rig = RetryRig(retry_after_cap=30.0)
    upstream = ScriptedUpstream((503, {"retry-after": "30"}), 200)
    assert (await rig(upstream)).status == 200
    assert rig.sleep.delays == [30.0]


async def test_retry_stops_when_backoff_would_pass_the_deadline() -> None:
    rig = RetryRig(rand=lambda: 1.0, base_delay=0.8, max_retries=5, deadline=1.0)
    upstream = ScriptedUpstream(503)
    reply = await rig(upstream)
    # attempt 0 at t=0, sleep 0.8; attempt 1 at t=0.8, next sleep 1.6 would end past t=1.0
    assert len(upstream.exchanges) == 2
    assert rig.sleep.delays == [0.8]
    assert reply.status == 503
    assert await closed_flags(upstream) == [True, False]


async def test_retry_stops_when_retry_after_would_pass_the_deadline() -> None:
    rig = RetryRig(deadline=5.0)
    upstream = ScriptedUpstream((503, {"retry-after": "10"}), 200)
    assert (await rig(upstream)).status == 503
    assert len(upstream.exchanges) == 1
    assert rig.sleep.delays == []


async def test_retry_deadline_counts_time_spent_waiting_for_the_upstream() -> None:
    rig = RetryRig(deadline=60.0, max_retries=5)
    upstream = ScriptedUpstream(502, clock=rig.clock, takes=59.9)
    assert (await rig(upstream)).status == 502
    assert len(upstream.exchanges) == 1


async def test_retry_deadline_also_bounds_connect_error_retries() -> None:
    rig = RetryRig(rand=lambda: 1.0, base_delay=0.8, max_retries=5, deadline=1.0)
    upstream = ScriptedUpstream("connect")
    with pytest.raises(UpstreamConnectError):
        await rig(upstream)
    assert len(upstream.exchanges) == 2


async def test_retry_backoff_is_full_jitter_exponential_and_capped() -> None:
    draws = iter([1.0, 0.0, 0.5, 1.0, 0.25])
    rig = RetryRig(rand=lambda: next(draws), base_delay=1.0, max_delay=4.0, max_retries=5)
    upstream = ScriptedUpstream(500, 500, 500, 500, 500, 200)
    assert (await rig(upstream)).status == 200
    # uniform(0, min(max_delay, base * 2**n)): caps 1, 2, 4, 4 (not 8), 4 (not 16)
    assert rig.sleep.delays == [1.0, 0.0, 2.0, 4.0, 1.0]


def test_retry_backoff_stays_within_its_cap() -> None:
    rig = RetryRig(rand=lambda: 0.999, base_delay=0.5, max_delay=3.0)
    delays = [rig.retry.backoff(n) for n in range(5)]
    assert delays == pytest.approx([0.4995, 0.999, 1.998, 2.997, 2.997])


async def test_retry_from_config_reads_the_retry_section() -> None:
    retry = Retry.from_config(
        config_from_mapping({"retry": {"max_retries": 4, "base_delay": 0.0, "max_delay": 0.0}})
    )
    assert retry.name == "retry"
    upstream = ScriptedUpstream(503)
    reply = await retry(make_exchange(), upstream)  # real asyncio.sleep, but of 0 s
    assert reply.status == 503
    assert len(upstream.exchanges) == 5
    assert await closed_flags(upstream) == [True, True, True, True, False]


# =========================================================================== rate_limit


def _limit_reply(headers: dict[str, str], body: bytes = b"") -> Reply:
    return Reply(429, headers, make_body(body))


async def test_rate_limit_429_without_retry_after_computes_it() -> None:
    reply = _limit_reply({})

    async def upstream(exchange: Exchange) -> Reply:
        return reply

    with pytest.raises(ClientError) as info:
        await RateLimitTranslator(default_retry_after=2.5)(make_exchange(), upstream)
    error = info.value
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "rate_limit")
    assert error.headers["Retry-After"] == "3"
    assert await is_closed(reply.body)


async def test_rate_limit_429_passes_retry_after_on() -> None:
    body = json.dumps({"error": {"message": "Rate limit reached", "code": "rate"}}).encode()
    reply = _limit_reply({"retry-after": "7"}, body)

    async def upstream(exchange: Exchange) -> Reply:
        return reply

    with pytest.raises(ClientError) as info:
        await RateLimitTranslator(default_retry_after=1.0)(make_exchange(), upstream)
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "7"
    assert info.value.message == "Rate limit reached"
    assert await is_closed(reply.body)


async def test_rate_limit_redacts_the_gateway_key_from_the_message() -> None:
    secret = "gw-upstream-key-123456"
    reply = _limit_reply({}, json.dumps({"error": {"message": f"key {secret} limited"}}).encode())

    async def upstream(exchange: Exchange) -> Reply:
        return reply

    with pytest.raises(ClientError) as info:
        await RateLimitTranslator(secrets=(secret,))(make_exchange(), upstream)
    assert secret not in info.value.message


@pytest.mark.parametrize("status", [200, 400, 401, 402, 500, 503])
async def test_rate_limit_leaves_other_statuses_untouched(status: int) -> None:
    reply = Reply(status, {"retry-after": "5"}, make_body(b"payload"))

    async def upstream(exchange: Exchange) -> Reply:
        return reply

    assert await RateLimitTranslator()(make_exchange(), upstream) is reply
    assert not await is_closed(reply.body)


def test_rate_limit_from_config_uses_default_retry_after() -> None:
    translator = RateLimitTranslator.from_config(
        config_from_mapping({"rate_limit": {"default_retry_after": 4.0}})
    )
    assert translator.name == "rate_limit"


async def test_rate_limit_from_config_computes_retry_after_from_the_config() -> None:
    translator = RateLimitTranslator.from_config(
        config_from_mapping({"rate_limit": {"default_retry_after": 4.0}})
    )

    async def upstream(exchange: Exchange) -> Reply:
        return _limit_reply({})

    with pytest.raises(ClientError) as info:
        await translator(make_exchange(), upstream)
    assert info.value.headers["Retry-After"] == "4"


async def test_rate_limit_sits_outside_retry_and_sees_the_last_429() -> None:
    rig = RetryRig(max_retries=2)
    upstream = ScriptedUpstream((429, {"retry-after": "2"}))
    handler = fold([RateLimitTranslator(), rig.retry], upstream)
    with pytest.raises(ClientError) as info:
        await handler(make_exchange())
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "2"
    assert len(upstream.exchanges) == 3
    assert rig.sleep.delays == [2.0, 2.0]
    assert await closed_flags(upstream) == [True, True, True]
