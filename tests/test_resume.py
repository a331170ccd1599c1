"""Opt-in mid-stream resume with chat prefix completion (`[resume] enabled = true`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from ds2oai.events import Chunk
from ds2oai.resume import Progress, add_usage
from mock_upstream.mock_deepseek_sse import NORMAL_TEXT
from tests.conftest import GatewayFactory
from tests.fault_upstream import (
    DONE,
    Close,
    End,
    FaultUpstream,
    Hang,
    Head,
    Reset,
    Send,
    chunk,
    sse_script,
)
from tests.loopback import RawServer
from tests.sse_client import Event, parse_events, spec_text
from tests.test_operations import delta, scrape

TOKENS = ["Hé", "llo", " wörld", ",", " how", " are", " you", "?"]
TEXT = "".join(TOKENS)
RESUME = {"enabled": True, "max_attempts": 2}
USAGE = {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}


def first_attempt(k: int) -> list[bytes]:
    return [chunk("", role="assistant"), *(chunk(t) for t in TOKENS[:k])]


def continuation(k: int) -> list[bytes]:
    return [
        chunk("", role="assistant", id="up-2"),
        *(chunk(t, id="up-2") for t in TOKENS[k:]),
        chunk("", finish_reason="stop", usage=USAGE, id="up-2"),
        DONE,
    ]


def text_of(route: str, raw: bytes) -> tuple[str, str]:
    """(text, terminal kind) for each dialect's bytes."""
    if route == "/v1/chat/completions":
        events = parse_events(raw)
        return spec_text(events), events[-1].event or ""
    if route == "/openai/v1/chat/completions":
        chunks = [e.json() for e in parse_events(raw) if e.data != "[DONE]"]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        )
        terminal = "error" if "error" in chunks[-1] else chunks[-1]["choices"][0]["finish_reason"]
        return text, terminal
    items: list[Event] = parse_events(raw)
    text = "".join(e.json()["delta"] for e in items if e.event == "response.output_text.delta")
    return text, items[-1].event or ""


ROUTES = {
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        "response.completed",
    ),
    "/openai/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        "stop",
    ),
    "/v1/responses": ({"input": "hi", "stream": True}, "response.completed"),
}


