"""The HTTP server: routes, the error boundary and the sink. The only module importing aiohttp.web.

A request becomes an `Exchange` (body read with a size limit, validated, mapped), runs through
the chain folded once at start-up, and the resulting `Reply` is written by the sink: a complete
body as one `web.Response`; a streamed body by pulling its first item *before* `prepare()` (so
a failure up to then is still a plain HTTP error), then writing each item as it comes and
draining, which makes a slow client slow the upstream read. With each pull the sink offers a body
that asked for it (`chain.takes_downstream`) the client's connection (`chain.Downstream`), for
writes made while it waits on that pull.
A client that goes away cancels the handler (`handler_cancellation`), and closing the body
closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import AsyncGeneratorType
from typing import Any, cast

from aiohttp import HttpVersion11, web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

from ds2oai import __version__, body_encoding, jsonutil, logs, metrics
from ds2oai.chain import (
    Downstream,
    Exchange,
    LastChunk,
    Next,
    Reply,
    Trace,
    build_middleware,
    fold,
    wants_downstream,
)
from ds2oai.config import Config
from ds2oai.errors import ClientError, GatewayError
from ds2oai.inbound import chat_request, parse_json_body
from ds2oai.middleware import BUILTINS
from ds2oai.middleware.auth import BearerAuth, key_id
from ds2oai.middleware.reframe import cut_short
from ds2oai.readiness import Readiness
from ds2oai.responses_input import parse_responses_request
from ds2oai.responses_session import ResponsesSession
from ds2oai.sealing import Sealer
from ds2oai.store import ResponseStore, StoredResponse, open_store
from ds2oai.upstream import UpstreamClient, read_limited
from ds2oai.upstream_errors import client_error_for, error_from_upstream

__all__ = ["CHAIN", "CONFIG", "UPSTREAM", "create_app"]

log = logging.getLogger("ds2oai.server")
access = logging.getLogger("ds2oai.access")

CONFIG = web.AppKey("config", Config)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
CHAIN: web.AppKey[Next] = web.AppKey("chain")
READINESS = web.AppKey("readiness", Readiness)
STORE = web.AppKey("store", ResponseStore)
SEALER = web.AppKey("sealer", Sealer)
OWNS_PROCESS = web.AppKey("owns_process", bool)
AUTH = web.AppKey("auth", BearerAuth)
# Keys are configured and `auth` is the chain's first stage (as by default).
AUTH_FIRST = web.AppKey("auth_first", bool)
MODEL_LABELS: web.AppKey[frozenset[str]] = web.AppKey("model_labels")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID = web.RequestKey("request_id", str)
# The tasks handling a request right now, for the shutdown to cancel what outlives its grace.
_HANDLERS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("handlers")
_PREPARED = web.RequestKey("prepared", bool)
_EXCHANGE = web.RequestKey("exchange", Exchange)

# Client headers never copied anywhere: hop-by-hop and credentials.
_DROP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "cookie",
    }
)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if _REQUEST_ID.match(given):
        return given
    # An identifier, not a secret: the PRNG is enough and avoids a getrandom() syscall.
    return f"{random.getrandbits(128):032x}"


def _error_response(error: ClientError, request_id: str) -> web.Response:
    headers = {**error.headers, "X-Request-Id": request_id}
    response = web.Response(
        status=error.status,
        body=jsonutil.dumps(error.to_json()),
        content_type="application/json",
        headers=headers,
    )
    if headers.get("Connection", "").lower() == "close":
        # aiohttp keeps a connection alive by the request's headers, not the answer's.
        response.force_close()
    return response


@web.middleware
async def error_boundary(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost: every failure before the first byte becomes an OpenAI-style JSON error."""
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    started = time.monotonic()
    status = 500
    handlers = request.app[_HANDLERS]
    task = asyncio.current_task()
    if task is not None:
        handlers.add(task)
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:  # a streamed answer set it before its head went out
            response.headers.setdefault("X-Request-Id", request_id)
        return response
    except GatewayError as exc:
        error = client_error_for(exc)
        status = error.status
        return _error_response(error, request_id)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 413:
            code, message = "body_too_large", "The request body is larger than the limit"
        elif exc.status == 405:
            code, message = "method_not_allowed", f"Method {request.method} is not allowed here"
        elif exc.status == 404:
            code, message = "not_found", f"No route for {request.method} {request.path}"
        else:
            raise
        err = ClientError(
            exc.status, "invalid_request_error", code, message, headers=_allow_header(exc)
        )
        return _error_response(err, request_id)
    except asyncio.CancelledError as exc:
        if (
            _SHUTDOWN_CUT in exc.args
            and task is not None
            and task.cancelling() == 1  # ours alone: a client's own cancel is not swallowed
            and not request.get(_PREPARED)
        ):
            # Our own cancel (the shutdown grace is over) and nothing sent yet: say so.
            task.uncancel()
            status = 503
            err = ClientError(
                503,
                "server_error",
                "shutting_down",
                "The gateway is shutting down; try again",
                headers={"Connection": "close"},
            )
            return _error_response(err, request_id)
        status = 499
        raise
    except Exception:
        if request.get(_PREPARED):
            raise  # the stream already started: aiohttp drops the connection, never a fake end
        log.exception("unhandled error", extra={"request_id": request_id})
        status = 500
        err = ClientError(500, "server_error", "internal_error", "Internal gateway error")
        return _error_response(err, request_id)
    finally:
        if task is not None:
            handlers.discard(task)
        _record(request, status)
        _log_request(request, request_id, status, started)


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def _record(request: web.Request, status: int) -> None:
    """Metrics for one finished request (never raises)."""
    metrics.inc(metrics.child(metrics.REQUESTS, _route_label(request), str(status)))
    exchange = request.get(_EXCHANGE)
    if exchange is None:
        return
    trace = exchange.trace
    # An answer that failed before streaming counts only if the upstream was involved (a 401
    # from `auth` or a 429 from `limits` is not a stream outcome).
    outcome = trace.outcome or ("upstream_error" if status >= 400 and trace.attempts else None)
    if outcome is not None:
        metrics.inc(metrics.child(metrics.STREAMS, exchange.dialect, outcome))
    if trace.first_token_at is not None:
        metrics.observe(metrics.TTFT, trace.first_token_at - trace.started)
    model = exchange.exposed_model
    if model not in request.app[MODEL_LABELS]:
        # A name the client made up (it was sent as the default): label values stay bounded.
        model = str(exchange.upstream_body.get("model", "other"))
    if trace.prompt_tokens:
        metrics.inc(metrics.child(metrics.TOKENS, model, "in"), trace.prompt_tokens)
    if trace.completion_tokens:
        metrics.inc(metrics.child(metrics.TOKENS, model, "out"), trace.completion_tokens)


