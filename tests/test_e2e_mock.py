"""End to end over real sockets: client -> gateway -> the bundled mock upstream process."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from mock_upstream.mock_deepseek_sse import NORMAL_TEXT, NORMAL_TOKENS, REASONING_TEXT
from tests.conftest import GatewayFactory
from tests.sse_client import read_events, spec_text

SPEC_FIELDS = {
    "response.created": {"id", "model", "created"},
    "response.output_text.delta": {"id", "role", "delta"},
    "response.completed": {"id", "finish_reason", "usage"},
}


def body(mode: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "test_mode": mode,
        **extra,
    }


async def test_normal_stream_is_reframed_event_by_event(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    async with client.post(server.make_url("/v1/chat/completions"), json=body("normal")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Request-Id"]
        events = await read_events(resp)
    names = [e.event for e in events]
    assert names == (
        ["response.created"]
        + ["response.output_text.delta"] * len(NORMAL_TOKENS)
        + ["response.completed"]
    )
    for event in events:
        assert event.event is not None
        assert set(event.json()) == SPEC_FIELDS[event.event]
        assert "\n" not in event.data
    created = events[0].json()
    assert created["model"] == "deepseek-chat"
    assert isinstance(created["created"], int)
    assert all(e.json()["id"] == created["id"] for e in events)
    assert all(e.json()["role"] == "assistant" for e in events[1:-1])
    assert spec_text(events) == NORMAL_TEXT
    done = events[-1].json()
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {
        "completion_tokens": len(NORMAL_TOKENS),
        "prompt_tokens": 1,
        "total_tokens": len(NORMAL_TOKENS) + 1,
    }


async def test_request_id_from_client_is_returned(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("normal"), headers={"X-Request-Id": "abc-123"}) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
        await resp.read()


async def test_stream_false_answers_a_chat_completion_object(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    payload = body("normal", stream=False)
    async with client.post(server.make_url("/v1/chat/completions"), json=payload) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        obj = await resp.json()
    assert obj["object"] == "chat.completion"
    assert obj["model"] == "deepseek-chat"
    choice = obj["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": NORMAL_TEXT}
    assert choice["finish_reason"] == "stop"
    assert obj["usage"]["completion_tokens"] == len(NORMAL_TOKENS)


async def test_stream_false_keeps_reasoning_and_tool_calls(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("reasoning", stream=False)) as resp:
        message = (await resp.json())["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING_TEXT
    assert message["content"] == NORMAL_TEXT
    async with client.post(url, json=body("parallel_tool_calls", stream=False)) as resp:
        obj = await resp.json()
    calls = obj["choices"][0]["message"]["tool_calls"]
    assert obj["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [c["id"] for c in calls] == ["call_00_mock", "call_01_mock"]


async def test_mid_stream_drop_ends_with_upstream_stream_broken(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("stream_error")) as resp:
        assert resp.status == 200
        events = await read_events(resp)
    assert events[-1].event == "response.error"
    assert events[-1].json() == {
        "type": "upstream_stream_broken",
        "message": "Upstream SSE connection closed unexpectedly",
    }
    assert "response.completed" not in [e.event for e in events]
    assert spec_text(events) == "".join(NORMAL_TOKENS[:3])


async def test_upstream_429_becomes_429_with_retry_after(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url, rate_limit={"default_retry_after": 3.0})
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("rate_limit")) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        error = (await resp.json())["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit"
    assert error["message"] == "Rate limit reached for requests"


async def test_upstream_500_after_retries_is_502_with_its_message(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("server_error")) as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
    assert error == {
        "type": "upstream_connection_error",
        "code": "upstream_status_500",
        "message": "Internal server error (mock)",
        "param": None,
    }


async def test_error_event_mid_stream_becomes_upstream_error(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("error_event")) as resp:
        events = await read_events(resp)
    assert events[-1].event == "response.error"
    assert events[-1].json() == {
        "type": "upstream_error",
        "code": "mock_error",
        "message": "Mock upstream error event",
    }


async def test_malformed_chunk_is_skipped_and_logged_with_request_id(
    gateway: GatewayFactory,
    mock_upstream_url: str,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    with caplog.at_level(logging.WARNING, logger="ds2oai.reframe"):
        async with client.post(url, json=body("malformed"), headers={"X-Request-Id": "r-42"}) as r:
            events = await read_events(r)
    assert events[-1].event == "response.completed"
    assert spec_text(events) == NORMAL_TEXT
    skipped = [rec for rec in caplog.records if rec.getMessage() == "skipped upstream chunk"]
    assert len(skipped) == 1
    assert skipped[0].__dict__["request_id"] == "r-42"


async def test_insufficient_system_resource_is_an_error_never_completed(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("insufficient_system_resource")) as resp:
        events = await read_events(resp)
    assert [e.event for e in events].count("response.completed") == 0
    last = events[-1].json()
    assert events[-1].event == "response.error"
    assert last["type"] == "upstream_error"
    assert last["code"] == "insufficient_system_resource"


@pytest.mark.parametrize("mode", ["include_usage", "keepalive"])
async def test_late_usage_and_keepalives_still_complete(
    mode: str, gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body(mode)) as resp:
        events = await read_events(resp)
    assert spec_text(events) == NORMAL_TEXT
    assert events[-1].event == "response.completed"
    assert events[-1].json()["usage"]["completion_tokens"] == len(NORMAL_TOKENS)


async def test_tool_call_stream_completes_with_tool_calls_finish(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")
    async with client.post(url, json=body("tool_calls")) as resp:
        events = await read_events(resp)
    assert [e.event for e in events] == ["response.created", "response.completed"]
    assert events[-1].json()["finish_reason"] == "tool_calls"


async def test_alias_is_exposed_while_upstream_gets_the_mapped_model(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        mock_upstream_url, models={"aliases": {"gpt-4.1-compatible": "deepseek-reasoner"}}
    )
    url = server.make_url("/v1/chat/completions")
    payload = body("normal", model="gpt-4.1-compatible", stream=False)
    async with client.post(url, json=payload) as resp:
        obj = await resp.json()
    assert obj["model"] == "gpt-4.1-compatible"
    async with client.post(url, json=body("normal", model="gpt-4.1-compatible")) as resp:
        events = await read_events(resp)
    assert events[0].json()["model"] == "gpt-4.1-compatible"


async def test_three_hundred_concurrent_streams_are_exact(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    import asyncio

    server = await gateway(mock_upstream_url)
    url = server.make_url("/v1/chat/completions")

    async def one(i: int) -> str:
        async with client.post(url, json=body("long", mock_tokens=20)) as resp:
            events = await read_events(resp)
        assert events[-1].event == "response.completed", events[-1]
        return spec_text(events)

    texts = await asyncio.gather(*(one(i) for i in range(300)))
    expected = "".join(f"tok{i} " for i in range(20))
    assert texts == [expected] * 300


async def test_healthz_and_models(
    gateway: GatewayFactory, mock_upstream_url: str, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        mock_upstream_url, models={"aliases": {"gpt-4.1-compatible": "deepseek-chat"}}
    )
    async with client.get(server.make_url("/healthz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with client.get(server.make_url("/v1/models")) as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert "gpt-4.1-compatible" in ids
    assert "deepseek-chat" in ids
