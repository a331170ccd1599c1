"""The request chain: `Exchange` in, `Reply` out, through an ordered list of middleware.

server.py builds an `Exchange` from the HTTP request and calls the folded chain; the innermost
handler is the upstream call (`upstream.py`). A middleware may replace the exchange (with
`dataclasses.replace`, never by mutating what another attempt also sees), short-circuit with a
`Reply` or a `ClientError`, or wrap `reply.body` in a new async iterator that closes the source
in `finally`. Bodies are lazy: nothing reaches the client until the sink in server.py pulls the
first item, so retry and error translation work until then. The sink may hand the client's
connection (`Downstream`) to a body it reads unwrapped from a generator that asked for it
(`takes_downstream`; `reframe` does), or through a wrapper class that declared it needs none of
the items (`passes_downstream`; the per-key limits' body does). This module builds the chain
from `[middleware] chain` once at start-up and refuses to start on any bad entry, naming it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import AsyncGeneratorType, CodeType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from ds2oai import jsonutil
from ds2oai.config import Config
from ds2oai.errors import ConfigError
from ds2oai.metrics import MIDDLEWARE_SECONDS, observe

__all__ = [
    "Body",
    "Downstream",
    "Exchange",
    "LastChunk",
    "Middleware",
    "Next",
    "Reply",
    "Trace",
    "build_middleware",
    "fold",
    "passes_downstream",
    "single",
    "takes_downstream",
    "wants_downstream",
]

Body = AsyncGenerator[bytes, None]
_F = TypeVar("_F", bound=Callable[..., Any])


class Downstream(Protocol):
    """The client's connection, which the sink offers to a body that asked for it.

    Only a body made by a `takes_downstream` generator function that reaches the sink as it is
    (no stage wrapped it, or only `passes_downstream` wrappers) gets it: the sink sends it with
    every pull after the first (`body.asend(downstream)`).
    Such a body may write items straight to the client while the sink waits on the pull: they
    go out in order, after the item the sink wrote last and before the one the pull returns.
    A stage that wraps the body therefore sees every byte, whatever it does with sent values
    or attribute reads, unless its wrapper class is registered with `passes_downstream`. A
    taker writes nothing after it yielded a `LastChunk` (the sink may still hold that item
    while it looks ahead).
    `reframe` does this for paced text and thinking chunks (see `http1.Response.splice`).
    """

    @property
    def blocked(self) -> bool:
        """The client is gone or is not keeping up: hand items to the sink, which waits."""
        ...

    @property
    def wrapped(self) -> bool:
        """The offer came through `passes_downstream` wrappers, which want a pull now and then
        (see there); False: the sink reads the taker itself."""
        ...

    def write(self, data: bytes) -> None:
        """One item, framed as the sink frames its writes, written at once."""
        ...

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was written."""
        ...


_TAKERS: set[CodeType] = set()
_PASSERS: set[type] = set()
_C = TypeVar("_C", bound=type)


def takes_downstream(func: _F) -> _F:
    """Decorator for an async generator function whose bodies take the sink's `Downstream`
    (through `asend`) when one of them reaches the sink unwrapped."""
    _TAKERS.add(func.__code__)
    return func


def passes_downstream(cls: _C) -> _C:
    """Class decorator for a body wrapper that needs none of its body's items (it only acts
    when pulled, ended or closed) and keeps the body it wraps as `source`: its `asend(value)`
    must send `value` on to `source`. The sink may then offer its `Downstream` through the
    wrapper, and items written that way never pass it. A taker still yields now and then while
    it writes directly (`reframe`: an empty item at least every minute), so such a wrapper's
    time-based work (a lease renewal) keeps going. Only the exact class is trusted, not its
    subclasses."""
    _PASSERS.add(cls)
    return cls


def wants_downstream(body: object) -> bool:
    """Whether the sink may offer `body` its `Downstream`: `body` comes from a
    `takes_downstream` function, itself or inside `passes_downstream` wrappers only. No
    per-request state: nothing to allocate. Exact types are checked: a proxy that forwards
    attribute reads (`__getattr__`) would otherwise pass for the generator it wraps."""
    kind = type(body)
    if kind is AsyncGeneratorType:
        return cast(AsyncGeneratorType[Any, Any], body).ag_code in _TAKERS
    if kind in _PASSERS:
        return wants_downstream(cast(Any, body).source)
    return False