def _allow_header(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _log_request(request: web.Request, request_id: str, status: int, started: float) -> None:
    if not request.app[CONFIG].logging.access_log:
        return
    exchange = request.get(_EXCHANGE)
    entry: dict[str, Any] = {
        "request_id": request_id,
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
    }
    if exchange is not None:
        trace = exchange.trace
        entry.update(
            route=exchange.route,
            model=exchange.exposed_model,
            stream=exchange.stream,
            outcome=trace.outcome,
            attempts=trace.attempts,
            upstream_statuses=trace.upstream_statuses,
            key_id=trace.client_key_id,
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=trace.completion_tokens,
            malformed_chunks=trace.malformed_chunks or None,
            resumes=trace.resumes or None,
            resume_outcome=trace.resume_outcome,
            queue_wait_ms=round(trace.queue_wait * 1000, 2) if trace.queue_wait else None,
        )
        if trace.first_token_at is not None:
            entry["ttft_ms"] = round((trace.first_token_at - trace.started) * 1000, 2)
        if request.app[CONFIG].logging.log_content:
            body = exchange.client_body
            entry["content"] = {
                k: body[k] for k in ("messages", "input", "instructions") if k in body
            }
    logs.info(access, "request", entry)


async def _read_body(request: web.Request, limit: int) -> bytes:
    codings = [
        "gzip" if coding == "x-gzip" else coding  # the same (RFC 9110 8.4.1.3)
        for line in request.headers.getall("Content-Encoding", ())
        for coding in (part.strip().lower() for part in line.split(","))
        if coding not in ("", "identity")
    ]
    if len(codings) > 1 or (codings and codings[0] not in body_encoding.ENCODINGS):
        named = ", ".join(codings)[:60]
        raise _bad_encoding(f"Content-Encoding {named!r} is not supported (one of gzip or deflate)")
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():  # already received whole: no timer needed
            raw = await request.read()
        else:
            async with asyncio.timeout(request.app[CONFIG].server.body_timeout):
                raw = await request.read()
    except TimeoutError:
        raise ClientError(
            408,
            "invalid_request_error",
            "body_timeout",
            "The request body did not arrive in time",
            headers={"Connection": "close"},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except web.RequestPayloadError:  # its framing broke (a bad chunk, say)
        raise _bad_encoding("The request body could not be read as its headers say") from None
    if not codings:
        return raw
    try:
        return body_encoding.inflate(raw, codings[0], limit)
    except body_encoding.BodyTooLarge:
        raise _too_large(limit, " once decoded") from None
    except body_encoding.InvalidEncoding:  # read whole: the connection stays usable
        raise _bad_encoding(
            f"The request body could not be decoded as {codings[0]}", close=False
        ) from None


def _too_large(limit: int, how: str = "") -> ClientError:
    return ClientError(
        413,
        "invalid_request_error",
        "body_too_large",
        f"The request body is over {limit} bytes{how}",
    )


def _bad_encoding(message: str, *, close: bool = True) -> ClientError:
    # `close`: the body stays unread on the connection, which must close after the answer.
    return ClientError(
        400,
        "invalid_request_error",
        "invalid_body_encoding",
        message,
        headers={"Connection": "close"} if close else None,
    )


class _StreamedReply(web.StreamResponse):
    """A `StreamResponse` that keeps its status line and headers until the first body write,
    as aiohttp does for a plain `Response`: the sink prepares with the first bytes already in
    hand, so head and first event leave in one write (one syscall, one packet) instead of two.
    The switch is aiohttp's class attribute (3.12+, not public API): should it go away, the
    head simply leaves on its own again.
    """

    _send_headers_immediately = False


class _Downstream:
    """`chain.Downstream` over aiohttp's own writer: the transport it writes to, its framing.

    Written only between the sink's writes (while it waits on a pull), so the writer's own
    state (headers sent, not at EOF) holds throughout; its `output_size` counts these bytes
    too. `blocked` is the transport closing or past its high-water mark
    (`writing_paused`), after which `drain()` is the writer's own wait.
    """

    __slots__ = ("_chunked", "_protocol", "_transport", "_writer", "wrapped")

    def __init__(
        self,
        protocol: RequestHandler,
        writer: StreamWriter,
        transport: asyncio.Transport,
        wrapped: bool,
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._writer = writer
        self._chunked = writer.chunked
        self.wrapped = wrapped

    @property
    def blocked(self) -> bool:
        return self._transport.is_closing() or self._protocol.writing_paused

    def write(self, data: bytes) -> None:
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._transport.write(data)
        # What aiohttp's own writes count, for `response.body_length` (its access log's %b).
        self._writer.output_size += len(data)

    async def drain(self) -> None:
        await self._writer.drain()


def _downstream(
    request: web.Request, response: web.StreamResponse, writer: object, body: object
) -> _Downstream | None:
    """The client's connection for the body to write to directly, when the response is written
    by aiohttp's own `StreamWriter` as bytes framed (or not) by HTTP/1.1 itself; None when it
    is compressed, bounded by a Content-Length some stage set (aiohttp cuts writes past it),
    or written some other way."""
    if type(writer) is not StreamWriter or response.compression or writer.length is not None:
        return None
    transport = writer.transport
    if transport is None:
        return None
    wrapped = type(body) is not AsyncGeneratorType  # a `passes_downstream` wrapper's
    return _Downstream(request.protocol, writer, transport, wrapped)


def _client_headers(request: web.Request) -> dict[str, str]:
    drop = _DROP_HEADERS
    listed = request.headers.getall("Connection", ())
    if listed:  # RFC 9110 7.6.1: headers it names are hop-by-hop too
        drop = drop | {name.strip().lower() for line in listed for name in line.split(",")}
    return {k.lower(): v for k, v in request.headers.items() if k.lower() not in drop}


async def _send(request: web.Request, exchange: Exchange, reply: Reply) -> web.StreamResponse:
    """The sink: the only place that touches the aiohttp response."""
    if reply.from_upstream:
        # An upstream answer no stage translated (an error status): SPEC §4's table.
        config = request.app[CONFIG]
        raw = await read_limited(reply.body)
        raise error_from_upstream(
            reply.status,
            reply.headers,
            raw,
            secrets=config.upstream_secrets(),
            default_retry_after=config.rate_limit.default_retry_after,
            retried=reply.retried,
        )
    headers = {**reply.headers, "X-Request-Id": exchange.request_id}
    if isinstance(reply.body, bytes):
        if not _sendable(headers):
            raise _unsendable_headers(exchange)
        return web.Response(status=reply.status, body=reply.body, headers=headers)
    body = reply.body
    trace = exchange.trace
    in_flight = False
    try:
        try:
            first: bytes | None = await anext(body)
        except StopAsyncIteration:
            first = None
        # After the first pull, so the stages' generators have started and their cleanup
        # runs when the body is closed; before the head, so the 500 is a clean one.
        if not _sendable(headers):
            raise _unsendable_headers(exchange)
        response = _StreamedReply(status=reply.status, headers=headers)
        if request.version < HttpVersion11:
            # HTTP/1.0 has no chunking: the end of the connection is the end of the stream,
            # even when the client asked to keep it alive.
            response.force_close()
        request[_PREPARED] = True
        stream_writer = await response.prepare(request)
        direct = (
            _downstream(request, response, stream_writer, body) if wants_downstream(body) else None
        )
        taker = cast("AsyncGenerator[bytes, Downstream | None]", body)
        trace.first_byte_at = time.monotonic()
        metrics.inc(metrics.IN_FLIGHT)
        in_flight = True
        item: bytes | None = None
        try:
            measured = False
            item = first
            while item is not None:
                ahead = None
                if type(item) is LastChunk:
                    ahead = await anext(body, None)
                    if ahead is None:
                        # The body ended as promised: its last bytes and the end in one write.
                        await response.write_eof(item)
                        break
                if item:
                    await response.write(item)
                    if not measured:
                        measured = _added_latency(trace)
                item = None
                if ahead is not None:
                    item = ahead
                    continue
                try:  # not anext(body, None): its wrapper is one more frame per event
                    item = await (body.__anext__() if direct is None else taker.asend(direct))
                except StopAsyncIteration:
                    item = None
            else:
                if trace.answer_open:
                    # A stage outside reframe ended the body before the answer's end.
                    log.error(
                        "a stage ended the answer early; it ends with an error event",
                        extra={"request_id": exchange.request_id},
                    )
                    await body.aclose()
                    await response.write_eof(await cut_short(exchange, None))
                else:
                    await response.write_eof()
            if not measured:
                _added_latency(trace)
        except Exception as exc:
            transport = request.transport
            if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
                # The client went away mid-stream: stop reading upstream (finally closes it).
                trace.outcome = "client_cancelled"
                return response
            # A stage failed after the head went out: the status is sent, so the answer ends
            # with its dialect's error event, or with its end if the sink holds it already.
            log.exception(
                "a stage failed mid-stream; the answer ends with an error event",
                extra={"request_id": exchange.request_id},
            )
            await body.aclose()
            if type(item) is LastChunk:
                ending: bytes = item
            elif trace.answer_open:
                ending = await cut_short(exchange, exc)
            else:
                ending = b""
            with contextlib.suppress(ConnectionError):
                await response.write_eof(ending)
        return response
    except asyncio.CancelledError as exc:
        if _SHUTDOWN_CUT not in exc.args:
            trace.outcome = "client_cancelled"
        raise
    finally:
        if in_flight:
            metrics.inc(metrics.IN_FLIGHT, -1)
        await body.aclose()


async def _chat_like(request: web.Request, dialect: str) -> web.StreamResponse:
    config = request.app[CONFIG]
    headers = _client_headers(request)
    if request.app[AUTH_FIRST]:
        # The chain's first stage would refuse a caller without a key anyway: do it before
        # reading (and inflating) a body that only a key holder may make the gateway hold.
        request.app[AUTH].authenticate(headers)
    raw = await _read_body(request, config.server.max_body_bytes)
    client_body = parse_json_body(raw)
    parsed = chat_request(client_body, config.models)
    exchange = Exchange(
        request_id=request[REQUEST_ID],
        route=dialect,
        dialect=dialect,
        stream=parsed.stream,
        exposed_model=parsed.exposed_model,
        client_body=client_body,
        upstream_body=parsed.upstream_body,
        client_headers=headers,
        trace=Trace(),
    )
    request[_EXCHANGE] = exchange
    reply = await request.app[CHAIN](exchange)
    return await _send(request, exchange, reply)


# What aiohttp refuses in a header line (only when it writes the head, which for a stream is
# with its first bytes: too late for a clean error): control characters but tab, and DEL.
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _sendable(headers: dict[str, str]) -> bool:
    for name, value in headers.items():
        if type(name) is not str or type(value) is not str:
            return False
        # `isprintable` (C, no regex) is false for every control character, and for tab,
        # which aiohttp accepts: only then is the exact rule asked.
        if not (name.isprintable() and value.isprintable()) and (
            _UNSENDABLE.search(name) or _UNSENDABLE.search(value)
        ):
            return False
    return True


def _unsendable_headers(exchange: Exchange) -> ClientError:
    log.error(
        "a stage set a header no HTTP head can carry; answering 500",
        extra={"request_id": exchange.request_id},
    )
    return ClientError(500, "server_error", "internal_error", "Internal gateway error")


def _added_latency(trace: Trace) -> bool:
    """Observe once: upstream's first token in -> written downstream (the gateway's share)."""
    if trace.first_token_at is None:
        return False
    metrics.observe(metrics.ADDED_LATENCY, time.monotonic() - trace.first_token_at)
    return True


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """SPEC §3: the gateway's own named-event dialect."""
    return await _chat_like(request, "spec")


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    """SPEC §5: the official `chat.completion.chunk` stream for unmodified OpenAI SDKs."""
    return await _chat_like(request, "chat")


def _not_found(response_id: str) -> ClientError:
    return ClientError(
        404,
        "invalid_request_error",
        "response_not_found",
        f"No stored response with id {response_id!r}",
        param="response_id",
    )


def _caller(request: web.Request) -> tuple[str | None, frozenset[str]]:
    """(key hash, allowed models) of the caller for routes outside the chain; raises the 401.

    (None, all) when no client keys are configured."""
    found = request.app[AUTH].authenticate(_client_headers(request))
    if found is None:
        return None, frozenset()
    key, models = found
    return key_id(key), models


async def _owned(request: web.Request, response_id: str) -> StoredResponse:
    """The stored response if the caller's key created it; a 404 otherwise (even if it exists:
    one key never learns another key's response ids)."""
    owner, _ = _caller(request)
    stored = await request.app[STORE].get(response_id)
    if stored is None or stored.owner != owner:
        raise _not_found(response_id)
    return stored


async def responses_create(request: web.Request) -> web.StreamResponse:
    """SPEC §5: the Responses API over DeepSeek chat, with stored conversations."""
    app = request.app
    config = app[CONFIG]
    owner, _ = _caller(request)
    raw = await _read_body(request, config.server.max_body_bytes)
    body = parse_json_body(raw)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        stored = await app[STORE].get(previous)
        if stored is None or stored.owner != owner:
            raise ClientError(
                400,
                "invalid_request_error",
                "previous_response_not_found",
                f"Previous response with id {previous!r} not found",
                param="previous_response_id",
            )
        if stored.response.get("status") == "failed":
            raise ClientError(
                400,
                "invalid_request_error",
                "previous_response_failed",
                f"Previous response with id {previous!r} failed and cannot be continued; "
                "continue from the response before it",
                param="previous_response_id",
            )
        history = stored.messages
    parsed = parse_responses_request(body, config.models, history=history, unseal=app[SEALER].open)
    session = ResponsesSession(
        parsed, history=history, store=app[STORE], sealer=app[SEALER], owner=owner
    )
    exchange = Exchange(
        request_id=request[REQUEST_ID],
        route="responses",
        dialect="responses",
        stream=parsed.stream,
        exposed_model=parsed.exposed_model,
        client_body=body,
        upstream_body=parsed.upstream_body,
        client_headers=_client_headers(request),
        trace=Trace(),
        context=session,
        on_end=session.save,
    )
    request[_EXCHANGE] = exchange
    reply = await app[CHAIN](exchange)
    return await _send(request, exchange, reply)


async def responses_get(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if request.query.get("stream") in ("true", "1"):
        raise ClientError(
            400,
            "invalid_request_error",
            "unsupported_parameter",
            "Streaming a stored response again is not supported",
            param="stream",
        )
    stored = await _owned(request, response_id)
    return web.json_response(stored.response, dumps=_dumps)


async def responses_delete(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    await _owned(request, response_id)
    if not await request.app[STORE].delete(response_id):
        raise _not_found(response_id)
    body = {"id": response_id, "object": "response.deleted", "deleted": True}
    return web.json_response(body, dumps=_dumps)


async def responses_input_items(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    stored = await _owned(request, response_id)
    items = list(stored.input_items)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ClientError(
            400, "invalid_request_error", "invalid_order", "'order' is asc or desc", param="order"
        )
    if order == "desc":
        items.reverse()
    # Cursors in the listing's order: `after` an item, `before` an item, or between the two;
    # an id not in the list leaves nothing (as an expired cursor would).
    before = request.query.get("before")
    if before:
        ids = [item.get("id") for item in items]
        items = items[: ids.index(before)] if before in ids else []
    after = request.query.get("after")
    if after:
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise ClientError(
            400, "invalid_request_error", "invalid_limit", "'limit' is 1..100", param="limit"
        )
    # `before` alone pages backwards: the `limit` items just before the cursor.
    page = items[-limit:] if before and not after else items[:limit]
    body = {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(items) > limit,
    }
    return web.json_response(body, dumps=_dumps)


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """503 unless the upstream answered an HTTP request recently (cached for a few seconds)."""
    ready, detail = await request.app[READINESS].check()
    body = {"status": "ready" if ready else "not_ready", "upstream": detail}
    return web.json_response(body, status=200 if ready else 503, dumps=_dumps)


async def healthz(request: web.Request) -> web.Response:
    body = {"status": "ok", "version": __version__, "pid": os.getpid()}
    return web.json_response(body, dumps=_dumps)


def _visible_models(request: web.Request) -> list[dict[str, Any]]:
    """The exposed model names the caller may use, as OpenAI's Model objects."""
    _, allowed = _caller(request)
    return [
        {"id": name, "object": "model", "created": 0, "owned_by": "ds2oai"}
        for name in request.app[CONFIG].models.exposed_names()
        if not allowed or name in allowed
    ]


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": _visible_models(request)}
    return web.json_response(body, dumps=_dumps)


async def model_get(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for model in _visible_models(request):
        if model["id"] == name:
            return web.json_response(model, dumps=_dumps)
    # As OpenAI answers an unknown model, also for one this key may not use.
    raise ClientError(
        404,
        "invalid_request_error",
        "model_not_found",
        f"The model '{name}' does not exist or you do not have access to it.",
        param="model",
    )


def _dumps(obj: Any) -> str:
    return jsonutil.dumps(obj).decode()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = UpstreamClient.create(config)
    app[UPSTREAM] = client
    app[AUTH] = BearerAuth.from_config(config)
    app[AUTH_FIRST] = app[AUTH].enabled and config.middleware.chain[:1] == ("auth",)
    app[STORE] = open_store(config.store)
    app[SEALER] = Sealer(config.responses.secret)
    if app[SEALER].ephemeral:
        log.info("no [responses] secret / DS2OAI_SECRET: encrypted reasoning is per-process")
    app[READINESS] = Readiness(client.probe)
    endpoint: Next = client
    middlewares = build_middleware(config, BUILTINS)
    app[CHAIN] = fold(middlewares, endpoint)
    yield
    for middleware in middlewares:
        close = getattr(middleware, "aclose", None)  # stages holding resources (limits' Redis)
        if close is not None:
            await close()
    await client.close()
    await app[STORE].close()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Pending metric updates reach prometheus-client every `metrics.FLUSH_INTERVAL` seconds
    (with `--workers N`, other workers' scrapes read them from there) and at the end."""

    async def flush_every() -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_INTERVAL)
            metrics.flush()

    task = asyncio.get_running_loop().create_task(flush_every())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    metrics.flush()


# Seconds after the grace for the cut streams' terminal events (aiohttp's shutdown_timeout is
# the grace plus this).
SHUTDOWN_MARGIN = 1.0


async def _hang_up_drains(app: web.Application) -> None:
    """SIGHUP (the terminal or session that started the gateway went away, or an operator's
    `kill -HUP`) drains like SIGTERM: by default it would kill the process mid-stream. There is
    no reload; a changed config needs a restart. Started with SIGHUP ignored (`nohup`), it
    stays ignored."""
    if _hang_up_ignored():
        return
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _graceful_exit)


def _hang_up_ignored() -> bool:
    return signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def _graceful_exit() -> None:
    raise web.GracefulExit  # what aiohttp's run_app raises on SIGTERM


async def _drain_on_shutdown(app: web.Application) -> None:
    """SIGTERM: the sites already stopped accepting. Open streams get `shutdown_grace` seconds
    to finish; then their upstream bodies are cut so each ends with its dialect's terminal
    error instead of a bare truncation, which aiohttp gives `SHUTDOWN_MARGIN` more seconds to
    go out before it cancels what is left. A second SIGTERM/SIGINT/SIGHUP exits at once."""
    loop = asyncio.get_running_loop()
    if app[OWNS_PROCESS]:
        signums = [signal.SIGTERM, signal.SIGINT]
        if not _hang_up_ignored():
            signums.append(signal.SIGHUP)
        for signum in signums:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, os._exit, 0)
    grace = app[CONFIG].server.shutdown_grace
    client = app[UPSTREAM]
    loop.call_later(
        grace,
        client.abort_all,
        "The gateway is shutting down; the answer was cut",
    )
    # What still runs just before aiohttp's own deadline waits on something no upstream cut
    # ends (a stage that hangs, say). aiohttp would only fail its request body, wait the
    # whole `shutdown_timeout` again and then cancel it; cancel it now instead.
    loop.call_later(grace + 0.9 * SHUTDOWN_MARGIN, _cancel_handlers, app[_HANDLERS])


_SHUTDOWN_CUT = "ds2oai: shutdown grace over"


def _cancel_handlers(handlers: set[asyncio.Task[Any]]) -> None:
    for task in list(handlers):
        task.cancel(_SHUTDOWN_CUT)


def create_app(config: Config, *, owns_process: bool = False) -> web.Application:
    """The application; the chain is built (and validated) when the app starts.

    `owns_process`: this app is the process (`ds2oai serve`), so a second SIGTERM during the
    shutdown grace may exit the process at once; never set it for an embedded app.
    """
    app = web.Application(
        middlewares=[error_boundary],
        client_max_size=config.server.max_body_bytes,
        # Request bodies are inflated by `_read_body`, within the body limit (body_encoding).
        handler_args={"auto_decompress": False},
    )
    app[CONFIG] = config
    app[MODEL_LABELS] = frozenset(config.models.exposed_names())
    app[OWNS_PROCESS] = owns_process
    app[_HANDLERS] = set()
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    if owns_process:
        app.on_startup.append(_hang_up_drains)
    app.on_shutdown.append(_drain_on_shutdown)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/openai/v1/chat/completions", openai_chat_completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    for prefix in ("/v1", "/openai/v1"):
        app.router.add_get(f"{prefix}/models", models)
        # `.+`: an exposed name may hold a slash ("team/chat")
        app.router.add_get(f"{prefix}/models/{{model:.+}}", model_get)
        app.router.add_post(f"{prefix}/responses", responses_create)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", responses_get)
        app.router.add_delete(f"{prefix}/responses/{{response_id}}", responses_delete)
        app.router.add_get(f"{prefix}/responses/{{response_id}}/input_items", responses_input_items)
    return app
