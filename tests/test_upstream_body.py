"""`UpstreamBody`: a read may be cancelled without losing bytes or the connection.

`reframe` waits for the first upstream event under a plain timeout (keep-alive comments);
that is only sound if a timed-out read leaves the body exactly where it was.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from ds2oai.errors import UpstreamStreamError
from ds2oai.upstream import UpstreamBody, UpstreamClient
from tests.conftest import make_config, make_exchange
from tests.fault_upstream import Close, FaultUpstream, Head, Send, Sleep, text_events


@pytest.fixture
async def client(fault_upstream: FaultUpstream) -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient.create(make_config(fault_upstream.url))
    try:
        yield upstream
    finally:
        await upstream.close()


async def open_body(client: UpstreamClient) -> UpstreamBody:
    body = (await client(make_exchange())).body
    assert isinstance(body, UpstreamBody)
    return body


async def test_a_timed_out_read_loses_nothing(
    fault_upstream: FaultUpstream, client: UpstreamClient
) -> None:
    events = text_events(["a", "b"])
    fault_upstream.queue((Head(), Sleep(0.4), *[Send(e) for e in events]))
    body = await open_body(client)
    for _ in range(3):  # three reads cut short while the upstream is silent
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await anext(body)
    received = b""
    async for data in body:
        received += data
    assert received == b"".join(events)
    assert not client._open  # released at the end


async def test_aclose_mid_body_drops_the_connection(
    fault_upstream: FaultUpstream, client: UpstreamClient
) -> None:
    events = text_events(["a", "b", "c"])
    fault_upstream.queue((Head(), Send(events[0]), Sleep(5), *[Send(e) for e in events[1:]]))
    body = await open_body(client)
    assert await anext(body) == events[0]
    await body.aclose()
    assert not client._open
    with pytest.raises(StopAsyncIteration):
        await anext(body)


async def test_a_broken_body_is_a_stream_error(
    fault_upstream: FaultUpstream, client: UpstreamClient
) -> None:
    events = text_events(["a", "b"])
    fault_upstream.queue((Head(), Send(events[0]), Close()))
    body = await open_body(client)
    assert await anext(body) == events[0]
    with pytest.raises(UpstreamStreamError):
        await anext(body)
    assert not client._open


async def test_a_dropped_body_does_not_stay_open(
    fault_upstream: FaultUpstream, client: UpstreamClient
) -> None:
    fault_upstream.queue((Head(), Sleep(5), *[Send(e) for e in text_events(["a"])]))
    reply = await client(make_exchange())
    assert client._open
    del reply
    gc.collect()
    assert not client._open
