"""`reframe` — upstream SSE bytes to the client's wire format (`Reframe`).

Reads: the upstream reply (status, content type, body bytes) and `exchange.dialect`/`stream`.
Changes: a non-200 reply passes through untouched (`retry`, `rate_limit` and the error boundary
act on it wherever they sit); a 200 that is not SSE becomes a `ClientError`; a 200 SSE body is
turned into events by an `event_reader.EventReader` (SSE decoder, JSON or the byte-level text
templates) and fed to the exchange's dialect, yielding one write per upstream read. A failure
before the first downstream byte is raised as a `ClientError` (a plain HTTP error); after it,
the dialect ends the stream with its terminal error event. Non-JSON chunks are skipped and
logged with the request id. `"stream": false` collects the whole answer into one JSON object.
When the sink offers the client's connection (`chain.Downstream`) and the upstream sends one
plain text or thinking chunk per read (a paced stream), those reads are re-framed and written
from the upstream connection's read callback (`_Tap`) until one is anything else; the bytes and
their order are what this loop would have yielded.
Until the first event goes out (DeepSeek queues requests, sending only `: keep-alive`), an SSE
comment goes downstream every `server.keepalive_interval` seconds so proxies do not cut the
client, whether or not the upstream sends comments of its own.
Position: anywhere after `auth` (the default chain has it innermost). Required exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Protocol

from ds2oai import jsonutil
from ds2oai.chain import (
    Body,
    Downstream,
    Exchange,
    LastChunk,
    Next,
    Reply,
    Trace,
    single,
    takes_downstream,
)
from ds2oai.config import Config
from ds2oai.dialects import Dialect
from ds2oai.dialects.chat import ChatDialect
from ds2oai.dialects.completion import CompletionCollector
from ds2oai.dialects.spec import SpecDialect
from ds2oai.errors import ClientError, GatewayError, SSEDecodeError, UpstreamStreamError
from ds2oai.event_reader import EventReader, record_usage
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    StreamBroken,
    UpstreamErrorEvent,
    UpstreamEvent,
)
from ds2oai.metrics import RESUMES
from ds2oai.resume import Progress, ResumePolicy
from ds2oai.sse import encode_comment
from ds2oai.upstream import UpstreamBody, read_limited
from ds2oai.upstream_errors import (
    broken_error,
    upstream_error_fields,
    upstream_event_error,
)

__all__ = [
    "COLLECTORS",
    "CUT_SHORT_MESSAGE",
    "DIALECTS",
    "Collector",
    "DialectSource",
    "Reframe",
    "cut_short",
]

log = logging.getLogger("ds2oai.reframe")


class Collector(Protocol):
    """Non-streaming counterpart of a dialect: accumulate, then `result()` or raise."""

    # As `Dialect.text_literals`: True when `feed` also takes the byte path's delta events.
    text_literals: bool

    @property
    def ended(self) -> bool: ...

    def feed(self, event: UpstreamEvent) -> None: ...

    def result(self) -> dict[str, Any]: ...


class DialectSource(Protocol):
    """An `Exchange.context` that builds its own dialect (routes with per-request state)."""

    def make_dialect(self) -> Dialect: ...

    def make_collector(self) -> Collector: ...


DialectFactory = Callable[[Exchange], Dialect]
CollectorFactory = Callable[[Exchange], Collector]


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:  # the usual case; an ABC isinstance is slow even when it fails
        return False
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _from_context_dialect(exchange: Exchange) -> Dialect:
    source: DialectSource = exchange.context
    return source.make_dialect()


def _from_context_collector(exchange: Exchange) -> Collector:
    source: DialectSource = exchange.context
    return source.make_collector()


DIALECTS: dict[str, DialectFactory] = {
    "spec": lambda exchange: SpecDialect(exchange.exposed_model),
    "chat": lambda exchange: ChatDialect(
        exchange.exposed_model, include_usage=_include_usage(exchange.client_body)
    ),
    "responses": _from_context_dialect,
}

COLLECTORS: dict[str, CollectorFactory] = {
    "spec": lambda exchange: CompletionCollector(exchange.exposed_model),
    "chat": lambda exchange: CompletionCollector(exchange.exposed_model),
    "responses": _from_context_collector,
}

_STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")
_MAX_JSON_ANSWER = 4 * 1024 * 1024
# Seconds at most between two items once the stream started: when a splice runs that long, or
# reads give the client nothing for that long, the body yields an empty item (which the sink
# writes as nothing), so a `passes_downstream` wrapper (such as the per-key limits' body) gets a
# pull that often however the answer streams. Read at each use (tests shorten it).
_SPLICE_TURN = 60.0
_NEVER = math.inf


async def _prepend(first: bytes, rest: Body) -> Body:
    try:
        if first:
            yield first
        async for data in rest:
            yield data
    finally:
        await rest.aclose()


def _completion_as_sse(body: bytes) -> bytes | None:
    """A non-streaming `chat.completion` as the equivalent stream, or None if it is not one."""
    try:
        obj = jsonutil.loads(body)
    except jsonutil.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return None
    delta = {k: message[k] for k in ("role", "content", "reasoning_content") if k in message}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [
            {**call, "index": i} for i, call in enumerate(calls) if isinstance(call, dict)
        ]
    chunk = {
        "id": obj.get("id", ""),
        "object": "chat.completion.chunk",
        "created": obj.get("created", 0),
        "model": obj.get("model", ""),
        "choices": [{"index": 0, "delta": delta, "finish_reason": choices[0].get("finish_reason")}],
        "usage": obj.get("usage"),
    }
    return b"data: " + jsonutil.dumps(chunk) + b"\n\ndata: [DONE]\n\n"


async def _next(body: Body) -> bytes | None:
    """The next upstream read, or None at the end of the body."""
    try:
        return await anext(body)
    except StopAsyncIteration:
        return None


class _Tap:
    """What the loop in `Reframe._stream` does with a read that is one plain text, reasoning or
    tool-call arguments chunk, as a callback for the upstream connection
    (`UpstreamBody.splice(tap.take, turn)`): the dialect's bytes go straight to the client.
    Anything else is declined and left to the loop, as is everything while the client is gone
    or slow (the sink's writes wait for it; these cannot).
    A class rather than a closure: two objects per stream (it and its bound `take`) instead of
    a function, its cells and bound methods, which the cyclic GC would walk for as long as the
    stream lasts; and a bound method is cheaper to call from C than an instance's `__call__`."""

    __slots__ = ("_dialect", "_downstream", "_reader")

    def __init__(self, reader: EventReader, dialect: Dialect, downstream: Downstream) -> None:
        self._reader = reader
        self._dialect = dialect
        self._downstream = downstream

    def take(self, data: bytes) -> bool:
        downstream = self._downstream
        if downstream.blocked:
            return False
        reader = self._reader
        literal = reader.text_literal(data)
        if literal is not None:
            produced = self._dialect.feed_text(literal)
        else:
            literal = reader.reasoning_literal(data)
            if literal is not None:
                produced = self._dialect.feed_reasoning(literal)
            else:
                literal = reader.arguments_literal(data)
                if literal is None:
                    return False
                produced = self._dialect.feed_arguments(reader.arguments_index, literal)
        if produced:
            downstream.write(produced)
        return True


class Reframe:
    name = "reframe"

    def __init__(
        self,
        dialects: Mapping[str, DialectFactory] | None = None,
        collectors: Mapping[str, CollectorFactory] | None = None,
        *,
        secrets: tuple[str, ...] = (),
        keepalive_interval: float = 0.0,
        resume: ResumePolicy | None = None,
    ) -> None:
        self._dialects = dict(DIALECTS if dialects is None else dialects)
        self._collectors = dict(COLLECTORS if collectors is None else collectors)
        self._secrets = secrets
        self._keepalive = keepalive_interval
        self._resume = resume

    @classmethod
    def from_config(cls, config: Config) -> Reframe:
        resume = None
        if config.resume.enabled:
            resume = ResumePolicy(
                max_attempts=config.resume.max_attempts,
                url=config.resume.endpoint(config.upstream.base_url),
            )
        return cls(
            secrets=config.upstream_secrets(),
            keepalive_interval=config.server.keepalive_interval,
            resume=resume,
        )

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        if exchange.dialect not in self._dialects:
            raise ClientError(500, "server_error", "no_dialect", "No such response format")
        reply = await call_next(exchange)
        if reply.status != 200 or not reply.from_upstream:
            return reply  # an error answer: retry/rate_limit/the error boundary deal with it
        upstream_body = await self._as_event_stream(reply)
        if not exchange.stream:
            return await self._collect(exchange, upstream_body)
        dialect = self._dialects[exchange.dialect](exchange)
        stream = self._stream(exchange, upstream_body, dialect, call_next)
        return Reply(200, dict(_STREAM_HEADERS), stream)

    async def _as_event_stream(self, reply: Reply) -> Body:
        """The 200 answer's body as SSE bytes, whatever the upstream labelled it.

        `text/event-stream` is taken as it is. An unlabelled body that starts like SSE is taken
        too (small OpenAI-compatible servers omit the header). A JSON body is an error object
        (-> `ClientError`) or a whole `chat.completion` from an upstream that ignored
        `stream: true` (-> replayed as one chunk). Anything else is a 502.
        """
        content_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "text/event-stream" and not isinstance(reply.body, bytes):
            return reply.body
        if isinstance(reply.body, bytes) or content_type.endswith("json"):
            return self._json_answer(await read_limited(reply.body, _MAX_JSON_ANSWER))
        try:
            first = await anext(reply.body, b"")
        except BaseException:  # broken, or cancelled (the client left): stop the upstream
            await reply.aclose()
            raise
        head = first.lstrip(b"\r\n\t ")
        if head[:1] == b"{":
            rest = await read_limited(reply.body, _MAX_JSON_ANSWER)
            return self._json_answer(first + rest)
        if not head.startswith(_SSE_STARTS):
            await reply.aclose()
            raise self._non_sse_answer(first)
        return _prepend(first, reply.body)

    def _json_answer(self, raw: bytes) -> Body:
        """A whole `chat.completion` is replayed as one chunk; anything else is an error."""
        replay = _completion_as_sse(raw)
        if replay is None:
            raise self._non_sse_answer(raw)
        return single(replay)

    def _non_sse_answer(self, body: bytes) -> ClientError:
        code, message, _ = upstream_error_fields(body)
        if body.strip().startswith(b"{") and b'"error"' in body:
            return upstream_event_error(
                code or "upstream_error", message or "The upstream reported an error", self._secrets
            )
        return ClientError(
            502,
            "upstream_connection_error",
            "upstream_status_200",
            "The upstream answered without an event stream",
        )

    async def _collect(self, exchange: Exchange, body: Body) -> Reply:
        collector = self._collectors[exchange.dialect](exchange)
        reader = EventReader(exchange, self._secrets, templates=collector.text_literals)
        try:
            async for data in body:
                for event in reader.read(data):
                    collector.feed(event)
                if collector.ended:
                    break
            collector.feed(EndOfBody())
        except UpstreamStreamError as exc:
            collector.feed(StreamBroken(exc.message, timeout=exc.timeout))
        except SSEDecodeError as exc:
            collector.feed(StreamBroken(str(exc)))
        finally:
            exchange.trace.upstream_chunks = reader.chunks
            await body.aclose()
        try:
            result = collector.result()
        except ClientError:
            exchange.trace.outcome = "upstream_error"
            raise
        exchange.trace.outcome = "completed"
        await _end(exchange)
        return Reply.json(200, result)

    @takes_downstream
    async def _stream(
        self, exchange: Exchange, body: Body, dialect: Dialect, call_next: Next
    ) -> AsyncGenerator[bytes, Downstream | None]:
        progress = Progress() if self._resume is not None else None
        # Resume needs every chunk's text (Progress), so it keeps the parsed path.
        reader = EventReader(
            exchange, self._secrets, templates=progress is None and dialect.text_literals
        )
        sent = False  # any byte went downstream: failures are events from now on
        started = False  # the dialect produced output: no more keep-alive comments
        # Once something was sent and nothing was yielded since: by when to yield an empty item,
        # so the stages around this body get a pull (see _SPLICE_TURN). Cleared on each yield.
        pull_by = _NEVER
        pending: asyncio.Task[bytes | None] | None = None
        downstream: Downstream | None = None  # offered by the sink (chain.Downstream)
        # The keep-alive clock runs from the last byte the client got: upstream reads that
        # produce nothing (its own comments) do not reset it. `time.monotonic()` is the loops'
        # own clock (asyncio's and libuv's); Python 3.11's get_running_loop() costs a getpid().
        keepalive_at = time.monotonic() + self._keepalive
        idle = False  # the last read gave the client nothing (thinking on the spec route...)
        exchange.trace.answer_open = True
        try:
            while True:
                if idle:
                    # ... the stages around this body still get pulled now and then.
                    idle = False
                    if pull_by == _NEVER:
                        pull_by = time.monotonic() + _SPLICE_TURN
                    elif time.monotonic() >= pull_by:
                        offered = yield b""
                        pull_by = _NEVER
                        if offered is not None:
                            downstream = offered
                literal: bytes | None = None  # the read was one text chunk: no events
                reasoning = False  # ... or one reasoning chunk
                arguments = False  # ... or one tool-call arguments chunk
                events: list[UpstreamEvent]
                try:
                    if not started and self._keepalive > 0:
                        silent = False  # nothing came before the keep-alive deadline
                        data = None
                        if type(body) is UpstreamBody:
                            if body.ready():  # in already: no timer needed
                                data = await anext(body, None)
                            else:  # a cancelled read loses nothing here: a plain timeout
                                try:
                                    async with asyncio.timeout_at(keepalive_at):
                                        data = await anext(body, None)
                                except TimeoutError:
                                    silent = True
                        else:  # another stage's generator: race it from a helper task
                            if pending is None:
                                pending = asyncio.ensure_future(_next(body))
                            wait = max(0.0, keepalive_at - time.monotonic())
                            done, _ = await asyncio.wait((pending,), timeout=wait)
                            if done:
                                data, pending = pending.result(), None
                            else:
                                silent = True
                        if silent:
                            sent = True
                            keepalive_at = time.monotonic() + self._keepalive
                            yield encode_comment()
                            pull_by = _NEVER
                            continue
                    else:
                        try:  # not anext(body, None): its wrapper is one more frame per read
                            data = await body.__anext__()
                        except StopAsyncIteration:
                            data = None
                        else:
                            literal = reader.text_literal(data)
                            if literal is None:
                                literal = reader.reasoning_literal(data)
                                reasoning = literal is not None
                                if literal is None:
                                    literal = reader.arguments_literal(data)
                                    arguments = literal is not None
                    if literal is None:
                        events = [EndOfBody()] if data is None else reader.read(data)
                except UpstreamStreamError as exc:
                    events = [StreamBroken(exc.message, timeout=exc.timeout)]
                except SSEDecodeError as exc:
                    events = [StreamBroken(str(exc))]
                if literal is not None:
                    # A paced stream's usual read, one plain text, thinking or tool-call
                    # arguments chunk: what the loop below makes of it (such a delta never ends
                    # the stream), without its lists.
                    if reasoning:
                        produced = dialect.feed_reasoning(literal)
                    elif arguments:
                        produced = dialect.feed_arguments(reader.arguments_index, literal)
                    else:
                        produced = dialect.feed_text(literal)
                    if produced:
                        sent = started = True
                        offered = yield produced
                        pull_by = _NEVER
                        if offered is not None:
                            downstream = offered
                    if downstream is not None and type(body) is UpstreamBody:
                        # Reads like this one probably follow: the upstream connection hands
                        # them to the client itself until one is not (or the client lags),
                        # or until a pull is due.
                        tap = _Tap(reader, dialect, downstream).take
                        if not downstream.wrapped:  # nothing around this body to pull
                            turned = await body.splice(tap)
                        else:
                            now = time.monotonic()
                            if pull_by == _NEVER:
                                pull_by = now + _SPLICE_TURN
                            turned = now >= pull_by or await body.splice(tap, pull_by - now)
                        if turned:
                            offered = yield b""  # the sink writes it as nothing
                            pull_by = _NEVER
                            if offered is not None:
                                downstream = offered
                        if downstream.blocked:
                            await downstream.drain()
                    elif sent and not produced:
                        idle = True
                    continue
                parts: list[bytes] = []  # joined once: `+=` would copy the growing write
                resumed: Body | None = None
                feed = dialect.feed
                for event in events:
                    if progress is not None:
                        if isinstance(event, Chunk):
                            event = progress.observe(event)
                            if event.usage is not None:  # summed over the attempts
                                record_usage(exchange, event.usage)
                        # Text already produced from this read counts as sent: it will be.
                        if (sent or parts) and self._is_break(event, progress):
                            # Done with this body either way (a break is its end): a whole
                            # answer's connection goes back to the pool for the continuation,
                            # which could otherwise wait on a full pool for it.
                            await body.aclose()
                            resumed = await self._resume_stream(exchange, call_next, progress)
                            if resumed is not None:
                                break
                    if not sent and not parts:
                        self._raise_if_failed_early(exchange.trace, event)
                    produced = feed(event)
                    if produced:
                        parts.append(produced)
                    if dialect.outcome is not None:
                        break
                if dialect.outcome is not None:
                    await _end(exchange)
                if parts:
                    sent = started = True
                    if dialect.outcome is not None:
                        yield LastChunk(b"".join(parts))
                        # Pulled past the end: the terminal event reached the stage outside.
                        exchange.trace.answer_open = False
                        return
                    # Kept from here too: a read that the dialect turns into nothing (thinking
                    # on the spec route) may then be spliced before any text was.
                    offered = yield b"".join(parts)
                    pull_by = _NEVER
                    if offered is not None:
                        downstream = offered
                elif sent:
                    idle = True
                if dialect.outcome is not None:
                    exchange.trace.answer_open = False  # an end that writes nothing
                    return
                if resumed is not None:
                    await body.aclose()
                    body = resumed
                    reader.restart()
        finally:
            trace = exchange.trace
            trace.upstream_chunks = reader.chunks
            if not sent:  # failed before its first byte: an HTTP error, nothing to end
                trace.answer_open = False
            trace.outcome = trace.outcome or dialect.outcome
            if progress is not None and progress.attempts:
                trace.resumes = progress.attempts
                trace.resume_outcome = "completed" if dialect.outcome == "completed" else "failed"
                RESUMES.labels(trace.resume_outcome).inc()
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            # No drain here: closing the body pools the connection when the whole answer is in
            # (DeepSeek sends the chunked terminator with `[DONE]`); reading on for it would
            # cost a loop turn per request for a rare gain.
            await body.aclose()

    def _is_break(self, event: UpstreamEvent, progress: Progress) -> bool:
        """A failure that resume may repair: drop, reset, silence, or an end without finish."""
        if isinstance(event, StreamBroken):
            return True
        return isinstance(event, EndOfBody | Done) and not progress.finished

    async def _resume_stream(
        self, exchange: Exchange, call_next: Next, progress: Progress
    ) -> Body | None:
        """Ask the beta endpoint for the continuation; None when resume is not possible."""
        policy = self._resume
        if policy is None or not progress.resumable() or progress.attempts >= policy.max_attempts:
            return None
        attempt = dataclasses.replace(
            exchange,
            upstream_body=progress.next_attempt(exchange.upstream_body),
            upstream_url=policy.url,
        )
        log.info(
            "resuming broken stream",
            extra={"request_id": exchange.request_id, "resume_attempt": progress.attempts},
        )
        try:
            reply = await call_next(attempt)
        except GatewayError:
            return None
        content_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if reply.status != 200 or content_type != "text/event-stream":
            await reply.aclose()
            return None
        if isinstance(reply.body, bytes):  # pragma: no cover - the endpoint always streams
            return None
        return reply.body

    def _raise_if_failed_early(self, trace: Trace, event: UpstreamEvent) -> None:
        """Before any downstream byte a failure is a plain HTTP error, not an SSE event (its
        outcome is the one the event would have given the stream)."""
        if isinstance(event, StreamBroken):
            trace.outcome = "timeout" if event.timeout else "upstream_broken"
            raise broken_error(event.message, timeout=event.timeout)
        if isinstance(event, EndOfBody | Done):
            trace.outcome = "upstream_broken"
            raise broken_error()
        if isinstance(event, UpstreamErrorEvent):
            trace.outcome = "upstream_error"
            raise upstream_event_error(event.code, event.message, self._secrets)


async def _end(exchange: Exchange) -> None:
    """The route's end-of-answer hook (a Responses answer is stored), once the answer ended."""
    if exchange.on_end is None:
        return
    try:
        await exchange.on_end()
    except Exception:
        log.exception("end-of-answer hook failed", extra={"request_id": exchange.request_id})


async def cut_short(exchange: Exchange, error: BaseException | None) -> bytes:
    """The terminal error event for an answer a stage outside this one cut short after its head
    went out (it raised `error`, or ended the body early: None): the client gets an end it can
    tell from a whole answer, and the answer ends as this stage ends its own (outcome, hook).
    A `ClientError` a stage raised is passed on as it says."""
    if isinstance(error, ClientError):
        type_, code, message = error.type, error.code or error.type, error.message
    else:
        type_, code, message = "server_error", "internal_error", CUT_SHORT_MESSAGE
    trace = exchange.trace
    trace.answer_open = False
    trace.outcome = "upstream_broken"  # SPEC §6's outcomes: the stream broke
    make = DIALECTS.get(exchange.dialect)
    ending = make(exchange).fail(type_, code, message) if make is not None else b""
    await _end(exchange)
    return ending


CUT_SHORT_MESSAGE = "Internal gateway error; the answer was cut short"
