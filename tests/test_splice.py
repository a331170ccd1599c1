"""Paced text chunks written from the upstream connection's read callback (the splice).

`reframe` hands a paced stream's plain text chunks to `http1.Response.splice` once the sink has
offered the client's connection (`chain.Downstream`). These tests hold it to what the usual
path guarantees: the same bytes in the same order on both routes, every way a stream can break
while spliced, timeouts, a client that leaves or lags, HTTP/1.0 framing, and a body wrapped by
another stage never bypassed. The first tests drive `http1` directly against raw servers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ds2oai import http1
from ds2oai.chain import takes_downstream, wants_downstream
from ds2oai.dialects.spec import SpecDialect
from ds2oai.event_reader import EventReader
from ds2oai.middleware import reframe as reframe_module
from ds2oai.middleware.limits import _GuardedBody
from ds2oai.middleware.reframe import _Tap
from ds2oai.server import create_app
from ds2oai.upstream import UpstreamBody
from tests.conftest import ROOT, GatewayFactory, make_config, make_exchange
from tests.fault_upstream import (
    DONE,
    Close,
    End,
    FaultUpstream,
    Hang,
    Head,
    Reset,
    Send,
    Sleep,
    sse_script,
    text_events,
)
from tests.fault_upstream import chunk as sse_chunk
from tests.loopback import RawServer, chunk
from tests.sse_client import Event, parse_events, read_events, spec_text
from tests.test_extras import write_config
from tests.test_http1 import OK_CHUNKED, Reader, Writer, read_request
from tests.test_limits import CHAIN as LIMITED
from tests.test_limits import wait_admitted

TOKENS = [f"t{i}é " for i in range(12)]  # distinct: a lost or repeated one shows
TEXT = "".join(TOKENS)
PACE = 0.03  # seconds between upstream events: one event per network read
BROKEN = {
    "type": "upstream_stream_broken",
    "message": "Upstream SSE connection closed unexpectedly",
}


# ------------------------------------------------------------------------------ http1 itself


def paced(*parts: bytes, hang: bool = False, pause: float = PACE) -> RawServer:
    """A server answering one request with a chunked head, then each part as its own HTTP
    chunk `pause` apart, then the terminator (or nothing more, with `hang`)."""

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        writer.write(OK_CHUNKED)
        for part in parts:
            await asyncio.sleep(pause)
            writer.write(chunk(part))
            await writer.drain()
        if hang:
            await reader.read()
        else:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()

    return RawServer(handle, grace=0.1)


async def read(response: http1.Response) -> bytes:
    return await asyncio.wait_for(response.read(), 5)  # a stray tap would take it: no hang


def taking(until: bytes | None = None) -> tuple[list[bytes], Callable[[bytes], bool]]:
    """A tap that takes every read (until one starting with `until`) and records it."""
    taken: list[bytes] = []

    def tap(data: bytes) -> bool:
        if until is not None and data.startswith(until):
            return False
        taken.append(data)
        return True

    return taken, tap


async def test_splice_takes_each_read_and_leaves_the_declined_one_for_read(
    pool: http1.Pool,
) -> None:
    async with paced(b"one", b"two", b"stop", b"after") as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        taken, tap = taking(until=b"stop")
        waiter = response.splice(tap)
        assert waiter is not None
        await asyncio.wait_for(waiter, 5)
        response.unsplice()
        assert taken == [b"one", b"two"]
        assert await read(response) == b"stop"  # the declined read, whole, not lost
        assert await read(response) == b"after"  # nothing taken once the splice ended
        assert await read(response) == b""
        assert taken == [b"one", b"two"]


async def test_splice_ends_with_the_answer(pool: http1.Pool) -> None:
    async with paced(b"one", b"two") as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        taken, tap = taking()
        waiter = response.splice(tap)
        assert waiter is not None
        await asyncio.wait_for(waiter, 5)
        response.unsplice()
        assert taken == [b"one", b"two"]
        assert await read(response) == b""
        response.release()
        assert pool.idle_connections == 1  # a whole answer: back in the pool


async def test_splice_is_refused_while_bytes_wait_for_read(pool: http1.Pool) -> None:
    async with paced(b"one", b"two", pause=0.0) as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        await asyncio.sleep(0.2)  # everything has arrived, unread
        taken, tap = taking()
        assert response.splice(tap) is None
        assert await read(response) == b"onetwo"
        assert taken == []


async def test_silence_while_spliced_is_the_read_timeout(pool: http1.Pool) -> None:
    async with paced(b"one", hang=True) as server:
        response = await pool.request("POST", server.url + "/", body=b"{}", read_timeout=0.3)
        taken, tap = taking()
        waiter = response.splice(tap)
        assert waiter is not None
        started = time.monotonic()
        await asyncio.wait_for(waiter, 5)
        response.unsplice()
        assert 0.25 < time.monotonic() - started < 2
        assert taken == [b"one"]
        with pytest.raises(http1.ReadTimeout):
            await read(response)


async def test_a_tap_that_raises_declines_the_read(pool: http1.Pool) -> None:
    async with paced(b"one", b"two") as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")

        def tap(data: bytes) -> bool:
            raise ValueError("a bug in the tap")

        waiter = response.splice(tap)
        assert waiter is not None
        await asyncio.wait_for(waiter, 5)
        response.unsplice()
        assert await read(response) == b"one"  # left for the usual path, which reports it


async def test_a_cancelled_splice_takes_nothing_more(pool: http1.Pool) -> None:
    async with paced(b"one", b"two", pause=0.2) as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        taken, tap = taking()
        waiter = response.splice(tap)
        assert waiter is not None
        waiter.cancel()
        response.unsplice()
        assert await read(response) == b"one"
        assert await read(response) == b"two"
        assert taken == []


async def test_closing_while_spliced_wakes_the_waiter(pool: http1.Pool) -> None:
    async with paced(b"one", hang=True) as server:
        response = await pool.request("POST", server.url + "/", body=b"{}")
        taken, tap = taking()
        waiter = response.splice(tap)
        assert waiter is not None
        await asyncio.sleep(0.2)
        assert taken == [b"one"]
        pool.abort()  # shutdown: every connection goes
        await asyncio.wait_for(waiter, 5)
        response.unsplice()
        with pytest.raises(http1.Disconnected):
            await read(response)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every upstream read the gateway's tap took (wraps `UpstreamBody.splice`)."""
    seen: list[bytes] = []
    original = UpstreamBody.splice

    async def spy(
        self: UpstreamBody, tap: Callable[[bytes], bool], turn: float | None = None
    ) -> bool:
        def recording(data: bytes) -> bool:
            took = tap(data)
            if took:
                seen.append(data)
            return took

        return await original(self, recording, turn)

    monkeypatch.setattr(UpstreamBody, "splice", spy)
    return seen


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def chat_text(events: list[Event]) -> str:
    out = []
    for e in events:
        if e.data == "[DONE]":
            continue
        for choice in e.json().get("choices", []):
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


