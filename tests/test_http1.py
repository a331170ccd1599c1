"""`http1`: the upstream's HTTP/1.1 client, against raw loopback servers writing their own bytes.

What the gateway relies on: keep-alive reuse only after a complete answer, every way a body can
end (length, chunked, end of connection) and every way it can break, the two timeouts (connect
with the pool wait, silence from the last byte), inflating compressed bodies a slice at a
time, and reading from the socket paused while unread bytes pile up. The last tests drive the
gateway end to end through the same client.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import gzip
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ds2oai import http1
from tests.conftest import GatewayFactory
from tests.fault_upstream import (
    SSE_HEADERS,
    End,
    FaultUpstream,
    Hang,
    Head,
    Send,
    Sleep,
    text_events,
)
from tests.loopback import RawServer, chunk
from tests.sse_client import read_events, spec_text

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter

OK_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def read_request(reader: Reader) -> bytes:
    """One request's head and body (by Content-Length), or b"" when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def answering(*answers: bytes, connections: list[int] | None = None) -> RawServer:
    """A server answering each request on a connection with the next of `answers` (kept alive)."""

    async def handle(reader: Reader, writer: Writer) -> None:
        if connections is not None:
            connections.append(1)
        for answer in answers:
            if not await read_request(reader):
                return
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the client closes

    return RawServer(handle, grace=0.1)


async def nothing_open(pool: http1.Pool) -> None:
    """The pool holds no connection once the closes it started have been processed."""
    for _ in range(100):  # connection_lost comes a loop turn or two after close()
        if pool.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


async def read_all(response: http1.Response) -> bytes:
    parts = []
    while data := await response.read():
        parts.append(data)
    return b"".join(parts)


async def test_the_request_is_one_well_formed_http_1_1_message(pool: http1.Pool) -> None:
    seen: list[bytes] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with RawServer(handle) as server:
        response = await pool.request(
            "POST", server.url + "/v1/chat/completions?x=1", [("X-Trace", "t1")], b'{"a":1}'
        )
        assert response.status == 204
        assert await response.read() == b""
        response.release()
    head, body = seen[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"X-Trace: t1" in lines
    assert b"Content-Length: 7" in lines
    assert b"Accept-Encoding: gzip, deflate" in lines
    assert body == b'{"a":1}'


async def test_complete_answers_reuse_one_connection(pool: http1.Pool) -> None:
    answer = OK_CHUNKED + chunk(b"data: 1\n\n") + b"0\r\n\r\n"
    connections: list[int] = []
    async with answering(answer, answer, answer, connections=connections) as server:
        for _ in range(3):
            response = await pool.request("POST", server.url + "/", body=b"{}")
            assert (response.status, await read_all(response)) == (200, b"data: 1\n\n")
            response.release()
        assert len(connections) == 1
        assert (pool.open_connections, pool.idle_connections) == (1, 1)


async def test_a_whole_answer_released_unread_is_pooled_and_a_partial_one_closed(
    pool: http1.Pool,
) -> None:
    # A reader stops at `[DONE]`; the chunked terminator came in the same packet.
    whole = OK_CHUNKED + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    partial = OK_CHUNKED + chunk(b"data: 1\n\n")
    async with answering(whole, partial) as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        assert await response.read() == b"data: [DONE]\n\n"
        response.release()
        assert (pool.open_connections, pool.idle_connections) == (1, 1)
        with pytest.raises(http1.Disconnected):
            await response.read()  # released: the connection is somebody else's now
        response = await pool.request("POST", server.url + "/", body=b"{}")
        assert await response.read() == b"data: 1\n\n"
        response.release()  # the server is still sending: closed
        await nothing_open(pool)


async def test_ready_says_whether_a_read_would_wait(pool: http1.Pool) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(OK_CHUNKED)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"0\r\n\r\n")

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert not response.ready  # the head only
        await asyncio.sleep(0.15)
        assert response.ready
        assert await response.read() == b"data: 1\n\n"
        assert not response.ready
        assert await response.read() == b""
        response.release()
        assert not response.ready


