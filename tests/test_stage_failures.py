"""A stage outside reframe that fails, or ends the body early, after the answer's head went out.

The status is sent by then, so the client must get its dialect's terminal error event and a
properly ended response (never a dropped connection, never an end that looks whole), on the
spec route, the OpenAI chat route (the SDK raises) and `/v1/responses` (`response.failed`).
The stages below are loaded from the config as a user's would be; what they do is chosen per
request by a field of the client's body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from ds2oai.chain import Exchange, Next, Reply
from ds2oai.errors import ClientError
from tests.conftest import GatewayFactory
from tests.fault_upstream import FaultUpstream, sse_script, text_events
from tests.sse_client import Event, parse_events, spec_text

TOKENS = [f"t{i} " for i in range(8)]


class Faulty:
    """Wraps the streamed body; `stage_fault` in the client's body says how it misbehaves
    after `stage_after` items: "raise", "client_error", "stop" (ends the body early),
    "raise_at_end" (passes every item, then raises when pulled once more), "conn_at_end" (the
    same with a `ConnectionResetError` of its own, not the client's), or on the item that
    carries the answer's end: "raise_last" or "stop_last". "bad_header" sets a reply header
    with a line break instead."""

    name = "faulty"

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        reply = await call_next(exchange)
        fault = exchange.client_body.get("stage_fault")
        if fault == "bad_header":  # a header no HTTP head can carry
            value = exchange.client_body.get("stage_header", "a\r\nInjected: 1")
            return Reply(reply.status, {**reply.headers, "X-Bad": value}, reply.body)
        if fault is None or isinstance(reply.body, bytes):
            return reply
        after = int(exchange.client_body.get("stage_after", 2))
        return Reply(reply.status, reply.headers, _misbehave(reply.body, fault, after))


async def _misbehave(
    body: AsyncIterator[bytes], fault: str, after: int
) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for item in body:
        if fault in ("raise_last", "stop_last"):
            if b"[DONE]" in item or b"response.completed" in item:
                if fault == "raise_last":
                    raise ClientError(451, "invalid_request_error", "blocked", "Blocked by policy")
                return
        elif item and seen == after and not fault.endswith("_at_end"):
            if fault == "raise":
                raise RuntimeError("stage bug")
            if fault == "client_error":
                raise ClientError(451, "invalid_request_error", "blocked", "Blocked by policy")
            return  # "stop"
        yield item
        seen += bool(item)
    if fault == "raise_at_end":
        raise RuntimeError("stage bug at the end")
    if fault == "conn_at_end":
        raise ConnectionResetError("the stage's own socket")


class Fallback:
    """Answers a canned chat stream when the upstream fails before the answer's first byte."""

    name = "fallback"

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        reply = await call_next(exchange)
        if isinstance(reply.body, bytes):
            return reply
        return Reply(reply.status, reply.headers, _fallback(reply.body))


CANNED = (
    b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"sorry"},"finish_reason":"stop"}]}'
    b"\n\ndata: [DONE]\n\n"
)


async def _fallback(body: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    try:
        first = await anext(body)
    except ClientError:
        yield CANNED
        return
    yield first
    async for item in body:
        yield item


CHAIN = {"chain": ["tests.test_stage_failures:Faulty", "auth", "retry", "reframe"]}


def _body(fault: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stage_fault": fault,
        **extra,
    }


async def _events(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, path: str, body: dict[str, Any]
) -> list[Event]:
    """A paced answer through the faulty stage: the events the client got (with a 200)."""
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=0.005))
    server = await gateway(fault_upstream.url, middleware=CHAIN)
    status, raw = await _post(server, path, body)
    assert status == 200
    return parse_events(raw)


async def _post(server: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url(path), json=body) as response,
    ):
        # read() raises ClientPayloadError on a dropped connection or a missing chunked end.
        return response.status, await response.read()


@pytest.mark.parametrize("fault", ["raise", "stop"])
async def test_spec_route_ends_with_an_error_event(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, "ds2oai"):
        events = await _events(fault_upstream, gateway, "/v1/chat/completions", _body(fault))
    assert spec_text(events) == "".join(TOKENS[:1])  # the first item was the role chunk's
    assert events[-1].event == "response.error"
    assert events[-1].json() == {
        "type": "server_error",
        "code": "internal_error",
        "message": "Internal gateway error; the answer was cut short",
    }
    assert not any(e.event == "response.completed" for e in events)
    logged = [r for r in caplog.records if "ends with an error event" in r.message]
    assert len(logged) == 1
    assert getattr(logged[0], "request_id", None)
    assert (logged[0].exc_info is not None) == (fault == "raise")