async def chat_stream(client: aiohttp.ClientSession, server: TestServer) -> list[Event]:
    """A streamed answer on the OpenAI chat route, as events."""
    url = server.make_url("/openai/v1/chat/completions")
    async with client.post(url, json=body(stream=True)) as r:
        return await read_events(r)


async def responses_stream(
    client: aiohttp.ClientSession, server: TestServer
) -> list[dict[str, Any]]:
    """A streamed `/v1/responses` answer's event data, checked to be numbered 0, 1, 2, …"""
    request = {"model": "deepseek-chat", "input": "hi", "stream": True, "store": False}
    async with client.post(server.make_url("/v1/responses"), json=request) as r:
        events = await read_events(r)
    data = [e.json() for e in events]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert all(d["type"] == e.event for d, e in zip(data, events, strict=True))
    return data


def spliced(taken: list[bytes], reads: set[bytes]) -> int:
    """How many of `reads` the splice took."""
    return len([read for read in taken if read in reads])


async def over_a_raw_socket(
    port: int | None, version: bytes = b"1.1", connection: bytes = b"close"
) -> bytes:
    """A streamed request; every byte until the server ends the connection."""
    assert port is not None
    payload = json.dumps(body(stream=True)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/%b\r\nHost: x\r\nConnection: %b\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (version, connection, len(payload), payload)
    )
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_paced_text_is_exact_on_the_spec_route(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    upstream_events = text_events(TOKENS)
    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    server = await gateway(fault_upstream.url)
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        events = await read_events(r)
    assert spec_text(events) == TEXT
    assert [e.event for e in events].count("response.output_text.delta") == len(TOKENS)
    assert events[-1].event == "response.completed"
    assert events[-1].json()["usage"]["completion_tokens"] == len(TOKENS)
    # The splice carried most of it (a stalled machine may merge a few reads: those go the
    # usual way), and took only whole text events.
    assert len(taken) >= len(TOKENS) // 2
    assert set(taken) <= set(upstream_events[2:-2])


async def test_paced_text_is_exact_on_the_chat_route(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=PACE))
    server = await gateway(fault_upstream.url)
    events = await chat_stream(client, server)
    assert chat_text(events) == TEXT
    assert events[-1].data == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in e.json()["choices"]]
    assert finishes.count("stop") == 1
    assert all(e.json()["model"] == "deepseek-chat" for e in events[:-1])
    assert len(taken) >= len(TOKENS) // 2