async def test_a_big_answer_left_unread_does_not_leave_its_connection_paused(
    pool: http1.Pool,
) -> None:
    # An error body is read only in part, yet whole: the connection is pooled, and the pause
    # its unread bytes caused must not outlive it. The answer's last byte is the one that
    # crosses the high-water mark, so it arrives whole and paused.
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %07d\r\n\r\n"
    length = http1._HIGH_WATER + 1 - len(head % 0)
    big = head % length + b"x" * length
    small = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(big)
        await writer.drain()
        await read_request(reader)
        writer.write(small)
        await writer.drain()
        await reader.read()

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        for _ in range(100):
            if response._conn._complete:
                break
            await asyncio.sleep(0.01)
        assert response._conn._complete
        assert response._conn._paused
        response.release()
        assert pool.idle_connections == 1
        response = await pool.request("GET", server.url + "/", read_timeout=2)
        assert (response.status, await read_all(response)) == (200, b"ok")
        response.release()


async def test_close_drops_even_a_whole_answer(pool: http1.Pool) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        response.close()
        response.close()
        response.release()
        await nothing_open(pool)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        OK_CHUNKED + chunk(b"hello") + chunk(b" world") + b"0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_delimited_body_is_read_whole_and_the_connection_kept(
    pool: http1.Pool, answer: bytes
) -> None:
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"hello world"
        response.release()
        assert pool.idle_connections == 1


async def test_a_body_ended_by_the_connection_is_complete_and_not_reused(
    pool: http1.Pool,
) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"hello world"
        response.release()
        await nothing_open(pool)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
        OK_CHUNKED + chunk(b"hello"),  # no terminating chunk
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_cut_short_is_disconnected_not_complete(
    pool: http1.Pool, answer: bytes
) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(answer)

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await response.read() == b"hello"
        with pytest.raises(http1.Disconnected):
            await response.read()
        response.release()  # not reusable: closed instead
        await nothing_open(pool)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
            "invalid HTTP",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (600 << 10) + b"\r\nContent-Length: 2\r\n\r\nok",
            "head is over",
        ),
    ],
)
async def test_answers_this_client_cannot_read_fail_at_once(
    pool: http1.Pool, answer: bytes, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A 101 escaped the parser's error handling (the loop logged a fatal transport error); a
    # head past the read buffer's high-water mark paused the socket until the read timeout.
    async with answering(answer) as server:
        with pytest.raises(http1.Disconnected, match=says):
            await asyncio.wait_for(
                pool.request("GET", server.url + "/", read_timeout=30.0), timeout=5.0
            )
    await nothing_open(pool)
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]


async def test_connection_close_answers_are_not_pooled(pool: http1.Pool) -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"ok"
        response.release()
        await nothing_open(pool)


async def test_a_server_closing_an_idle_connection_costs_nothing(pool: http1.Pool) -> None:
    # A keep-alive answer, then the server closes while the connection sits in the pool.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(answer)

    async with RawServer(handle) as server:
        for _ in range(2):
            response = await pool.request("GET", server.url + "/")
            assert await read_all(response) == b"ok"
            response.release()
            await asyncio.sleep(0.05)
            assert (pool.open_connections, pool.idle_connections) == (0, 0)


async def test_bytes_after_a_whole_answer_are_not_read_into_it(pool: http1.Pool) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    )
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"ok"
        response.release()  # a server talking out of turn: not pooled
        await nothing_open(pool)


async def test_trailers_do_not_change_the_head_already_handed_out(pool: http1.Pool) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n" + chunk(b"data: 1\n\n") + b"0\r\nContent-Type: application/x-other\r\n\r\n"
    )
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"data: 1\n\n"
        assert response.headers["content-type"] == "text/event-stream"
        response.release()


async def test_a_reset_is_not_the_end_of_a_body_delimited_by_the_connection(
    pool: http1.Pool,
) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\ndata: partial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await response.read() == b"data: partial"
        with pytest.raises(http1.Disconnected):
            await response.read()