async def test_a_client_error_raised_mid_stream_is_the_error_event(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    path = "/openai/v1/chat/completions"
    events = await _events(fault_upstream, gateway, path, _body("client_error"))
    assert events[-1].data == "[DONE]"
    assert events[-2].json() == {
        "error": {
            "message": "Blocked by policy",
            "type": "invalid_request_error",
            "param": None,
            "code": "blocked",
        }
    }


@pytest.mark.parametrize("fault", ["raise", "stop"])
async def test_the_sdk_raises_on_the_chat_route(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, fault: str
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=0.005))
    server = await gateway(fault_upstream.url, middleware=CHAIN)
    base_url = str(server.make_url("/openai/v1"))
    texts: list[str] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"stage_fault": fault},
        )
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                texts.extend(c.delta.content or "" for c in chunk.choices)
    assert not isinstance(caught.value, openai.APIConnectionError)  # an error, not a cut
    assert "answer was cut short" in caught.value.message
    assert "".join(texts) == "".join(TOKENS[:1])  # the role chunk was one of the two items


async def test_responses_route_ends_in_response_failed(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    body = {"model": "deepseek-chat", "input": "hi", "stream": True, "stage_fault": "raise"}
    events = await _events(fault_upstream, gateway, "/v1/responses", {**body, "stage_after": 5})
    # Rising (the item the stage failed on, with its number, never reached the client).
    numbers = [e.json()["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    assert events[-1].event == "response.failed"
    assert events[-1].json()["response"]["status"] == "failed"
    assert sum(e.event in ("response.completed", "response.failed") for e in events) == 1


@pytest.mark.parametrize("fault", ["raise_at_end", "conn_at_end"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/openai/v1/chat/completions"])
async def test_a_failure_after_the_answer_ended_adds_nothing(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, path: str, fault: str
) -> None:
    # The sink held the answer's end when the stage failed: the answer goes out whole. A
    # stage's own `ConnectionError` ("conn_at_end") is not the client's going away.
    events = await _events(fault_upstream, gateway, path, _body(fault))
    if path == "/v1/chat/completions":
        assert spec_text(events) == "".join(TOKENS)
        assert events[-1].event == "response.completed"
    else:
        assert events[-1].data == "[DONE]"
        assert not any("error" in e.data for e in events)


async def test_a_failure_before_the_first_item_is_still_an_http_error(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=0.005))
    server = await gateway(fault_upstream.url, middleware=CHAIN)
    status, raw = await _post(server, "/v1/chat/completions", _body("raise", stage_after=0))
    assert status == 500
    assert b'"internal_error"' in raw


@pytest.mark.parametrize("fault", ["raise_last", "stop_last"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/openai/v1/chat/completions"])
async def test_an_end_a_stage_drops_is_still_an_error_event(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, fault: str, path: str
) -> None:
    events = await _events(fault_upstream, gateway, path, _body(fault))
    if path == "/v1/chat/completions":
        assert events[-1].event == "response.error"
        assert not any(e.event == "response.completed" for e in events)
    else:
        assert events[-1].data == "[DONE]"
        assert "error" in events[-2].json()
        assert sum(e.data == "[DONE]" for e in events) == 1


async def test_a_responses_end_a_stage_drops_is_an_error_event(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    body = {"model": "deepseek-chat", "input": "hi", "stream": True, "stage_fault": "raise_last"}
    events = await _events(fault_upstream, gateway, "/v1/responses", body)
    assert events[-1].event == "error"
    assert events[-1].json()["code"] == "blocked"
    numbers = [e.json()["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))


async def test_a_responses_stream_a_stage_cut_short_is_stored_as_failed(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=0.005))
    server = await gateway(fault_upstream.url, middleware=CHAIN)
    body = {"model": "deepseek-chat", "input": "hi", "stream": True, "stage_fault": "raise"}
    _, raw = await _post(server, "/v1/responses", {**body, "stage_after": 5})
    response_id = parse_events(raw)[0].json()["response"]["id"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url(f"/v1/responses/{response_id}")) as got,
    ):
        assert got.status == 200
        assert (await got.json())["status"] == "failed"


async def test_a_stage_that_recovers_from_an_early_failure_ends_as_it_says(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    fault_upstream.queue(sse_script([]))  # an SSE head, then the end: no chunk at all
    chain = {"chain": ["tests.test_stage_failures:Fallback", "auth", "retry", "reframe"]}
    server = await gateway(fault_upstream.url, middleware=chain)
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    status, raw = await _post(server, "/openai/v1/chat/completions", {**body, "stream": True})
    assert (status, raw) == (200, CANNED)


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\x00b", "esc\x1b", "del\x7f", 5])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_header_no_head_can_carry_is_a_json_500_not_a_broken_head(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, stream: bool, value: object
) -> None:
    # A per-key concurrency limit of one: the second request would be a 429 if the first
    # one's body (and with it the limit's slot) were left open.
    fault_upstream.default = sse_script(text_events(TOKENS))
    chain = ["tests.test_stage_failures:Faulty", "auth", "limits", "retry", "reframe"]
    server = await gateway(
        fault_upstream.url,
        middleware={"chain": chain},
        auth={"api_keys": ["sk-client-1"]},
        limits={"concurrent_streams": 1},
    )
    body = {**_body("bad_header"), "stream": stream, "stage_header": value}
    headers = {"Authorization": "Bearer sk-client-1"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(2):
            url = server.make_url("/v1/chat/completions")
            async with session.post(url, json=body) as response:
                assert response.status == 500
                assert "Injected" not in response.headers
                assert (await response.json())["error"]["code"] == "internal_error"