def thinking_events() -> list[bytes]:
    """A reasoning model's answer: thinking chunks (`content` null), then text chunks."""
    events = [sse_chunk("", role="assistant")]
    events += [
        sse_chunk(reasoning=token).replace(b'"delta":{', b'"delta":{"content":null,', 1)
        for token in TOKENS
    ]
    events += text_events(TOKENS[:3])[1:]
    return events


async def test_paced_thinking_is_spliced_and_exact_on_both_routes(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    upstream_events = thinking_events()
    assert b'"delta":{"content":null,"reasoning_content":"t1' in upstream_events[2]
    thoughts = set(upstream_events[2 : 1 + len(TOKENS)])  # the first one is parsed (learned)
    server = await gateway(fault_upstream.url)

    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    events = await chat_stream(client, server)
    deltas = [c["delta"] for e in events[:-1] for c in e.json()["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == TEXT
    assert "".join(d.get("content") or "" for d in deltas) == "".join(TOKENS[:3])
    assert sum("reasoning_content" in d for d in deltas) == len(TOKENS)
    assert events[-1].data == "[DONE]"
    assert spliced(taken, thoughts) >= len(TOKENS) // 2

    taken.clear()
    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        events = await read_events(r)
    # The spec route has no thinking event: only the text, and the thinking reads are taken
    # (to produce nothing) rather than parsed.
    assert spec_text(events) == "".join(TOKENS[:3])
    assert [e.event for e in events].count("response.output_text.delta") == 3
    assert events[-1].event == "response.completed"
    assert spliced(taken, thoughts) >= len(TOKENS) // 2


async def test_paced_thinking_and_text_are_spliced_and_exact_on_the_responses_route(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    upstream_events = thinking_events()
    thoughts = set(upstream_events[2 : 1 + len(TOKENS)])  # the first one is parsed (learned)
    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    server = await gateway(fault_upstream.url)
    data = await responses_stream(client, server)
    reasoning = [d["delta"] for d in data if d["type"] == "response.reasoning_text.delta"]
    text = [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
    assert reasoning == TOKENS
    assert text == TOKENS[:3]
    assert data[-1]["type"] == "response.completed"
    output = data[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"]
    assert output[0]["content"][0]["text"] == TEXT
    assert output[1]["content"][0]["text"] == "".join(TOKENS[:3])
    assert spliced(taken, thoughts) >= len(TOKENS) // 2


def tool_call_events() -> list[bytes]:
    """A tool call streamed as DeepSeek does: the call's start, then one chunk per fragment
    of its arguments (TOKENS), then the finish."""

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {"id": "up-1", "object": "chat.completion.chunk", "created": 1700000000}
        obj |= {"model": "deepseek-chat", "system_fingerprint": "fp_fault", "choices": [choice]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    start = {"index": 0, "id": "call_1", "type": "function"}
    events = [event({"role": "assistant", "content": None})]
    events.append(event({"tool_calls": [{**start, "function": {"name": "w", "arguments": ""}}]}))
    events += [
        event({"content": None, "tool_calls": [{"index": 0, "function": {"arguments": t}}]})
        for t in TOKENS
    ]
    return [*events, event({}, "tool_calls"), DONE]


async def test_paced_tool_call_arguments_are_spliced_and_exact(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    upstream_events = tool_call_events()
    fragments = set(upstream_events[3 : 2 + len(TOKENS)])  # the first one is parsed (learned)
    server = await gateway(fault_upstream.url)

    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    events = await chat_stream(client, server)
    calls = [
        c
        for e in events[:-1]
        for ch in e.json()["choices"]
        for c in ch["delta"].get("tool_calls", [])
    ]
    assert "".join(c["function"].get("arguments", "") for c in calls) == TEXT
    assert [c.get("id") for c in calls if c.get("id")] == ["call_1"]
    assert {c["index"] for c in calls} == {0}
    assert events[-1].data == "[DONE]"
    assert spliced(taken, fragments) >= len(TOKENS) // 2

    taken.clear()
    fault_upstream.queue(sse_script(upstream_events, delay=PACE))
    data = await responses_stream(client, server)
    deltas = [d["delta"] for d in data if d["type"] == "response.function_call_arguments.delta"]
    assert deltas == TOKENS
    assert data[-1]["type"] == "response.completed"
    (call,) = data[-1]["response"]["output"]
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == (
        "function_call",
        "call_1",
        "w",
        TEXT,
    )
    assert spliced(taken, fragments) >= len(TOKENS) // 2


@pytest.mark.parametrize("end", [Close(), Reset()], ids=["truncated", "reset"])
async def test_a_break_while_spliced_is_one_final_broken_event(
    end: Any,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS)[:-2], delay=PACE, end=end))
    server = await gateway(fault_upstream.url)
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        events = await read_events(r)
    assert spec_text(events) == TEXT  # every token came; the finish did not
    assert events[-1].event == "response.error"
    assert events[-1].json() == BROKEN
    assert [e.event for e in events].count("response.error") == 1
    assert "response.completed" not in [e.event for e in events]
    assert taken


async def test_silence_while_spliced_ends_with_a_timeout_event(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS)[:6], delay=PACE, end=Hang()))
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.5})
    started = time.monotonic()
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        events = await read_events(r)
    assert time.monotonic() - started < 4
    assert spec_text(events) == "".join(TOKENS[:5])
    assert events[-1].event == "response.error"
    assert "timed out" in events[-1].json()["message"]
    assert taken
    await fault_upstream.wait_client_disconnect()


async def test_a_client_leaving_while_spliced_closes_the_upstream_at_once(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS * 20), delay=PACE))
    server = await gateway(fault_upstream.url)
    resp = await client.post(server.make_url("/v1/chat/completions"), json=body(stream=True))
    assert resp.status == 200
    for _ in range(200):
        if len(taken) >= 3:
            break
        await asyncio.sleep(0.02)
    assert len(taken) >= 3  # spliced by now
    resp.close()
    started = time.monotonic()
    await fault_upstream.wait_client_disconnect(timeout=3)
    assert time.monotonic() - started < 2


