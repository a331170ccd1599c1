"""Evidence: aiohttp-sse-client 0.2.1 measured against our upstream-reader contract.

Every test starts a small raw-asyncio HTTP/1.1 upstream on 127.0.0.1 (random port),
drives ``aiohttp_sse_client.client.EventSource`` against it with a real socket, and
asserts the library's *observed* behaviour.  Tests that document a contract violation
fail if the library ever fixes it; tests that document acceptable behaviour say so in
their docstring.  Observed with aiohttp 3.14 and aiohttp-sse-client 0.2.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import LineTooLong, TransferEncodingError
from aiohttp_sse_client.client import READY_STATE_CLOSED, EventSource

from tests.loopback import RawServer, chunk

REQUEST_BODY: dict[str, Any] = {
    "model": "deepseek-chat",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}
SSE_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
# Every test is bounded so that a reconnect loop can never hang the suite.
TEST_DEADLINE_S = 5.0
# The library doubles this before each reconnect sleep (its default is 5 s -> 10 s).
FAST_RECONNECT = timedelta(milliseconds=10)


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


# Writes the response for the n-th request (1-based); the connection is closed afterwards.
Responder = Callable[[int, asyncio.StreamWriter], Awaitable[None]]


class Upstream(RawServer):
    """A one-response-per-connection HTTP/1.1 server on 127.0.0.1 that records requests."""

    def __init__(self, respond: Responder) -> None:
        super().__init__(self._serve, grace=TEST_DEADLINE_S)
        self._respond = respond
        self.requests: list[SeenRequest] = []

    @property
    def url(self) -> str:
        return super().url + "/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = request_line.split(" ", 2)
            self.requests.append(SeenRequest(method, path, headers, body))
            await self._respond(len(self.requests), writer)
            if not writer.transport.is_closing():
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client may hang up first (e.g. after LineTooLong)


def post_source(url: str, session: aiohttp.ClientSession) -> Any:
    """An EventSource configured the way we would have to use it: POST + JSON body."""
    return EventSource(
        url,
        option={"method": "POST"},
        session=session,
        reconnection_time=FAST_RECONNECT,
        json=REQUEST_BODY,
    )


async def drain(source: Any, events: list[str], stop: Callable[[list[str]], bool]) -> None:
    """Plain consumer loop: ``async with`` + ``async for``; appends each event's data."""
    async with asyncio.timeout(TEST_DEADLINE_S), source:
        async for event in source:
            events.append(event.data)
            if stop(events):
                return


# (a) ---------------------------------------------------------------------------------


async def test_aiohttp_sse_client_resends_post_when_stream_ends() -> None:
    """Contract (1) violated: a normally ended stream (chunked body with its terminating
    chunk, after ``data: [DONE]``) makes the library sleep 2 x reconnection_time and
    send the same POST + JSON body again, and yield the second completion as if it
    were a continuation of the first.  (It reconnects from inside ``__anext__``, so a
    caller that stops at ``[DONE]`` by itself avoids it; one that iterates to the end
    does not.)"""

    async def respond(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_CHUNKED_HEAD)
        writer.write(chunk(b'data: {"completion": %d}\n\n' % n))
        writer.write(chunk(b"data: [DONE]\n\n"))
        writer.write(LAST_CHUNK)

    events: list[str] = []
    async with Upstream(respond) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        await drain(source, events, stop=lambda ev: len(ev) >= 4)

    assert events == ['{"completion": 1}', "[DONE]", '{"completion": 2}', "[DONE]"]
    assert [r.method for r in upstream.requests] == ["POST", "POST"]
    assert [json.loads(r.body) for r in upstream.requests] == [REQUEST_BODY, REQUEST_BODY]


# (b) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "expected_exc"),
    [
        (429, "Too Many Requests", ConnectionError),
        (500, "Internal Server Error", ConnectionError),
        (401, "Unauthorized", ConnectionRefusedError),
    ],
)
async def test_aiohttp_sse_client_hides_error_status_body_and_headers(
    status: int, reason: str, expected_exc: type[ConnectionError]
) -> None:
    """Contract (2) violated: an error response with a JSON body and ``Retry-After``
    becomes a bare ``ConnectionError``/``ConnectionRefusedError`` whose only content is
    the text ``fetch <url> failed: <status>``; no headers, no body, no cause, and the
    response is never stored on the EventSource.  (It does not retry the POST.)"""
    error_body = json.dumps(
        {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}
    ).encode()

    async def respond(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json\r\n"
            b"Retry-After: 7\r\n"
            b"Content-Length: %d\r\n"
            b"\r\n%s" % (status, reason.encode(), len(error_body), error_body)
        )

    events: list[str] = []
    async with Upstream(respond) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        with pytest.raises(ConnectionError) as excinfo:
            await drain(source, events, stop=lambda ev: True)

    exc = excinfo.value
    assert type(exc) is expected_exc
    assert exc.args == (f"fetch {upstream.url} failed: {status}",)
    assert exc.__cause__ is None
    assert exc.__context__ is None
    for attribute in ("status", "headers", "body", "response", "request_info"):
        assert not hasattr(exc, attribute)
    assert "Retry-After" not in str(exc)
    assert "Rate limit reached" not in str(exc)
    assert source._response is None
    assert source.ready_state == READY_STATE_CLOSED
    assert events == []
    assert len(upstream.requests) == 1


