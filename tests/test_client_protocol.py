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
import gzip
import time

import aiohttp

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
    for _ in range(5):  # a read every 0.1 s for 0.5 s
        await asyncio.sleep(0.1)
        proto._reschedule_timeout()
    last_read = loop.time()
    assert not fired
    await asyncio.sleep(0.5)
    assert len(fired) == 1
    assert last_read + 0.2 - 0.02 <= fired[0] < last_read + 0.2 + 0.2
    assert fired[0] - started > 0.6
    assert proto._read_timeout_handle is None