async def post(client: aiohttp.ClientSession, url: Any, payload: dict[str, Any]) -> bytes:
    async with client.post(url, json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("k", range(1, len(TOKENS) + 1))
async def test_a_break_at_every_event_boundary_is_resumed_exactly(
    route: str,
    k: int,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    fault_upstream.queue(sse_script(first_attempt(k), end=Close()), sse_script(continuation(k)))
    server = await gateway(fault_upstream.url, resume=RESUME)
    payload, success = ROUTES[route]
    text, terminal = text_of(route, await post(client, server.make_url(route), payload))
    assert text == TEXT
    assert terminal == success
    first, second = fault_upstream.requests
    assert first.path == "/v1/chat/completions"
    assert second.path == "/beta/chat/completions"
    prefix = second.json["messages"][-1]
    assert prefix == {"role": "assistant", "content": "".join(TOKENS[:k]), "prefix": True}
    assert second.json["messages"][:-1] == first.json["messages"]


@pytest.mark.parametrize("end", [Reset(), Hang()])
async def test_resets_and_stalls_are_resumed_and_usage_is_summed(
    end: Any, fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    early = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    broken = [*first_attempt(3), chunk(choices=False, usage=early)]
    fault_upstream.queue(sse_script(broken, end=end), sse_script(continuation(3)))
    server = await gateway(fault_upstream.url, resume=RESUME, upstream={"read_timeout": 0.3})
    before = await scrape(client, server.make_url("/metrics"))
    raw = await post(
        client, server.make_url("/v1/chat/completions"), ROUTES["/v1/chat/completions"][0]
    )
    events = parse_events(raw)
    assert spec_text(events) == TEXT
    assert events[-1].json()["usage"] == {
        "prompt_tokens": 27,
        "completion_tokens": 5,
        "total_tokens": 32,
    }
    # What the client was told is what metrics (and per-key token limits) count.
    after = await scrape(client, server.make_url("/metrics"))
    tokens = "ds2oai_tokens_total"
    assert delta(before, after, tokens, model="deepseek-chat", direction="in") == 27
    assert delta(before, after, tokens, model="deepseek-chat", direction="out") == 5


async def test_a_break_inside_a_tool_call_is_not_resumed(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    tool = (
        b'data: {"id":"up-1","created":1,"model":"m","choices":[{"index":0,"delta":'
        b'{"tool_calls":[{"index":0,"id":"call_0","type":"function","function":'
        b'{"name":"f","arguments":"{\\"a\\": "}}]},"finish_reason":null}]}\n\n'
    )
    fault_upstream.queue(sse_script([*first_attempt(2), tool], end=Close()))
    server = await gateway(fault_upstream.url, resume=RESUME)
    raw = await post(
        client, server.make_url("/v1/chat/completions"), ROUTES["/v1/chat/completions"][0]
    )
    assert parse_events(raw)[-1].json()["type"] == "upstream_stream_broken"
    assert len(fault_upstream.requests) == 1


async def test_resume_off_keeps_the_broken_stream_contract(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script(first_attempt(3), end=Close()))
    server = await gateway(fault_upstream.url)
    raw = await post(
        client, server.make_url("/v1/chat/completions"), ROUTES["/v1/chat/completions"][0]
    )
    events = parse_events(raw)
    assert spec_text(events) == "".join(TOKENS[:3])
    assert events[-1].json()["type"] == "upstream_stream_broken"
    assert len(fault_upstream.requests) == 1


async def test_when_every_attempt_fails_the_normal_terminal_error_ends_the_stream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(
        sse_script(first_attempt(2), end=Close()),
        sse_script([chunk("", role="assistant"), chunk(TOKENS[2])], end=Close()),
        sse_script([chunk("", role="assistant"), chunk(TOKENS[3])], end=Close()),
    )
    server = await gateway(fault_upstream.url, resume=RESUME)
    raw = await post(
        client, server.make_url("/v1/chat/completions"), ROUTES["/v1/chat/completions"][0]
    )
    events = parse_events(raw)
    assert spec_text(events) == "".join(TOKENS[:4])  # nothing repeated, nothing skipped
    assert events[-1].event == "response.error"
    assert [e.event for e in events].count("response.error") == 1
    assert len(fault_upstream.requests) == 3
    third = fault_upstream.requests[2].json["messages"][-1]
    assert third["content"] == "".join(TOKENS[:3])


async def test_reasoning_so_far_goes_with_the_prefix(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    thinking = [
        chunk(role="assistant", reasoning=""),
        chunk(reasoning="Let me"),
        chunk(reasoning=" think"),
    ]
    rest = [chunk(reasoning="."), chunk("Answer."), chunk("", finish_reason="stop"), DONE]
    fault_upstream.queue(sse_script(thinking, end=Close()), sse_script(rest))
    server = await gateway(fault_upstream.url, resume=RESUME)
    await post(client, server.make_url("/v1/chat/completions"), ROUTES["/v1/chat/completions"][0])
    prefix = fault_upstream.requests[1].json["messages"][-1]
    assert prefix == {
        "role": "assistant",
        "content": "",
        "prefix": True,
        "reasoning_content": "Let me think",
    }


async def test_the_mock_breaks_once_and_the_client_gets_the_whole_text(
    mock_upstream_url: str, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url, resume=RESUME)
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "test_mode": "break_once",
    }
    events = parse_events(await post(client, server.make_url("/v1/chat/completions"), payload))
    assert spec_text(events) == NORMAL_TEXT
    assert events[-1].event == "response.completed"


def test_progress_is_not_resumable_before_text_or_after_finish() -> None:
    progress = Progress()
    assert not progress.resumable()
    progress.observe(Chunk(id="a", created=0, model="m", content="x"))
    assert progress.resumable()
    progress.observe(Chunk(id="a", created=0, model="m", finish_reason="stop"))
    assert not progress.resumable()


def test_usage_is_summed_field_by_field() -> None:
    a = {"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}
    b = {
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert add_usage(a, b) == {
        "prompt_tokens": 11,
        "completion_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 6},
    }
    assert add_usage(None, b) == b
    assert add_usage(a, None) == a


async def test_the_continuation_can_use_the_connection_the_broken_answer_held(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # One upstream connection allowed; the first answer is whole (`[DONE]` without a finish),
    # so the continuation must get that same connection back, not wait for another.
    # (`[DONE]` comes after the text has gone out: a break before any byte is not resumed.)
    first = b"".join(first_attempt(3))
    rest = b"".join(continuation(3))
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for body, then in ((first, DONE), (rest, b"")):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            seen.append(head.split(b" ")[1])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body + then) + body
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(then)
            await writer.drain()
        await reader.read()

    async with RawServer(handle) as upstream:
        server = await gateway(
            upstream.url,
            resume=RESUME,
            upstream={"max_connections": 1, "connect_timeout": 2.0},
            retry={"max_retries": 0},
        )
        started = time.monotonic()
        route = "/v1/chat/completions"
        raw = await post(client, server.make_url(route), ROUTES[route][0])
        assert text_of(route, raw) == (TEXT, "response.completed")
        assert time.monotonic() - started < 1.5  # no wait for a pool slot (2 s)
        assert seen == [b"/v1/chat/completions", b"/beta/chat/completions"]


@pytest.mark.parametrize("end", [DONE, b""], ids=["done-without-finish", "end-of-body"])
async def test_a_break_in_the_same_read_as_the_first_text_is_resumed(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    end: bytes,
) -> None:
    # The whole broken first attempt arrives in one write: nothing has gone out yet when the
    # break is read, but its text will, so the continuation is asked for all the same.
    fault_upstream.queue((Head(), Send(b"".join(first_attempt(3)) + end), End()))
    fault_upstream.queue(sse_script(continuation(3)))
    server = await gateway(fault_upstream.url, resume=RESUME)
    route = "/v1/chat/completions"
    raw = await post(client, server.make_url(route), ROUTES[route][0])
    assert text_of(route, raw) == (TEXT, "response.completed")
    assert len(fault_upstream.requests) == 2
