"""`limits` — per-client-key request, token and concurrency limits (`KeyLimits`, SPEC §6).

Reads: `exchange.trace.client_key_id` (set by `auth`; without auth, or with no keys, every
request shares the bucket "anonymous"), the key's limits (`[auth.clients.<name>]` over
`[limits]`), and, when the answer ends, the usage in the trace (`prompt_tokens` +
`completion_tokens`, filled in by `reframe`). Changes: before calling the rest of the chain it
asks the limiter (`ds2oai.limits`: memory, or Redis with `[limits] redis_url`) to admit the
request, which also takes a concurrency slot; over a limit it raises a 429 `rate_limit_error`
(`rate_limit_exceeded`, `tokens_limit_exceeded` or `concurrency_limit_exceeded`) with
`Retry-After`, `retry-after-ms` and the OpenAI `x-ratelimit-*` headers, and the rest of the
chain never runs. An admitted reply gets the `x-ratelimit-*` headers of the limits that apply,
and its body is wrapped so that when it ends, fails or is closed — also closed before its first
item, or when the rest of the chain raises or is cancelled — the slot is given back and the
answer's tokens are charged, exactly once (shielded from cancellation): the usage the routes
ask every upstream answer for (`stream_options.include_usage`), or an estimate when none came.
Position: after `auth` (it limits by key; `from_config` refuses the other order), before
`rate_limit`/`retry`/`reframe` (one admission per client request, not per upstream attempt).
Not in the default chain; `build_middleware` refuses a config that sets limits without it.
Fails: a backend error (Redis unreachable) is counted in `ds2oai_limits_backend_errors_total`
and logged (at most every 10 s, never with the URL's password); `[limits] on_redis_error =
"open"` then lets the request through uncounted, `"closed"` answers 503 `limits_unavailable`.
A slot whose release failed expires with its lease (90 s; while the request runs, a timer
renews it every 30 s, from admission to the end of the answer, streamed or not).
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Final, cast

from ds2oai import jsonutil
from ds2oai.chain import Body, Exchange, Next, Reply, passes_downstream
from ds2oai.config import Config
from ds2oai.errors import ClientError, ConfigError
from ds2oai.limits import (
    DEFAULT_LEASE,
    Decision,
    KeyRule,
    Limiter,
    LimiterError,
    open_limiter,
)
from ds2oai.metrics import LIMITS_BACKEND_ERRORS, LIMITS_REFUSED
from ds2oai.middleware.auth import key_id
from ds2oai.upstream_errors import retry_after_headers

__all__ = ["ANONYMOUS", "KeyLimits", "openai_duration", "rules_from_config"]

log = logging.getLogger("ds2oai.limits")

ANONYMOUS: Final = "anonymous"

_REFUSALS: Final = {
    "requests": "rate_limit_exceeded",
    "tokens": "tokens_limit_exceeded",
    "streams": "concurrency_limit_exceeded",
}


def openai_duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `"20ms"`, `"1s"`, `"1.5s"`, `"6m0s"`."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rules_from_config(config: Config) -> tuple[KeyRule, dict[str, KeyRule]]:
    """The `[limits]` rule and, by key id, the rules of `[auth.clients.*]` that override it."""
    limits = config.limits
    default = KeyRule(
        limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_streams
    )
    rules: dict[str, KeyRule] = {}
    for client in config.auth.clients.values():
        if not client.key:
            continue  # `auth` refuses to start without it
        rules[key_id(client.key)] = KeyRule(
            _pick(client.requests_per_minute, default.requests_per_minute),
            _pick(client.tokens_per_minute, default.tokens_per_minute),
            _pick(client.concurrent_streams, default.concurrent_streams),
        )
    return default, rules


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def charged_tokens(exchange: Exchange) -> int:
    """The tokens an answer costs: the upstream's usage, or, when none came (the client left,
    or the stream broke, before the usage chunk) after the upstream generated something, an
    estimate — else a cut answer would cost nothing and tokens_per_minute could be dodged.

    The estimate: the prompt's characters at DeepSeek's published rates (about 0.3 token per
    ASCII character, 0.6 per other one), plus one token per upstream event received (DeepSeek
    streams token by token)."""
    trace = exchange.trace
    if trace.prompt_tokens is not None or trace.completion_tokens is not None:
        return (trace.prompt_tokens or 0) + (trace.completion_tokens or 0)
    if trace.first_token_at is None:
        return 0  # refused, or failed before its first token (by any attempt): nothing made
    prompt = jsonutil.dumps(exchange.upstream_body.get("messages")).decode()
    ascii_chars = len(prompt.encode("ascii", "ignore"))
    estimate = 0.3 * ascii_chars + 0.6 * (len(prompt) - ascii_chars)
    return math.ceil(estimate) + trace.upstream_chunks


def _headers(rule: KeyRule, decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    if rule.requests_per_minute:
        remaining = max(0, rule.requests_per_minute - decision.requests_used)
        headers["x-ratelimit-limit-requests"] = str(rule.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-reset-requests"] = openai_duration(decision.requests_reset)
    if rule.tokens_per_minute:
        remaining = max(0, rule.tokens_per_minute - decision.tokens_used)
        headers["x-ratelimit-limit-tokens"] = str(rule.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(remaining)
        headers["x-ratelimit-reset-tokens"] = openai_duration(decision.tokens_reset)
    if rule.concurrent_streams:
        # No OpenAI header for concurrency: the same pattern, the limit only (how many are
        # open is known to the limiter, not counted back here), and 0 left when refused.
        headers["x-ratelimit-limit-streams"] = str(rule.concurrent_streams)
        if decision.refused == "streams":
            headers["x-ratelimit-remaining-streams"] = "0"
    return headers


def _refusal(rule: KeyRule, decision: Decision, headers: Mapping[str, str]) -> ClientError:
    reason = decision.refused or "requests"
    wait = max(0.0, decision.retry_after)
    retry = retry_after_headers(wait)
    when = openai_duration(wait)
    if reason == "requests":
        message = (
            f"Rate limit reached for requests: {rule.requests_per_minute} per minute for this "
            f"API key. Please try again in {when}."
        )
    elif reason == "tokens":
        message = (
            f"Rate limit reached for tokens: {rule.tokens_per_minute} per minute for this API "
            f"key (used {decision.tokens_used}). Please try again in {when}."
        )
    else:
        message = (
            f"Too many concurrent requests: {rule.concurrent_streams} at a time for this API "
            "key. Please try again when one has finished."
        )
    return ClientError(
        429, "rate_limit_error", _REFUSALS[reason], message, headers={**headers, **retry}
    )


@passes_downstream
class _GuardedBody(collections.abc.AsyncGenerator[bytes, None]):
    """`source`, calling `on_close` exactly once when it ends, fails or is closed.

    A class, not an async generator: an async generator closed before its first item never
    runs its `finally`, and the slot would leak. It needs none of the items, so it passes the
    sink's `Downstream` on (`chain.passes_downstream`): a paced stream behind per-key limits is
    spliced too.
    """

    def __init__(self, source: Body, on_close: Callable[[], Awaitable[None]]) -> None:
        self._source = source
        self._on_close = on_close
        self._closed = False

    @property
    def source(self) -> Body:
        return self._source

    async def __anext__(self) -> bytes:
        return await self._pull(None)

    async def asend(self, value: Any) -> bytes:
        return await self._pull(value)

    async def _pull(self, value: Any) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            if value is None:
                item = await anext(self._source)
            else:  # the sink's Downstream, for the body this one wraps
                item = await cast("AsyncGenerator[bytes, Any]", self._source).asend(value)
        except BaseException:
            await self.aclose()  # ended, failed or cancelled: give the slot back now
            raise
        return item

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> bytes:
        try:
            if val is None and tb is None:
                return await self._source.athrow(typ)
            return await self._source.athrow(typ, val, tb)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._source.aclose()
        finally:
            await self._on_close()


class KeyLimits:
    name = "limits"

    def __init__(
        self,
        limiter: Limiter,
        default: KeyRule,
        rules: Mapping[str, KeyRule] | None = None,
        *,
        on_backend_error: str = "open",
        renew_every: float = DEFAULT_LEASE / 3,
        log_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_backend_error not in ("open", "closed"):
            raise ValueError("on_backend_error: 'open' or 'closed'")
        self.limiter = limiter
        self._default = default
        self._rules = dict(rules or {})
        self._policy = on_backend_error
        self._renew_every = renew_every
        self._log_every = log_every
        self._clock = clock
        self._last_log = -math.inf
        self._unlogged = 0
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: Config) -> KeyLimits:
        chain = config.middleware.chain
        if "auth" in chain and "limits" in chain and chain.index("auth") > chain.index("limits"):
            raise ConfigError(
                "middleware.chain: 'limits' must come after 'auth' (it limits by client key)"
            )
        default, rules = rules_from_config(config)
        if not config.limits.redis_url and config.server.workers > 1:
            log.warning(
                "[limits] has no redis_url: each worker process counts its own limits",
                extra={"workers": config.server.workers},
            )
        return cls(
            open_limiter(config.limits),
            default,
            rules,
            on_backend_error=config.limits.on_redis_error,
        )

    def rule_for(self, key: str) -> KeyRule:
        return self._rules.get(key, self._default)

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        key = exchange.trace.client_key_id or ANONYMOUS
        rule = self.rule_for(key)
        if rule.unlimited:
            return await call_next(exchange)
        lease = uuid.uuid4().hex
        try:
            decision = await self._acquire(key, rule, lease)
        except LimiterError as exc:
            self._backend_failed("acquire", exc, exchange.request_id)
            if rule.needs_finish:
                # A timed-out script may still have run on Redis: give back what it took.
                self._track(asyncio.ensure_future(self._finish_now(key, rule, lease, 0)))
            if self._policy == "closed":
                raise ClientError(
                    503,
                    "server_error",
                    "limits_unavailable",
                    "Rate limits cannot be checked right now; please retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
            return await call_next(exchange)  # fail open: this request is not counted
        headers = _headers(rule, decision)
        if decision.refused is not None:
            LIMITS_REFUSED.labels(key, decision.refused).inc()
            raise _refusal(rule, decision, headers)
        if not rule.needs_finish:
            return self._decorate(await call_next(exchange), headers)

        # The slot's lease is short (a stalled Redis or a dead process must not block a key
        # for long): a timer renews it from here until `finish`, whatever the request waits on.
        renewer = (
            asyncio.ensure_future(self._keep_leased(key, lease, exchange.request_id))
            if rule.concurrent_streams
            else None
        )

        async def finish() -> None:
            if renewer is not None:
                renewer.cancel()
            await self._finish(key, rule, lease, exchange)

        try:
            reply = await call_next(exchange)
        except BaseException:
            await finish()
            raise
        if isinstance(reply.body, bytes):
            await finish()
            return self._decorate(reply, headers)

        body = _GuardedBody(reply.body, finish)
        return self._decorate(dataclasses.replace(reply, body=body), headers)

    async def _keep_leased(self, key: str, lease: str, request_id: str) -> None:
        """Renew the concurrency slot every `renew_every` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                await self.limiter.renew(key, lease)
            except LimiterError as exc:
                self._backend_failed("renew", exc, request_id)

    async def _acquire(self, key: str, rule: KeyRule, lease: str) -> Decision:
        """`limiter.acquire`, shielded: if the client leaves while Redis is answering, a slot
        the script took anyway is given back as soon as the answer arrives."""
        task = asyncio.ensure_future(self.limiter.acquire(key, rule, lease))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._abandoned(done, key, rule, lease))
            raise

    def _abandoned(self, task: asyncio.Task[Decision], key: str, rule: KeyRule, lease: str) -> None:
        if task.cancelled() or task.exception() is not None or task.result().refused is not None:
            return
        if rule.needs_finish:
            self._track(asyncio.ensure_future(self._finish_now(key, rule, lease, 0)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    def _decorate(reply: Reply, headers: Mapping[str, str]) -> Reply:
        if reply.from_upstream or not headers:
            return reply  # an untranslated upstream error: the sink renders it from its own
        return dataclasses.replace(reply, headers={**reply.headers, **headers})

    async def _finish(self, key: str, rule: KeyRule, lease: str, exchange: Exchange) -> None:
        """Give the slot back and charge the answer's tokens, even if we are being cancelled."""
        tokens = charged_tokens(exchange) if rule.tokens_per_minute else 0
        task = asyncio.ensure_future(self._finish_now(key, rule, lease, tokens))
        self._track(task)
        await asyncio.shield(task)

    async def _finish_now(self, key: str, rule: KeyRule, lease: str, tokens: int) -> None:
        try:
            await self.limiter.finish(key, rule, lease, tokens)
        except LimiterError as exc:
            self._backend_failed("finish", exc, None)

    def _backend_failed(self, operation: str, exc: LimiterError, request_id: str | None) -> None:
        LIMITS_BACKEND_ERRORS.labels(operation, self._policy).inc()
        self._unlogged += 1
        now = self._clock()
        if now - self._last_log < self._log_every:
            return
        log.warning(
            "limits backend failed",
            extra={
                "operation": operation,
                "on_redis_error": self._policy,
                "error": str(exc),  # LimiterError messages carry no password
                "failures": self._unlogged,
                "request_id": request_id,
            },
        )
        self._last_log = now
        self._unlogged = 0

    async def aclose(self) -> None:
        """Wait for pending releases, then close the limiter (called when the app stops)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        try:
            await self.limiter.close()
        except LimiterError as exc:
            log.warning("limits backend close failed", extra={"error": str(exc)})