class LastChunk(bytes):
    """A body item that promises the body ends right after it, without waiting.

    Only a hint: the sink still pulls the next item and, when there is none, sends this one
    together with the end of the response (one write instead of two). A stage that rewrites
    items yields plain bytes and loses nothing but that write.
    """

    __slots__ = ()


async def single(data: bytes) -> Body:
    """A body of one item (used for JSON answers that still go through stream stages)."""
    yield data


@dataclass(slots=True)
class Trace:
    """Per-request facts for logs and metrics. The one mutable part of an exchange, on purpose:
    it records what happened (attempts, upstream statuses, outcome), it never steers the chain."""

    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    upstream_statuses: list[int] = field(default_factory=list)
    outcome: str | None = None
    first_byte_at: float | None = None
    first_token_at: float | None = None
    first_comment_at: float | None = None
    queue_wait: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    upstream_chunks: int = 0  # events with a payload the answer's upstream body carried
    client_key_id: str | None = None
    malformed_chunks: int = 0
    resumes: int = 0
    resume_outcome: str | None = None
    # The reframe stage is streaming an answer whose terminal event has not yet been taken from
    # it: a stage outside it that fails, or ends the body, now cuts the answer short (the sink
    # then ends it with the dialect's error event).
    answer_open: bool = False


@dataclass(frozen=True, slots=True)
class Exchange:
    """One client request on its way upstream.

    `upstream_body` is the JSON object the upstream will receive (model mapped, `stream: true`);
    `client_body` is what the client sent. Both are treated as immutable: change them with
    `dataclasses.replace(exchange, upstream_body={**exchange.upstream_body, ...})`.
    """

    request_id: str
    route: str
    dialect: str
    stream: bool
    exposed_model: str
    client_body: Mapping[str, Any]
    upstream_body: Mapping[str, Any]
    client_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    client_key: str | None = field(default=None, repr=False)
    # Set only by the gateway (resume uses the beta endpoint), never from the client.
    upstream_url: str | None = None
    attempt: int = 0
    trace: Trace = field(default_factory=Trace, compare=False)
    # Route-specific state the dialect factory reads (e.g. a stored-responses session).
    context: Any = field(default=None, compare=False, repr=False)
    # Awaited by `reframe` once the answer reached its terminal state, before the last bytes
    # go out (so a stored response is retrievable as soon as the client sees the end).
    on_end: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """A response on its way back: `body` is bytes (a complete answer) or a lazy `Body`.

    `from_upstream` marks the upstream's own answer, untranslated (raw bytes, lower-cased header
    names). Stages pass a non-200 one through untouched so `retry` and `rate_limit` can act on
    its status wherever they sit; the error boundary translates whatever is left (SPEC §4).
    `retried`: the gateway already retried the request and gave up on this answer, so the
    client is told not to retry it again (`x-should-retry: false`).
    """

    status: int
    headers: Mapping[str, str]
    body: bytes | Body
    from_upstream: bool = False
    retried: bool = False

    @classmethod
    def json(cls, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(
            status, {"Content-Type": "application/json", **(headers or {})}, jsonutil.dumps(obj)
        )

    async def aclose(self) -> None:
        """Close the body if it is a stream (idempotent: async generators allow repeated aclose)."""
        if not isinstance(self.body, bytes):
            await self.body.aclose()


Next = Callable[[Exchange], Awaitable[Reply]]


@runtime_checkable
class Middleware(Protocol):
    """A stage of the chain. `name` labels its options section, logs and metrics."""

    name: str

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply: ...


def fold(middlewares: Sequence[Middleware], endpoint: Next) -> Next:
    """Fold the list once, first entry outermost."""
    handler = endpoint
    for middleware in reversed(middlewares):
        handler = _bind(middleware, handler)
    return handler


def _bind(middleware: Middleware, call_next: Next) -> Next:
    timer = MIDDLEWARE_SECONDS.labels(middleware.name)

    async def handler(exchange: Exchange) -> Reply:
        started = time.perf_counter()
        try:
            return await middleware(exchange, call_next)
        finally:
            observe(timer, time.perf_counter() - started)

    handler.__qualname__ = f"chain[{middleware.name}]"
    return handler


BuiltinFactory = Callable[[Config], Middleware]


def _import_entry(entry: str, paths: Sequence[str], builtin_names: Sequence[str]) -> Any:
    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"middleware.chain: {entry!r} is neither a built-in "
            f"({', '.join(builtin_names)}) nor 'module:attr'"
        )
    for path in paths:
        resolved = str(Path(path).resolve())
        if resolved not in sys.path:
            sys.path.insert(0, resolved)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"middleware.chain: cannot import {entry!r}: {exc}") from None
    try:
        target = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigError(f"middleware.chain: {entry!r}: no attribute {attr!r}") from None
    return target