@pytest.fixture
def limits_pulls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, bytes]]:
    """When the per-key limits' body was pulled, and what it got (wraps `_GuardedBody._pull`)."""
    pulls: list[tuple[float, bytes]] = []
    original = _GuardedBody._pull

    async def spy(self: _GuardedBody, value: Any) -> bytes:
        item = await original(self, value)
        pulls.append((time.monotonic(), item))
        return item

    monkeypatch.setattr(_GuardedBody, "_pull", spy)
    return pulls


async def test_per_key_limits_pass_the_splice_on_and_get_their_pulls(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
    limits_pulls: list[tuple[float, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The limits stage wraps the body only to release its slot and renew its lease: the sink
    # offers the client's connection through it, and while spliced `reframe` still yields an
    # empty item every turn (shortened here), on which the lease renewals run.
    monkeypatch.setattr(reframe_module, "_SPLICE_TURN", 0.05)
    tokens = [f"t{i}é " for i in range(24)]  # 24 x 30 ms: several turns
    fault_upstream.queue(sse_script(text_events(tokens), delay=PACE))
    server = await gateway(
        fault_upstream.url, limits={"concurrent_streams": 1}, middleware={"chain": LIMITED}
    )
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body(stream=True)) as r:
        events = await read_events(r)
    assert spec_text(events) == "".join(tokens)
    assert [e.event for e in events].count("response.output_text.delta") == len(tokens)
    assert events[-1].event == "response.completed"
    # Spliced through the limits' body (each short turn hands one read to the loop).
    assert len(taken) >= len(tokens) // 4
    pulled = [item for _, item in limits_pulls]
    assert pulled.count(b"") >= 2  # the turns' empty items reached the limits' body
    assert not [e for e in events if not e.data]  # and nothing of them reached the client
    await wait_admitted(client, url)  # the slot came back once the answer ended


async def test_a_limited_stream_is_pulled_every_turn_while_the_client_gets_nothing(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    limits_pulls: list[tuple[float, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Thinking on the spec route gives the client nothing, spliced or not; a read of two
    # events ends a splice early. The limits' body must still be pulled every turn (its lease
    # renewals), not only when one splice lasts a whole turn.
    monkeypatch.setattr(reframe_module, "_SPLICE_TURN", 0.3)
    steps: list[Any] = [Head(), Send(sse_chunk("", role="assistant")), Sleep(PACE)]
    steps.append(Send(sse_chunk("a ")))
    for i in range(100):
        two = sse_chunk(reasoning=f"x{i} ") if i % 5 == 0 else b""
        steps += [Sleep(PACE), Send(sse_chunk(reasoning=f"r{i} ") + two)]
    steps += [Sleep(PACE), Send(sse_chunk("b ")), Send(sse_chunk("", finish_reason="stop"))]
    steps += [Send(DONE), End()]
    fault_upstream.queue(tuple(steps))
    server = await gateway(
        fault_upstream.url, limits={"concurrent_streams": 1}, middleware={"chain": LIMITED}
    )
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        events = await read_events(r)
    assert spec_text(events) == "a b "
    pulls = [when for when, _ in limits_pulls]
    gaps = [b - a for a, b in itertools.pairwise(pulls)]
    assert len(pulls) >= 8  # about 3 s of thinking, a turn of 0.3 s
    assert max(gaps) < 0.3 + 0.4  # a turn, plus a read's wait and this machine's jitter


async def test_a_client_leaving_a_spliced_limited_stream_gives_its_slot_back(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    taken: list[bytes],
) -> None:
    tokens = [f"t{i} " for i in range(200)]  # 6 s at this pace: it is left long before
    fault_upstream.queue(sse_script(text_events(tokens), delay=PACE))
    server = await gateway(
        fault_upstream.url, limits={"concurrent_streams": 1}, middleware={"chain": LIMITED}
    )
    url = server.make_url("/v1/chat/completions")
    resp = await client.post(url, json=body(stream=True))
    assert resp.status == 200
    for _ in range(200):
        if len(taken) >= 3:
            break
        await asyncio.sleep(0.02)
    assert len(taken) >= 3  # spliced through the limits' body by now
    async with client.post(url, json=body(stream=True)) as second:
        assert second.status == 429  # the one slot is held
    resp.close()
    await fault_upstream.wait_client_disconnect(timeout=3)
    await wait_admitted(client, url)


def test_only_registered_wrapper_classes_pass_the_offer_on() -> None:
    @takes_downstream
    async def taker() -> AsyncGenerator[bytes, Any]:
        yield b"x"

    async def other() -> AsyncGenerator[bytes, None]:
        yield b"x"

    async def release() -> None:
        return None

    class Subclass(_GuardedBody):
        pass

    assert wants_downstream(_GuardedBody(taker(), release))
    assert wants_downstream(_GuardedBody(_GuardedBody(taker(), release), release))
    assert not wants_downstream(_GuardedBody(other(), release))
    assert not wants_downstream(Subclass(taker(), release))  # the exact class only


async def test_a_lagging_client_gets_every_byte_in_order(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    # 16 KiB tokens 2 ms apart while the client does not read: the path's buffers fill, the
    # splice hands back to the sink (which waits), and nothing is dropped or repeated.
    tokens = [f"{i:05d}" + "y" * 16 * 1024 for i in range(300)]
    fault_upstream.queue(sse_script(text_events(tokens), delay=0.002))
    server = await gateway(fault_upstream.url)
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        await r.content.readuntil(b"\n\n")
        await asyncio.sleep(1.0)
        rest = await r.read()
    deltas = [
        e.json()["delta"] for e in parse_events(rest) if e.event == "response.output_text.delta"
    ]
    assert deltas == tokens


@pytest.mark.parametrize("connection", [b"close", b"keep-alive"])
async def test_an_http_1_0_client_gets_the_unframed_stream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, taken: list[bytes], connection: bytes
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=PACE))
    server = await gateway(fault_upstream.url)
    # The body ends with the connection, even when the client asked to keep it alive: there
    # is no other way to mark its end in HTTP/1.0.
    raw = await over_a_raw_socket(server.port, b"1.0", connection)
    head, _, stream = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: keep-alive" not in head.lower()
    events = parse_events(stream)
    assert spec_text(events) == TEXT
    assert events[-1].event == "response.completed"
    assert taken


async def test_a_stage_wrapping_the_body_sees_every_byte(
    tmp_path: Path, fault_upstream: FaultUpstream, aiohttp_server: Any, taken: list[bytes]
) -> None:
    log_path = tmp_path / "access.jsonl"
    config = write_config(
        tmp_path,
        fault_upstream.url,
        f'[middleware]\npaths = ["{ROOT}"]\n'
        'chain = ["middleware.access_log:AccessLog", "auth", "retry", "reframe"]\n'
        f'[middleware.access_log]\npath = "{log_path}"\n',
    )
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=PACE))
    server = await aiohttp_server(create_app(config))
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r,
    ):
        raw = await r.read()
    assert spec_text(parse_events(raw)) == TEXT
    assert json.loads(log_path.read_text())["bytes"] == len(raw)  # it counted every write
    assert taken == []  # the sink's offer reached the wrapper, not reframe


_SOURCE = """
    def __init__(self, source):
        self._source = source

    async def aclose(self):
        await self._source.aclose()
"""
_DELEGATING = """
    async def asend(self, value):
        return (await self._source.asend(value)).replace(b"secret", b"[redacted]")

    async def athrow(self, typ, val=None, tb=None):
        return await self._source.athrow(typ, val, tb)
"""
_PROXYING = """
    def __getattr__(self, name):
        return getattr(self._source, name)
"""
_WRAPPING_STAGES = {
    # The way collections.abc.AsyncGenerator is built: asend delegates, sent values included.
    "forwarding": "class Redacting(AsyncGenerator):" + _SOURCE + _DELEGATING,
    # A transparent proxy: every other attribute (ag_code, ag_frame, ...) is the source's.
    "proxy": "class Redacting(AsyncGenerator):" + _SOURCE + _DELEGATING + _PROXYING,
    # Only __anext__ of its own; asend would resolve to the source's through __getattr__.
    "anext-only proxy": "class Redacting:"
    + _SOURCE
    + _PROXYING
    + """
    def __aiter__(self):
        return self

    async def __anext__(self):
        return (await self._source.__anext__()).replace(b"secret", b"[redacted]")
""",
}
_STAGE = """
import dataclasses
from collections.abc import AsyncGenerator

{wrapper}

class Stage:
    name = "stage"

    async def __call__(self, exchange, call_next):
        reply = await call_next(exchange)
        if isinstance(reply.body, bytes):
            return reply
        return dataclasses.replace(reply, {change})
"""


async def stage_in_front(
    tmp_path: Path, upstream_url: str, aiohttp_server: Any, name: str, **parts: str
) -> Any:
    """A gateway whose chain starts with a stage built from `_STAGE` and `parts`."""
    # One module name per stage: an imported module stays in sys.modules across tests.
    module = "stage_" + name
    (tmp_path / f"{module}.py").write_text(_STAGE.format(**parts), encoding="utf-8")
    config = write_config(
        tmp_path,
        upstream_url,
        f'[middleware]\npaths = ["{tmp_path}"]\n'
        f'chain = ["{module}:Stage", "auth", "retry", "reframe"]\n',
    )
    return await aiohttp_server(create_app(config))


@pytest.mark.parametrize("kind", list(_WRAPPING_STAGES))
async def test_a_wrapper_is_never_bypassed_whatever_it_forwards(
    kind: str,
    tmp_path: Path,
    fault_upstream: FaultUpstream,
    aiohttp_server: Any,
    taken: list[bytes],
) -> None:
    fault_upstream.queue(sse_script(text_events([f"secret{i} " for i in range(12)]), delay=PACE))
    server = await stage_in_front(
        tmp_path,
        fault_upstream.url,
        aiohttp_server,
        kind.replace(" ", "_").replace("-", "_"),
        wrapper=_WRAPPING_STAGES[kind],
        change="body=Redacting(reply.body)",
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r,
    ):
        text = spec_text(parse_events(await r.read()))
    assert text == "".join(f"[redacted]{i} " for i in range(12))
    assert taken == []  # the offer goes only to reframe's own body, unwrapped


async def test_a_content_length_some_stage_set_turns_the_splice_off(
    tmp_path: Path, fault_upstream: FaultUpstream, aiohttp_server: Any, taken: list[bytes]
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=PACE))
    # The same body object, a header that bounds it: aiohttp cuts its writes at the length.
    server = await stage_in_front(
        tmp_path,
        fault_upstream.url,
        aiohttp_server,
        "length",
        wrapper="",
        change='headers={**reply.headers, "Content-Length": "300"}',
    )
    head = (await over_a_raw_socket(server.port)).partition(b"\r\n\r\n")[0].lower()
    assert b"content-length: 300" in head
    assert b"transfer-encoding" not in head
    # Whatever aiohttp makes of a too-long body is its own; nothing went around its writer.
    assert taken == []