async def instant_answers(pool: http1.Pool, tries: int) -> None:
    """An overloaded server answering 503 at accept and closing, before reading anything.

    Its answers say nothing of closing, so the client pools the connection and may send the
    next request on it just as the close arrives: that request is sent again on a new
    connection (nothing was answered on the old one), so every request gets the 503.
    """

    async def handle(reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    answered = 0
    async with RawServer(handle) as server:
        for _ in range(tries):
            try:
                response = await pool.request("POST", server.url + "/", body=b"{}")
            except http1.Disconnected:
                continue  # a reset (our request unread at its close) may lose the answer
            assert (response.status, await read_all(response)) == (503, b"busy")
            response.release()
            answered += 1
    print(f"answered {answered} of {tries}")
    assert answered > tries // 2
    assert pool.open_connections == 0


async def test_answers_from_a_server_that_closes_at_once_all_arrive(pool: http1.Pool) -> None:
    await instant_answers(pool, 50)


def test_answers_from_a_server_that_closes_at_once_all_arrive_on_uvloop() -> None:
    async def scenario() -> None:
        pool = http1.Pool()
        try:
            await instant_answers(pool, 400)
        finally:
            await pool.close()

    uvloop.run(scenario())


@pytest.mark.parametrize(
    ("method", "url", "headers"),
    [
        ("HEAD", "http://127.0.0.1:9/", []),
        ("GET\r\nX-Injected: 1", "http://127.0.0.1:9/", []),
        ("GET", "http://127.0.0.1:9/a b", []),
        ("GET", "http://127.0.0.1:9/caf\u00e9", []),
        ("GET", "http://127.0.0.1:9/", [("X-A", "1\r\nX-Injected: 2")]),
        ("GET", "http://127.0.0.1:9/", [("X A", "1")]),
        ("GET", "http://127.0.0.1:9/", [("", "1")]),
        ("GET", "http://127.0.0.1:9/", [("X-A", "nul\x00")]),
    ],
    ids=[
        "head",
        "method-crlf",
        "space-in-path",
        "non-ascii-path",
        "value-crlf",
        "name-space",
        "empty-name",
        "value-nul",
    ],
)
async def test_a_request_that_would_not_be_one_clean_message_is_refused(
    pool: http1.Pool, method: str, url: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        await pool.request(method, url, headers)
    assert pool.open_connections == 0


async def test_the_client_alone_says_which_encodings_it_accepts(pool: http1.Pool) -> None:
    seen: list[bytes] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/", [("Accept-Encoding", "br")])
        response.release()
    assert seen[0].lower().count(b"accept-encoding") == 1
    assert b"Accept-Encoding: gzip, deflate" in seen[0]


async def test_interim_answers_are_skipped(pool: http1.Pool) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        assert (response.status, await read_all(response)) == (200, b"ok")
        response.release()


async def test_a_reply_that_is_not_http_is_disconnected(pool: http1.Pool) -> None:
    async with answering(b"SSH-2.0-OpenSSH_9.6\r\n") as server:
        with pytest.raises(http1.Disconnected):
            await pool.request("GET", server.url + "/")
        await nothing_open(pool)


async def test_a_refused_connection_is_a_connect_error(pool: http1.Pool) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)

    async with RawServer(handle) as server:
        url = server.url
    with pytest.raises(http1.ConnectError) as excinfo:
        await pool.request("GET", url + "/", connect_timeout=2)
    assert isinstance(excinfo.value.os_error, ConnectionRefusedError)
    assert pool.open_connections == 0


async def test_a_full_pool_waits_for_a_slot_within_the_connect_timeout() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections: list[int] = []
    pool = http1.Pool(limit=1)
    try:
        async with answering(answer, answer, connections=connections) as server:
            first = await pool.request("GET", server.url + "/")
            started = time.monotonic()
            with pytest.raises(http1.PoolTimeout):  # a ConnectTimeout that tried no server
                await pool.request("GET", server.url + "/", connect_timeout=0.2)
            assert 0.15 <= time.monotonic() - started < 1.0
            # A waiter gets the connection the moment the first answer releases it.
            second = asyncio.ensure_future(pool.request("GET", server.url + "/"))
            await asyncio.sleep(0.05)
            assert not second.done()
            assert await read_all(first) == b"ok"
            first.release()
            response = await asyncio.wait_for(second, 2)
            assert await read_all(response) == b"ok"
            response.release()
            assert len(connections) == 1
    finally:
        await pool.close()


async def test_closing_the_pool_fails_requests_waiting_for_a_slot() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections: list[int] = []
    pool = http1.Pool(limit=1)
    async with answering(answer, connections=connections) as server:
        first = await pool.request("GET", server.url + "/")
        waiting = asyncio.ensure_future(pool.request("GET", server.url + "/"))
        await asyncio.sleep(0.05)
        await pool.close()
        with pytest.raises(http1.Disconnected):
            await asyncio.wait_for(waiting, 2)
        first.release()
        assert len(connections) == 1
        assert pool.open_connections == 0


async def test_abort_fails_a_request_waiting_for_its_head_and_sends_nothing_again(
    pool: http1.Pool,
) -> None:
    # On a reused connection, so that the stale keep-alive retry would be tempted.
    second_in = asyncio.Event()
    connections: list[int] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader)
        second_in.set()
        await reader.read()  # never answers the second

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"ok"
        response.release()
        waiting = asyncio.ensure_future(pool.request("GET", server.url + "/"))
        await asyncio.wait_for(second_in.wait(), 2)
        pool.abort()
        with pytest.raises(http1.Disconnected):
            await asyncio.wait_for(waiting, 2)
        with pytest.raises(http1.Disconnected):
            await pool.request("GET", server.url + "/")
        await nothing_open(pool)
    assert len(connections) == 1