# (c) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["fin_mid_chunked_body", "rst_mid_chunked_body"])
async def test_aiohttp_sse_client_surfaces_cut_chunked_stream_as_client_payload_error(
    cut: str,
) -> None:
    """Contract (3) is MET for a chunked body: when the upstream closes (FIN) or resets
    (RST) the connection before the terminating chunk, aiohttp's ClientPayloadError
    (cause: TransferEncodingError) propagates out of ``__anext__``; no re-POST, and the
    unterminated last event is not dispatched.  Note it is not a ConnectionError, which
    is what the library's docstring tells callers to catch."""

    async def respond(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_CHUNKED_HEAD)
        writer.write(chunk(b'data: {"completion": %d}\n\ndata: {"cut"' % n))
        await writer.drain()
        if cut == "rst_mid_chunked_body":
            await asyncio.sleep(0.05)  # let the client read the first event
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    events: list[str] = []
    async with Upstream(respond) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        with pytest.raises(aiohttp.ClientPayloadError) as excinfo:
            await drain(source, events, stop=lambda ev: len(ev) >= 3)

    assert not isinstance(excinfo.value, ConnectionError)
    assert isinstance(excinfo.value.__cause__, TransferEncodingError)
    assert events == ['{"completion": 1}']
    assert len(upstream.requests) == 1


async def test_aiohttp_sse_client_resends_post_and_splices_cut_event_on_unframed_stream() -> None:
    """Contract (1) and (5) violated: with a close-delimited body (no Content-Length, no
    chunking) a cut stream looks like a normal end at the HTTP level -- but instead of
    discarding the pending, unterminated event at EOF (WHATWG), the library re-POSTs and
    glues the cut ``data:`` line of stream 1 onto the first event of stream 2."""

    async def respond(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Connection: close\r\n"
            b"\r\n"
            b'data: {"completion": %d}\n\ndata: {"cut"' % n
        )

    events: list[str] = []
    async with Upstream(respond) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        await drain(source, events, stop=lambda ev: len(ev) >= 2)

    assert events == ['{"completion": 1}', '{"cut"\n{"completion": 2}']
    assert [r.method for r in upstream.requests] == ["POST", "POST"]
    assert [json.loads(r.body) for r in upstream.requests] == [REQUEST_BODY, REQUEST_BODY]


# (d) ---------------------------------------------------------------------------------

ONE_MIB_DATA = b"x" * (1024 * 1024)


async def _respond_one_mib_line(n: int, writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_CHUNKED_HEAD)
    writer.write(chunk(b"data: " + ONE_MIB_DATA + b"\n\n"))
    writer.write(LAST_CHUNK)


async def test_aiohttp_sse_client_fails_on_1mib_data_line_with_line_too_long() -> None:
    """Contract (4) violated with default settings: the library reads lines with
    ``async for line in response.content`` (StreamReader.readline), capped at
    2 x read_bufsize = 524288 bytes in aiohttp 3.14, so a 1 MiB ``data:`` line raises
    aiohttp.http_exceptions.LineTooLong -- not a ClientError, not a ConnectionError --
    and the event is lost."""
    events: list[str] = []
    async with Upstream(_respond_one_mib_line) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        with pytest.raises(LineTooLong) as excinfo:
            await drain(source, events, stop=lambda ev: True)

    assert excinfo.value.args[1] == 524288
    assert not isinstance(excinfo.value, aiohttp.ClientError | ConnectionError)
    assert events == []
    assert len(upstream.requests) == 1


async def test_aiohttp_sse_client_reads_1mib_data_line_when_read_bufsize_is_raised() -> None:
    """Not a violation, recorded for fairness: the cap is configurable.  With
    ``ClientSession(read_bufsize=2**20)`` (cap 2 MiB) the 1 MiB line arrives intact --
    but any fixed cap remains a cap."""
    events: list[str] = []
    async with (
        Upstream(_respond_one_mib_line) as upstream,
        aiohttp.ClientSession(read_bufsize=2**20) as session,
    ):
        source = post_source(upstream.url, session)
        await drain(source, events, stop=lambda ev: True)

    assert events == [ONE_MIB_DATA.decode()]
    assert len(upstream.requests) == 1


# (e) ---------------------------------------------------------------------------------


async def test_aiohttp_sse_client_does_not_split_lines_on_bare_cr() -> None:
    """Contract (5) violated: WHATWG SSE accepts CR, LF and CRLF line ends, so this body
    is two events, ``"a\\nb"`` and ``"c"``.  The library splits on LF only and yields one
    event whose data still contains the CRs and the second ``data:`` field names."""

    async def respond(n: int, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_CHUNKED_HEAD)
        writer.write(chunk(b"data: a\rdata: b\r\rdata: c\r\n\r\n"))
        writer.write(LAST_CHUNK)

    events: list[str] = []
    async with Upstream(respond) as upstream, aiohttp.ClientSession() as session:
        source = post_source(upstream.url, session)
        await drain(source, events, stop=lambda ev: True)

    assert events == ["a\rdata: b\r\rdata: c"]
    assert len(upstream.requests) == 1