async def test_aiohttp_counts_the_spliced_bytes(
    fault_upstream: FaultUpstream, taken: list[bytes], aiohttp_server: Any
) -> None:
    app = create_app(make_config(fault_upstream.url))
    lengths: list[int] = []

    @web.middleware
    async def measure(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        lengths.append(response.body_length)
        return response

    app.middlewares.append(measure)
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=PACE))
    server = await aiohttp_server(app)
    wire = await over_a_raw_socket(server.port)
    assert wire.endswith(b"\r\n0\r\n\r\n")
    assert taken
    assert lengths == [len(wire)]  # head, framing and every event: what aiohttp logs as %b


# ------------------------------------------------------------------------- the tap on its own


class _FakeDownstream:
    def __init__(self, blocked: bool) -> None:
        self.blocked = blocked
        self.wrapped = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        return None


def test_the_tap_declines_while_the_client_is_blocked() -> None:
    reader = EventReader(make_exchange(), (), templates=True)
    dialect = SpecDialect("deepseek-chat")
    role, first, second = text_events(["ab", "cd"])[:3]
    for event in reader.read(role + first):  # a parsed text chunk: the template is learned
        dialect.feed(event)
    down = _FakeDownstream(blocked=True)
    tap = _Tap(reader, dialect, down).take
    assert tap(second) is False  # left for the sink, which waits for the client
    assert down.written == []
    down.blocked = False
    assert tap(second) is True
    assert down.written == [dialect.feed_text(b'"cd"')]
    assert tap(role) is False  # not a plain text chunk: the usual path's
