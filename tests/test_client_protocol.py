"""The upstream protocol (`client_protocol`): in use, and the same timeouts and flow control.

Flow control under a slow client is covered end to end by
`test_e2e_faults.test_slow_client_backpressures_the_upstream` (it pauses and resumes reading
many times); these tests pin the lazy `sock_read` timer, that the protocol is installed, and
the one case where aiohttp keeps unparsed input while paused: a compressed body whose small
compressed chunks inflate past the reader's limit (decompression stops, and must go on when
the reader resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time

import aiohttp
import pytest

from ds2oai import client_protocol
from ds2oai.upstream import UpstreamClient
from tests.conftest import GatewayFactory, make_config
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


async def test_the_gateway_uses_the_lighter_protocol_with_this_aiohttp() -> None:
    # Fails when an aiohttp upgrade removes what the protocol relies on: then the gateway runs
    # on aiohttp's own protocol (correct, only slower) and this module needs another look.
    client = UpstreamClient.create(make_config("http://127.0.0.1:9"))
    try:
        assert client_protocol.installed(client._session.connector)  # type: ignore[arg-type]
    finally:
        await client.close()


async def test_silence_is_measured_from_the_last_byte_not_the_first(
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
    # Gaps of 0.15 s never count as silence; the last byte plus 0.4 s does.
    assert spec_text(got) == "".join(tokens)
    assert got[-1].event == "response.error"
    assert "timed out" in got[-1].json()["message"]
    sending = 0.15 * (len(events) - 1)
    assert sending + 0.4 - 0.05 <= elapsed < sending + 0.4 + 1.5


def timed_handler(
    loop: asyncio.AbstractEventLoop, read_timeout: float
) -> tuple[client_protocol.ResponseHandler, list[float]]:
    """A protocol with no connection whose read timeouts are recorded (loop time) in the list."""
    proto = client_protocol.ResponseHandler(loop=loop)
    fired: list[float] = []
    proto._on_read_timeout = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    proto.read_timeout = read_timeout
    return proto, fired


async def test_a_gzip_stream_arrives_exact(
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


async def test_a_slow_client_of_a_highly_compressed_stream_gets_all_of_it(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # ~32 MiB of events from ~100 KiB on the wire: each compressed chunk inflates past the
    # reader's high-water mark, so aiohttp pauses mid-decompression and must resume it.
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
        await asyncio.sleep(0.3)  # the client stalls: the gateway must pause reading
        got = await read_events(resp)
    assert spec_text(got) == token * n
    assert got[-1].event == "response.completed"


async def test_a_shorter_timeout_on_a_reused_connection_is_armed_at_once() -> None:
    loop = asyncio.get_running_loop()
    proto, fired = timed_handler(loop, 30.0)
    proto.start_timeout()
    proto.read_timeout = 0.05
    started = loop.time()
    proto.start_timeout()
    await asyncio.sleep(0.3)
    assert len(fired) == 1
    assert fired[0] - started < 0.25
    proto._drop_timeout()


async def test_reads_push_the_deadline_back_without_new_timers() -> None:
    loop = asyncio.get_running_loop()
    proto, fired = timed_handler(loop, 0.2)
    started = loop.time()
    proto.start_timeout()
    armed = proto._read_timeout_handle
    for _ in range(100):
        proto._reschedule_timeout()  # what every upstream read does
    assert proto._read_timeout_handle is armed
    for _ in range(7):  # a read every 0.07 s for ~0.5 s (not in step with the timeout)
        await asyncio.sleep(0.07)
        proto._reschedule_timeout()
    last_read = loop.time()
    assert not fired
    await asyncio.sleep(0.5)
    assert len(fired) == 1
    assert -0.002 <= fired[0] - (last_read + 0.2) < 0.05
    assert fired[0] - started > 0.6
    assert proto._read_timeout_handle is None


def test_on_uvloop_the_timer_fires_once_without_spinning() -> None:
    # uvloop rounds timer delays to whole milliseconds: a timer that wakes a fraction of a
    # millisecond early must not re-arm itself with zero delays until the clock ticks over.
    uvloop = pytest.importorskip("uvloop")

    async def arms_until_fired(period: float) -> int:
        loop = asyncio.get_running_loop()
        proto, _ = timed_handler(loop, period)
        fired = asyncio.Event()
        proto._on_read_timeout = fired.set  # type: ignore[method-assign]
        arms = 0
        arm = proto._arm

        def counted(when: float) -> None:
            nonlocal arms
            arms += 1
            arm(when)

        proto._arm = counted  # type: ignore[method-assign]
        proto.start_timeout()
        await asyncio.sleep(0.0037)
        proto._reschedule_timeout()
        await fired.wait()
        return arms

    loop = uvloop.new_event_loop()
    try:
        for period in (0.1, 0.4):  # at 0.4 s it woke early every time here (~130 re-arms)
            for _ in range(5):
                assert loop.run_until_complete(arms_until_fired(period)) <= 3
    finally:
        loop.close()


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "aiohttp"])
@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "close"])
async def test_a_pause_on_the_chunk_count_then_the_rest_in_one_read(
    ours: bool, keep_alive: bool
) -> None:
    # More small chunks than the reader holds (read_bufsize // 16) pause reading at a chunk's
    # end; the parser's pause flag outlives that pause, so after the reader resumes, the next
    # read is parsed only up to its first chunk. When that read holds the whole rest of the
    # answer (here: 10 chunks and the terminator), it must still come out.
    first = b"".join(chunk(b"e%05d\n\n" % i) for i in range(4097))
    rest = b"".join(chunk(b"r%02d\n\n" % i) for i in range(10)) + b"0\r\n\r\n"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the head on its own: the next read ends where `first` does
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(rest)
        await writer.drain()
        if keep_alive:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # the client's close

    conn = client_protocol.connector() if ours else aiohttp.TCPConnector()
    timeout = aiohttp.ClientTimeout(total=10, sock_read=2)
    async with (
        RawServer(answer) as server,
        # 64 KiB: reading pauses after 4096 unread chunks (the default 256 KiB: 16,384)
        aiohttp.ClientSession(connector=conn, timeout=timeout, read_bufsize=2**16) as session,
        session.get(server.url) as resp,
    ):
        await asyncio.sleep(0.5)  # a slow reader: both writes have arrived
        received = b""
        while data := await resp.content.readany():
            received += data
    assert received.count(b"\n\n") == 4097 + 10
    assert received.endswith(b"r09\n\n")


async def test_a_pooled_connection_does_not_time_out_while_idle_and_takes_new_timeouts() -> None:
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await writer.drain()
                if b"slow" in head:
                    await asyncio.sleep(0.4)
                writer.write(chunk(b"ok") + b"0\r\n\r\n")
                await writer.drain()

    short = aiohttp.ClientTimeout(total=10, sock_read=0.2)
    async with (
        RawServer(serve) as server,
        aiohttp.ClientSession(connector=client_protocol.connector()) as session,
    ):
        async with session.get(server.url + "/fast", timeout=short) as resp:
            assert await resp.read() == b"ok"
        await asyncio.sleep(0.5)  # idle in the pool for longer than sock_read
        async with session.get(server.url + "/fast", timeout=short) as resp:
            assert await resp.read() == b"ok"
        # The same connection, now with no read timeout: a 0.4 s pause is fine.
        no_read = aiohttp.ClientTimeout(total=10, sock_read=None)
        async with session.get(server.url + "/slow", timeout=no_read) as resp:
            assert await resp.read() == b"ok"
        # And with the short one again, the same pause is a timeout.
        with pytest.raises(aiohttp.ServerTimeoutError):
            async with session.get(server.url + "/slow", timeout=short) as resp:
                await resp.read()
    assert accepted == 1  # all four on one pooled connection (the timeout then closes it)