async def test_a_connection_lost_before_connect_returns_holds_no_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server answers at accept and closes; all of it is processed before the connecting
    # task resumes. The answer is still read, and the pool's count does not leak a slot.
    loop = asyncio.get_running_loop()
    pool = http1.Pool(limit=1)

    async def answered_and_gone(
        factory: Callable[[], asyncio.Protocol], *args: object, **kwargs: object
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        transport = asyncio.Transport()
        protocol = factory()
        protocol.connection_made(transport)
        protocol.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
        protocol.connection_lost(None)
        return transport, protocol

    monkeypatch.setattr(loop, "create_connection", answered_and_gone)
    try:
        for _ in range(3):  # with a limit of 1, a leaked slot would block the second
            response = await asyncio.wait_for(pool.request("GET", "http://127.0.0.1:9/"), 2)
            assert (response.status, await read_all(response)) == (503, b"busy")
            response.release()
            assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_the_kernels_connect_timeout_is_a_connect_error(
    pool: http1.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    async def timed_out(*args: object, **kwargs: object) -> None:
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")

    monkeypatch.setattr(loop, "create_connection", timed_out)
    with pytest.raises(http1.ConnectError) as excinfo:
        await pool.request("GET", "http://127.0.0.1:9/")
    assert excinfo.value.os_error.errno == errno.ETIMEDOUT
    assert pool.open_connections == 0


async def test_silence_is_counted_from_the_last_byte(pool: http1.Pool) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(OK_CHUNKED)
        for i in range(4):
            await asyncio.sleep(0.15)
            writer.write(chunk(b"%d" % i))
        await asyncio.sleep(10)

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/", read_timeout=0.3)
        got = b""
        with pytest.raises(http1.ReadTimeout):
            while True:
                got += await response.read()
                last = time.monotonic()
        silent = time.monotonic() - last
        assert got == b"0123"  # gaps of 0.15 s are not silence
        assert 0.25 <= silent < 0.6
        await nothing_open(pool)  # a timed-out answer is not resumed by anybody


async def test_no_head_within_the_read_timeout_is_a_read_timeout(pool: http1.Pool) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with RawServer(handle) as server:
        started = time.monotonic()
        with pytest.raises(http1.ReadTimeout):
            await pool.request("GET", server.url + "/", read_timeout=0.2)
        assert 0.15 <= time.monotonic() - started < 1.0


async def test_a_reused_connection_takes_the_new_requests_timeout(pool: http1.Pool) -> None:
    fast = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(fast)
        await read_request(reader)
        await asyncio.sleep(10)  # the second request is never answered

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/", read_timeout=30)
        assert await read_all(response) == b"ok"
        response.release()
        await asyncio.sleep(0.3)  # idle in the pool: no timeout runs there
        started = time.monotonic()
        with pytest.raises(http1.ReadTimeout):
            await pool.request("GET", server.url + "/", read_timeout=0.1)
        assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_inflated_a_slice_at_a_time(
    pool: http1.Pool, encoding: str
) -> None:
    plain = b"".join(b"data: %d\n\n" % i for i in range(200_000))  # ~2.3 MiB
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
        % (encoding.encode(), len(packed))
    ) + packed
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        sizes = []
        got = b""
        while data := await response.read():
            sizes.append(len(data))
            got += data
        response.release()
        assert pool.idle_connections == 1  # a complete answer, even when inflated
    assert got == plain
    assert max(sizes) <= 64 * 1024


def _answer(encoding: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (encoding, len(body)) + body


async def test_every_gzip_member_is_inflated(pool: http1.Pool) -> None:
    packed = gzip.compress(b"data: first\n\n") + gzip.compress(b"data: second\n\n")
    async with answering(_answer(b"gzip", packed)) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == b"data: first\n\ndata: second\n\n"
        response.release()


async def test_raw_deflate_under_the_deflate_name_is_inflated(pool: http1.Pool) -> None:
    plain = b"data: raw\n\n" * 100
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    packed = compressor.compress(plain) + compressor.flush()
    async with answering(_answer(b"deflate", packed)) as server:
        response = await pool.request("GET", server.url + "/")
        assert await read_all(response) == plain
        response.release()


async def test_a_truncated_compressed_body_is_disconnected(pool: http1.Pool) -> None:
    packed = gzip.compress(bytes(range(256)) * 100)[:-40]
    async with answering(_answer(b"gzip", packed)) as server:
        response = await pool.request("GET", server.url + "/")
        with pytest.raises(http1.Disconnected, match="truncated"):
            await read_all(response)
        response.release()


async def test_a_corrupt_compressed_body_is_disconnected(pool: http1.Pool) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"
    async with answering(answer) as server:
        response = await pool.request("GET", server.url + "/")
        with pytest.raises(http1.Disconnected):
            await read_all(response)
        response.release()


async def stall_then_read_a_big_body(pool: http1.Pool) -> None:
    size = 16 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(0, size, 1 << 20):
            writer.write(payload[i : i + (1 << 20)])
            await writer.drain()

    async with RawServer(handle, grace=1.0) as server:
        response = await pool.request("GET", server.url + "/", read_timeout=0.2)
        await asyncio.sleep(0.5)  # the reader stalls for longer than the read timeout
        conn = response._conn
        assert conn._paused
        assert conn._size <= 2 * 256 * 1024  # the high-water mark plus one socket read
        got = await read_all(response)
        response.release()
    assert len(got) == size
    assert got == payload


async def test_unread_bytes_pause_the_socket_and_the_pause_is_not_silence(
    pool: http1.Pool,
) -> None:
    await stall_then_read_a_big_body(pool)


async def test_closing_mid_body_drops_the_connection(pool: http1.Pool) -> None:
    server_saw_eof = asyncio.Event()

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(OK_CHUNKED + chunk(b"first"))
        await reader.read()  # returns at the client's FIN
        server_saw_eof.set()

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await response.read() == b"first"
        response.close()
        await asyncio.wait_for(server_saw_eof.wait(), 2)
        with pytest.raises(http1.Disconnected):
            await response.read()
        assert pool.open_connections == 0


async def test_idle_connections_expire_after_the_keepalive() -> None:
    server_saw_eof = asyncio.Event()

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()
        server_saw_eof.set()

    pool = http1.Pool(keepalive=0.2)
    try:
        async with RawServer(handle) as server:
            response = await pool.request("GET", server.url + "/")
            await read_all(response)
            response.release()
            assert pool.idle_connections == 1
            await asyncio.wait_for(server_saw_eof.wait(), 2)
            await nothing_open(pool)
    finally:
        await pool.close()


async def test_closing_the_pool_cuts_answers_still_being_read(pool: http1.Pool) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(OK_CHUNKED + chunk(b"first"))
        await reader.read()

    async with RawServer(handle) as server:
        response = await pool.request("GET", server.url + "/")
        assert await response.read() == b"first"
        await pool.close()
        with pytest.raises(http1.Disconnected):
            await response.read()
        with pytest.raises(http1.Disconnected):
            await pool.request("GET", server.url + "/")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for the name `localhost` only, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_answers_stream_and_reuse_the_tls_connection(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert_file, key_file)
    client_side = ssl.create_default_context(cafile=str(cert_file))
    accepted: list[int] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        accepted.append(1)
        for _ in range(2):
            await read_request(reader)
            writer.write(OK_CHUNKED + chunk(b"data: 1\n\n"))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    pool = http1.Pool(ssl_context=client_side)
    try:
        for _ in range(2):
            response = await pool.request("POST", f"https://localhost:{port}/v1", body=b"{}")
            assert await read_all(response) == b"data: 1\n\ndata: [DONE]\n\n"
            response.release()
        assert len(accepted) == 1
        # The name is checked: the same server under an address the certificate lacks.
        with pytest.raises(http1.ConnectError) as excinfo:
            await pool.request("GET", f"https://127.0.0.1:{port}/", connect_timeout=2)
        assert isinstance(excinfo.value.os_error, ssl.SSLCertVerificationError)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def test_on_uvloop_too() -> None:
    # uvloop's transports and timers differ from asyncio's (not Transport subclasses, timers
    # in whole milliseconds); the gateway runs on uvloop.
    async def scenario() -> None:
        async def handle(reader: Reader, writer: Writer) -> None:
            await read_request(reader)
            writer.write(OK_CHUNKED + chunk(b"a"))
            await asyncio.sleep(0.1)
            writer.write(chunk(b"b") + b"0\r\n\r\n")
            await read_request(reader)
            writer.write(OK_CHUNKED + chunk(b"c"))
            await asyncio.sleep(10)

        pool = http1.Pool()
        try:
            async with RawServer(handle) as server:
                response = await pool.request("GET", server.url + "/", read_timeout=0.3)
                assert await read_all(response) == b"ab"
                response.release()
                response = await pool.request("GET", server.url + "/", read_timeout=0.3)
                assert await response.read() == b"c"
                started = time.monotonic()
                with pytest.raises(http1.ReadTimeout):
                    await response.read()
                assert 0.2 <= time.monotonic() - started < 0.8
                response.close()
            # Pausing and resuming the socket goes through uvloop's own transport, too.
            await stall_then_read_a_big_body(pool)
        finally:
            await pool.close()

    uvloop.run(scenario())


# -- through the gateway ----------------------------------------------------------------------


async def test_the_gateway_counts_silence_from_the_last_upstream_byte(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    tokens = ["a", "b", "c", "d", "e", "f"]
    events = text_events(tokens)[:-2]  # no finish, no [DONE]: the upstream then goes silent
    steps: list[object] = [Head()]
    for event in events:
        steps += [Send(event), Sleep(0.15)]
    fault_upstream.queue((*steps, Hang()))  # type: ignore[arg-type]
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.4})
    started = time.monotonic()
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "deepseek-chat", "messages": [], "stream": True},
    ) as resp:
        got = await read_events(resp)
    elapsed = time.monotonic() - started
    assert spec_text(got) == "".join(tokens)
    assert got[-1].event == "response.error"
    assert "timed out" in got[-1].json()["message"]
    sending = 0.15 * (len(events) - 1)
    assert sending + 0.4 - 0.05 <= elapsed < sending + 0.4 + 1.5


