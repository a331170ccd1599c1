"""The upstream call: the innermost handler of the chain, and the only HTTP client code.

`UpstreamClient` owns the process's one connection pool (`http1.Pool`). It POSTs the exchange's
`upstream_body` to `{base_url}/v1/chat/completions` with the gateway's own key, and returns a
`Reply` whose body is the raw upstream byte stream (`UpstreamBody`, safe to cancel between reads).
Transport errors are translated into the ds2oai tree here and only here, body iteration
included: before headers into `UpstreamConnectError` / `UpstreamTimeoutError`, during the body
into `UpstreamStreamError`. Closing the body before its end closes the TCP connection, which is
how a client disconnect stops the upstream generating tokens nobody will read. A reader may
instead let a callback take the body's reads as they arrive (`UpstreamBody.splice`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ds2oai import http1, jsonutil
from ds2oai.balancer import BreakerState, CircuitBreaker, choose
from ds2oai.chain import Body, Exchange, Reply
from ds2oai.config import Config, UpstreamConfig
from ds2oai.errors import (
    ClientError,
    UpstreamConnectError,
    UpstreamStreamError,
    UpstreamTimeoutError,
)
from ds2oai.metrics import ATTEMPTS, SELECTED, child, inc
from ds2oai.upstream_errors import BROKEN_MESSAGE

__all__ = ["Target", "UpstreamBody", "UpstreamClient", "read_limited", "targets_from_config"]

_CHAT_PATH = "/v1/chat/completions"

# Headers the upstream request never takes from anywhere but this module.
_RESERVED = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "accept-encoding",  # http1 decodes only what it asks for
    }
)


@dataclass(eq=False)
class Target:
    """One upstream: where to POST, with which key, how much traffic, its breaker."""

    name: str
    url: str
    auth: str | None = field(repr=False)
    weight: float
    models: Mapping[str, str]
    breaker: CircuitBreaker


def targets_from_config(config: Config) -> list[Target]:
    """`[pool.*]` when given, else the single `[upstream]`."""

    def breaker() -> CircuitBreaker:
        b = config.balancer
        return CircuitBreaker(
            threshold=b.failure_threshold, window=b.failure_window, open_seconds=b.open_seconds
        )

    def auth(key: str) -> str | None:
        return f"Bearer {key}" if key else None

    if not config.pool:
        u = config.upstream
        url = u.base_url.rstrip("/") + _CHAT_PATH
        return [Target("default", url, auth(u.api_key), 1.0, {}, breaker())]
    return [
        Target(
            name,
            t.base_url.rstrip("/") + _CHAT_PATH,
            auth(t.api_key),
            t.weight,
            dict(t.models),
            breaker(),
        )
        for name, t in config.pool.items()
    ]


_PROBE_TIMEOUT = 2.0  # seconds a /readyz probe of one upstream may take


class UpstreamClient:
    """Callable as the chain's endpoint: `await client(exchange) -> Reply`.

    With several upstreams (`[pool.*]`) it picks one by weight among those whose circuit
    breaker is closed (or half-open, one probe at a time), and fails over to another before the
    first byte when the chosen one cannot be reached or answers 5xx/429.
    """

    def __init__(self, config: UpstreamConfig, pool: http1.Pool, targets: list[Target]) -> None:
        self._config = config
        self._pool = pool
        self._read_timeout = config.read_timeout
        self._connect_timeout = config.connect_timeout
        self._targets = targets
        # The gateway's own key, for resume's beta endpoint.
        self._auth = f"Bearer {config.api_key}" if config.api_key else None
        self._open: set[http1.Response] = set()
        self._abort_reason: str | None = None

    @classmethod
    def create(cls, config: Config) -> UpstreamClient:
        upstream = config.upstream
        pool = http1.Pool(limit=upstream.max_connections, keepalive=30.0)
        return cls(upstream, pool, targets_from_config(config))

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def targets(self) -> list[Target]:
        return self._targets

    async def close(self) -> None:
        await self._pool.close()

    async def probe(self) -> tuple[bool, str]:
        """(reachable, detail): GET {base_url}/models; any HTTP status counts as reachable.

        With `[pool.*]` every upstream of the pool is asked at once and one answer is enough
        (the gateway can serve while any upstream can).
        """
        results = await asyncio.gather(*(self._probe_one(t) for t in self._targets))
        if len(results) == 1:
            return results[0]
        named = zip(self._targets, results, strict=True)
        return any(ok for ok, _ in results), ", ".join(f"{t.name}: {d}" for t, (_, d) in named)

    async def _probe_one(self, target: Target) -> tuple[bool, str]:
        url = target.url.removesuffix(_CHAT_PATH) + "/models"
        headers = [("Authorization", target.auth)] if target.auth else []
        # At most 2 s, whatever connect_timeout is: a readiness probe that waits out a
        # blackholed upstream's 10 s makes the orchestrator's own probe time out first.
        timeout = min(self._connect_timeout, _PROBE_TIMEOUT)
        try:
            async with asyncio.timeout(timeout):
                response = await self._pool.request(
                    "GET", url, headers, connect_timeout=timeout, read_timeout=timeout
                )
        except (http1.HTTPClientError, OSError, TimeoutError) as exc:
            return False, type(exc).__name__
        response.release()  # the status is all the probe wants (pooled if the body is in)
        return True, f"HTTP {response.status}"

    async def __call__(self, exchange: Exchange) -> Reply:
        if exchange.upstream_url is not None:  # resume: the configured beta endpoint
            return await self._post(exchange, exchange.upstream_url, self._auth, {})
        tried: list[Target] = []
        last_error: UpstreamConnectError | None = None
        pooled = len(self._targets) > 1  # breakers only matter where there is a choice
        while True:
            target = choose(self._targets, exclude=tried) if pooled else None
            probe = False  # this request holds the target's half-open probe
            if pooled and target is not None:
                probe = target.breaker.state is BreakerState.HALF_OPEN
                if not target.breaker.acquire():
                    tried.append(target)
                    continue
            if target is None:
                untried = [t for t in self._targets if t not in tried]
                if not untried:
                    assert last_error is not None
                    raise last_error
                # Panic mode (Envoy's term): every breaker is open, try them by weight anyway.
                target = choose(untried, ignore_breakers=True) or untried[0]
            tried.append(target)
            try:
                reply = await self._post(exchange, target.url, target.auth, target.models)
            except UpstreamConnectError as exc:
                if not exc.retryable:  # shutting down: no verdict on the upstream
                    if probe:
                        target.breaker.abandon()
                    raise
                target.breaker.failure()
                inc(child(SELECTED, target.name, "connect_error"))
                last_error = exc
                if not pooled:
                    raise
                continue  # fail over before the first byte
            except UpstreamTimeoutError:
                target.breaker.failure()
                inc(child(SELECTED, target.name, "timeout"))
                raise
            except BaseException:  # cancelled (the client left), or the gateway's pool is full:
                # no verdict on the upstream
                if probe:
                    target.breaker.abandon()
                raise
            if reply.status >= 500 or reply.status == 429:
                if reply.status >= 500:
                    target.breaker.failure()
                elif probe:  # a 429 is about load, not health: the next request probes
                    target.breaker.abandon()
                inc(child(SELECTED, target.name, str(reply.status)))
                if pooled and choose(self._targets, exclude=tried) is not None:
                    await reply.aclose()
                    continue  # another upstream may answer
                return reply
            target.breaker.success()
            inc(child(SELECTED, target.name, str(reply.status)))
            return reply

    async def _post(
        self, exchange: Exchange, url: str, auth: str | None, models: Mapping[str, str]
    ) -> Reply:
        if self._abort_reason is not None:
            raise UpstreamConnectError(self._abort_reason, retryable=False)
        exchange.trace.attempts += 1
        headers = [
            (k, v) for k, v in exchange.upstream_headers.items() if k.lower() not in _RESERVED
        ]
        headers.append(("Content-Type", "application/json"))
        headers.append(("Accept", "text/event-stream"))
        if auth is not None:
            headers.append(("Authorization", auth))  # SECURITY: the gateway's key only
        body = exchange.upstream_body
        model = body.get("model")
        if models and isinstance(model, str) and model in models:
            body = {**body, "model": models[model]}
        try:
            response = await self._pool.request(
                "POST",
                url,
                headers,
                jsonutil.dumps(body),
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
        except http1.PoolTimeout:
            # The gateway's own limit, shared by every upstream: no verdict on this one (its
            # breaker), no failover, no retry (each would wait for the same slots), and no
            # attempt made (metrics would count an upstream error).
            exchange.trace.attempts -= 1
            raise ClientError(
                503,
                "server_error",
                "gateway_busy",
                f"All upstream.max_connections connections are in use; none came free within "
                f"{self._connect_timeout:g} s",
                headers={"Retry-After": "1"},
            ) from None
        except http1.ConnectTimeout:
            inc(child(ATTEMPTS, "connect_error"))
            raise UpstreamConnectError(
                f"Timed out connecting to the upstream (no connection within "
                f"{self._connect_timeout:g} s)",
                timeout=True,
            ) from None
        except http1.ReadTimeout:
            inc(child(ATTEMPTS, "timeout"))
            raise UpstreamTimeoutError(
                f"The upstream sent no response within {self._read_timeout:g} s"
            ) from None
        except http1.ConnectError as exc:
            inc(child(ATTEMPTS, "connect_error"))
            raise UpstreamConnectError(f"Cannot connect to the upstream ({exc.os_error})") from None
        except http1.Disconnected:
            inc(child(ATTEMPTS, "connect_error"))
            if self._abort_reason is not None:  # cut by abort_all while waiting for the head
                raise UpstreamConnectError(self._abort_reason, retryable=False) from None
            raise UpstreamConnectError(
                "Upstream connection failed before a response (closed or not HTTP)"
            ) from None
        exchange.trace.upstream_statuses.append(response.status)
        inc(child(ATTEMPTS, str(response.status)))
        return Reply(
            response.status,
            response.headers,
            UpstreamBody(self, response),
            from_upstream=True,
        )

    def abort_all(self, reason: str) -> None:
        """Cut every open upstream body (shutdown grace is over): each stream then ends with
        its dialect's terminal error carrying `reason`, instead of a bare truncation; a request
        still waiting for its answer's head gets a 502 with `reason`; nothing new is sent."""
        self._abort_reason = reason
        for response in list(self._open):
            response.close()
        self._pool.abort()  # requests still waiting for a head, a slot or a connection


