"""`reframe` — upstream SSE bytes to the client's wire format (`Reframe`).

Reads: the upstream reply (status, content type, body bytes) and `exchange.dialect`/`stream`.
Changes: a non-200 reply passes through untouched (`retry`, `rate_limit` and the error boundary
act on it wherever they sit); a 200 that is not SSE becomes a `ClientError`; a 200 SSE body is
decoded incrementally (`sse.SSEDecoder`), normalized (`events.parse_upstream_event`) and fed to
the exchange's dialect, yielding one write per upstream read. A failure before the first
downstream byte is raised as a `ClientError` (a plain HTTP error); after it, the dialect ends
the stream with its terminal error event. Non-JSON chunks are skipped and logged with the
request id. `"stream": false` collects the whole answer into one JSON object.
Position: anywhere after `auth` (the default chain has it innermost). Required exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ds2oai.chain import Body, Exchange, Next, Reply
from ds2oai.config import Config
from ds2oai.dialects import Dialect
from ds2oai.dialects.chat import ChatDialect
from ds2oai.dialects.completion import CompletionCollector
from ds2oai.dialects.spec import SpecDialect
from ds2oai.errors import ClientError, SSEDecodeError, UpstreamStreamError
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    MalformedChunk,
    StreamBroken,
    UpstreamErrorEvent,
    UpstreamEvent,
    parse_upstream_event,
)
from ds2oai.sse import SSEComment, SSEDecoder
from ds2oai.upstream import read_limited
from ds2oai.upstream_errors import broken_error, error_from_upstream, upstream_event_error

__all__ = ["DIALECTS", "Reframe"]

log = logging.getLogger("ds2oai.reframe")

DialectFactory = Callable[[Exchange], Dialect]


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


DIALECTS: dict[str, DialectFactory] = {
    "spec": lambda exchange: SpecDialect(exchange.exposed_model),
    "chat": lambda exchange: ChatDialect(
        exchange.exposed_model, include_usage=_include_usage(exchange.client_body)
    ),
}

_STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


class Reframe:
    name = "reframe"

    def __init__(
        self,
        dialects: Mapping[str, DialectFactory] | None = None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self._dialects = dict(DIALECTS if dialects is None else dialects)
        self._secrets = secrets

    @classmethod
    def from_config(cls, config: Config) -> Reframe:
        return cls(secrets=(config.upstream.api_key,))

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        factory = self._dialects.get(exchange.dialect)
        if factory is None:
            raise ClientError(500, "server_error", "no_dialect", "No such response format")
        reply = await call_next(exchange)
        if reply.status != 200 or not reply.from_upstream:
            return reply  # an error answer: retry/rate_limit/the error boundary deal with it
        content_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "text/event-stream":
            body = await read_limited(reply.body)
            raise self._non_sse_answer(body)
        if isinstance(reply.body, bytes):  # pragma: no cover - the endpoint always streams
            raise ClientError(502, "upstream_connection_error", "upstream_status_200", "No stream")
        if not exchange.stream:
            return await self._collect(exchange, reply.body)
        return Reply(200, dict(_STREAM_HEADERS), self._stream(exchange, reply.body, factory))

    def _non_sse_answer(self, body: bytes) -> ClientError:
        error = error_from_upstream(200, {}, body, secrets=self._secrets)
        if body.strip().startswith(b"{") and b'"error"' in body:
            code, message = error.code, error.message
            return upstream_event_error(code or "upstream_error", message, self._secrets)
        return ClientError(
            502,
            "upstream_connection_error",
            "upstream_status_200",
            "The upstream answered without an event stream",
        )

    def _events(self, exchange: Exchange, decoder: SSEDecoder, data: bytes) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        for item in decoder.feed(data):
            if isinstance(item, SSEComment):
                continue
            try:
                events.append(parse_upstream_event(item.data))
            except MalformedChunk as exc:
                exchange.trace.malformed_chunks += 1
                log.warning(
                    "skipped upstream chunk",
                    extra={"request_id": exchange.request_id, "reason": str(exc)},
                )
        return events

    async def _collect(self, exchange: Exchange, body: Body) -> Reply:
        collector = CompletionCollector(exchange.exposed_model)
        decoder = SSEDecoder()
        try:
            async for data in body:
                for event in self._events(exchange, decoder, data):
                    self._note(exchange, event)
                    collector.feed(event)
                if collector.ended:
                    break
            collector.feed(EndOfBody())
        except UpstreamStreamError as exc:
            collector.feed(StreamBroken(exc.message, timeout=exc.timeout))
        except SSEDecodeError as exc:
            collector.feed(StreamBroken(str(exc)))
        finally:
            await body.aclose()
        try:
            result = collector.result()
        except ClientError:
            exchange.trace.outcome = "upstream_error"
            raise
        exchange.trace.outcome = "completed"
        return Reply.json(200, result)

    @staticmethod
    def _note(exchange: Exchange, event: UpstreamEvent) -> None:
        trace = exchange.trace
        if isinstance(event, Chunk):
            if trace.first_token_at is None and (
                event.content or event.reasoning or event.tool_calls
            ):
                trace.first_token_at = time.monotonic()
            if event.usage is not None:
                trace.prompt_tokens = event.usage.get("prompt_tokens")
                trace.completion_tokens = event.usage.get("completion_tokens")

    async def _stream(self, exchange: Exchange, body: Body, factory: DialectFactory) -> Body:
        dialect = factory(exchange)
        decoder = SSEDecoder()
        sent = False
        try:
            try:
                async for data in body:
                    out = b""
                    for event in self._events(exchange, decoder, data):
                        self._note(exchange, event)
                        if not sent and not out:
                            self._raise_if_failed_early(event)
                        out += dialect.feed(event)
                        if dialect.outcome is not None:
                            break
                    if out:
                        sent = True
                        yield out
                    if dialect.outcome is not None:
                        break
                else:
                    tail = EndOfBody()
                    if not sent:
                        self._raise_if_failed_early(tail)
                    out = dialect.feed(tail)
                    if out:
                        yield out
            except (UpstreamStreamError, SSEDecodeError) as exc:
                broken = (
                    StreamBroken(exc.message, timeout=exc.timeout)
                    if isinstance(exc, UpstreamStreamError)
                    else StreamBroken(str(exc))
                )
                if not sent:
                    self._raise_if_failed_early(broken)
                out = dialect.feed(broken)
                if out:
                    yield out
        finally:
            exchange.trace.outcome = exchange.trace.outcome or dialect.outcome
            await body.aclose()

    def _raise_if_failed_early(self, event: UpstreamEvent) -> None:
        """Before any downstream byte a failure is a plain HTTP error, not an SSE event."""
        if isinstance(event, StreamBroken):
            raise broken_error(event.message, timeout=event.timeout)
        if isinstance(event, EndOfBody | Done):
            raise broken_error()
        if isinstance(event, UpstreamErrorEvent):
            raise upstream_event_error(event.code, event.message, self._secrets)