async def test_the_gateway_relays_a_gzip_stream_exact(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    tokens = ["Hé", "llo", " wörld", " €", " 😀", "!"]
    packed = gzip.compress(b"".join(text_events(tokens)))
    fault_upstream.queue(
        (Head(headers=(*SSE_HEADERS, ("Content-Encoding", "gzip"))), Send(packed, split=7), End())
    )
    server = await gateway(fault_upstream.url)
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "deepseek-chat", "messages": [], "stream": True},
    ) as resp:
        got = await read_events(resp)
    assert spec_text(got) == "".join(tokens)
    assert got[-1].event == "response.completed"


async def test_streams_through_the_gateway_share_one_upstream_connection(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # `[DONE]` and the chunked terminator in one packet, as DeepSeek sends them.
    answer = OK_CHUNKED + chunk(b"".join(text_events(["a", "b"]))) + b"0\r\n\r\n"
    connections: list[int] = []
    async with answering(*[answer] * 5, connections=connections) as upstream:
        server = await gateway(upstream.url)
        for _ in range(5):
            async with client.post(
                server.make_url("/v1/chat/completions"),
                json={"model": "deepseek-chat", "messages": [], "stream": True},
            ) as resp:
                got = await read_events(resp)
            assert spec_text(got) == "ab"
            assert got[-1].event == "response.completed"
        assert len(connections) == 1


async def test_a_slow_client_of_a_highly_compressed_stream_gets_all_of_it(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # ~32 MiB of events from ~100 KiB on the wire, read by a client that stalls.
    token = "y" * 16 * 1024
    n = 2000
    packed = gzip.compress(b"".join(text_events([token] * n)))
    fault_upstream.queue(
        (
            Head(headers=(*SSE_HEADERS, ("Content-Encoding", "gzip"))),
            Send(packed, split=4096),
            End(),
        )
    )
    server = await gateway(fault_upstream.url)
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={"model": "deepseek-chat", "messages": [], "stream": True},
    ) as resp:
        await resp.content.readuntil(b"\n\n")  # response.created
        await asyncio.sleep(0.3)
        got = await read_events(resp)
    assert spec_text(got) == token * n
    assert got[-1].event == "response.completed"