def _takes_exchange_and_next(middleware: Middleware) -> bool:
    """Its `__call__` is a coroutine function that can be called as the chain calls it."""
    call = middleware.__call__
    if not inspect.iscoroutinefunction(call):
        return False
    try:
        inspect.signature(call).bind(None, None)
    except (TypeError, ValueError):
        return False
    return True


def build_middleware(config: Config, builtins: Mapping[str, BuiltinFactory]) -> list[Middleware]:
    """Instantiate `[middleware] chain` in order; every failure is a `ConfigError` naming it."""
    section = config.middleware
    built: list[Middleware] = []
    used_options: set[str] = set()
    for entry in section.chain:
        if entry in builtins:
            if entry in section.options:
                raise ConfigError(
                    f"middleware.{entry}: built-in options live in their own section [{entry}]"
                )
            middleware = builtins[entry](config)
        else:
            factory = _import_entry(entry, section.paths, sorted(builtins))
            if not callable(factory):
                raise ConfigError(f"middleware.chain: {entry!r} is not callable")
            declared = getattr(factory, "name", None)
            options = dict(section.options.get(declared, {})) if isinstance(declared, str) else {}
            if isinstance(declared, str) and declared in section.options:
                used_options.add(declared)
            try:
                inspect.signature(factory).bind(**options)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"middleware.{declared or entry}: bad options: {exc}") from None
            try:
                middleware = factory(**options)
            except Exception as exc:
                raise ConfigError(f"middleware.chain: {entry!r} failed to start: {exc}") from None
        name = getattr(middleware, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"middleware.chain: {entry!r} has no string attribute 'name'")
        if not isinstance(middleware, Middleware) or not _takes_exchange_and_next(middleware):
            raise ConfigError(
                f"middleware.chain: {entry!r} is not a middleware "
                "(it needs async __call__(exchange, call_next))"
            )
        if any(m.name == name for m in built):
            raise ConfigError(f"middleware.chain: duplicate middleware name {name!r}")
        built.append(middleware)
    unused = set(section.options) - used_options
    if unused:
        raise ConfigError(
            f"middleware.{sorted(unused)[0]}: options for a middleware not in the chain"
        )
    if sum(1 for m in built if m.name == "reframe") != 1:
        raise ConfigError("middleware.chain: 'reframe' must appear exactly once")
    keyed = bool(config.auth.api_keys or config.auth.key_file or config.auth.clients)
    if keyed and not any(m.name == "auth" for m in built):
        # SECURITY: keys are configured, so the operator expects them checked; without the
        # stage both chat routes would answer anyone.
        raise ConfigError(
            "auth: client keys are configured but 'auth' is not in [middleware] chain; add "
            'it, e.g. chain = ["auth", "rate_limit", "retry", "reframe"]'
        )
    limited = config.limits.sets_limits() or any(
        client.sets_limits() for client in config.auth.clients.values()
    )
    if limited and not any(m.name == "limits" for m in built):
        raise ConfigError(
            "limits: per-key limits are set but 'limits' is not in [middleware] chain; add it "
            'after "auth", e.g. chain = ["auth", "limits", "rate_limit", "retry", "reframe"]'
        )
    return built