class UpstreamBody(AsyncGenerator[bytes, None]):
    """One upstream answer's bytes as the chain's `Body`, read as they arrive (no line limit).

    Unlike an `async def` generator, a read may be cancelled without harm: the connection keeps
    the bytes buffered for the next read, and the body stays open. `reframe` relies on that to
    wait for the first event under a plain timeout (keep-alive comments) without a helper task.
    Ends by releasing the connection to the pool once the whole answer is in, read or not; any
    other end (error, `aclose()` mid-answer, `abort_all`) closes the TCP connection, so the
    upstream stops generating.
    """

    __slots__ = ("_client", "_done", "_response")

    def __init__(self, client: UpstreamClient, response: http1.Response) -> None:
        self._client = client
        self._response = response
        self._done = False
        client._open.add(response)

    def ready(self) -> bool:
        """Bytes are in: the next read returns without waiting."""
        return self._response.ready

    async def splice(self, tap: Callable[[bytes], bool], turn: float | None = None) -> bool:
        """Let `tap` take the body's reads as they arrive (`http1.Response.splice`), until it
        declines one or the answer ends or fails, or for `turn` seconds at most (None: no
        limit, and no timer to allocate); then the next read returns what is left, the end, or
        the error. True when the turn ran out. Returns at once when bytes are already waiting.
        Safe to cancel."""
        if self._done:
            return False
        waiter: asyncio.Future[Any] | None = self._response.splice(tap)
        if waiter is None:
            return False
        timer = None if turn is None else waiter.get_loop().call_later(turn, _end_turn, waiter)
        try:
            return await waiter is True  # the connection's own wake-ups resolve it with None
        finally:
            if timer is not None:
                timer.cancel()
            self._response.unsplice()

    async def asend(self, value: None) -> bytes:
        return await self.__anext__()

    async def __anext__(self) -> bytes:
        # Overridden, not inherited: the mixin would add a coroutine per read on the hot path.
        if self._done:
            raise StopAsyncIteration
        client = self._client
        try:
            data = await self._response.read()
        except http1.ReadTimeout:
            self._end()
            raise UpstreamStreamError(
                f"Upstream SSE stream timed out: no data for {client._read_timeout:g} s",
                timeout=True,
            ) from None
        except (http1.HTTPClientError, OSError):
            self._end()
            raise UpstreamStreamError(client._abort_reason or BROKEN_MESSAGE) from None
        if data:
            return data
        self._end()
        raise StopAsyncIteration

    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> bytes:
        # `aclose()` throws GeneratorExit in here: stop reading, drop the connection.
        self._end()
        if isinstance(val, BaseException):
            raise val
        raise typ

    async def aclose(self) -> None:
        # Overridden: the mixin's throws GeneratorExit into `athrow` and catches it again, once
        # per answer; this ends the body the same way without the exception.
        self._end()

    def __del__(self) -> None:
        # A body some stage dropped without closing: do what closing it would have done (at
        # interpreter exit the loop may be gone; nothing is left to protect then).
        with contextlib.suppress(Exception):
            self._end()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        self._client._open.discard(self._response)
        # Pooled again if the whole answer is in (a reader may stop at `[DONE]`, before the
        # chunked terminator it came with); otherwise closed, which stops the upstream.
        self._response.release()


def _end_turn(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(True)


async def read_limited(body: Body | bytes, limit: int = 64 * 1024) -> bytes:
    """Read at most `limit` bytes of a body (error answers), then close it."""
    if isinstance(body, bytes):
        return body[:limit]
    parts: list[bytes] = []
    size = 0
    try:
        async for data in body:
            parts.append(data)
            size += len(data)
            if size >= limit:
                break
    except UpstreamStreamError:
        pass  # an error answer cut short still has its status; keep what arrived
    finally:
        await body.aclose()
    return b"".join(parts)[:limit]
