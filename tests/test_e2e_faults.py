"""End to end over real sockets against the fault-injecting upstream: every row of SPEC §4."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import GatewayFactory, blackholed_port, free_port
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
    chunk,
    json_response,
    sse_script,
    text_events,
)
from tests.sse_client import Event, read_events, spec_text
from tests.test_operations import delta, scrape

TOKENS = ["Hé", "llo", " wörld", " €", " 😀", "!"]
TEXT = "".join(TOKENS)
BROKEN = {
    "type": "upstream_stream_broken",
    "message": "Upstream SSE connection closed unexpectedly",
}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


async def stream(
    client: aiohttp.ClientSession, url: Any, payload: dict[str, Any] | None = None
) -> tuple[int, list[Event]]:
    async with client.post(url, json=payload or body(stream=True)) as resp:
        assert resp.status == 200, await resp.text()
        return resp.status, await read_events(resp)


async def error_of(
    client: aiohttp.ClientSession, url: Any, payload: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with client.post(url, json=payload or body(stream=True)) as resp:
        assert resp.content_type == "application/json"
        obj = await resp.json()
        return resp.status, obj["error"], resp


# ----------------------------------------------------------------------- streams that succeed


@pytest.mark.parametrize(
    ("name", "script"),
    [
        ("one_byte_writes", sse_script(text_events(TOKENS), split=1)),
        ("packed_in_one_write", (Head(), Send(b"".join(text_events(TOKENS))), End())),
        (
            "crlf_line_ends",
            sse_script([e.replace(b"\n", b"\r\n") for e in text_events(TOKENS)], split=7),
        ),
        ("cr_line_ends", sse_script([e.replace(b"\n", b"\r") for e in text_events(TOKENS)])),
        (
            "keepalive_comments",
            sse_script(
                [b": keep-alive\n\n"] * 3
                + [x for e in text_events(TOKENS) for x in (e, b": keep-alive\n\n")]
            ),
        ),
        ("no_done_clean_end", sse_script(text_events(TOKENS, done=False))),
    ],
)
async def test_stream_arrives_exact_whatever_the_framing(
    name: str,
    script: Any,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    fault_upstream.queue(script)
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == TEXT
    assert events[-1].event == "response.completed"
    assert events[-1].json()["usage"]["completion_tokens"] == len(TOKENS)


@pytest.mark.parametrize("delay", [0.0, 0.02])  # one read, and paced (the byte path)
async def test_an_empty_finish_reason_on_every_chunk_is_no_finish(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    delay: float,
) -> None:
    events = [
        chunk("", role="assistant", finish_reason=""),
        *[chunk(token, finish_reason="") for token in TOKENS],
        chunk("", finish_reason="stop"),
        DONE,
    ]
    fault_upstream.queue(sse_script(events, delay=delay))
    server = await gateway(fault_upstream.url)
    _, got = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(got) == TEXT
    assert got[-1].event == "response.completed"
    assert json.loads(got[-1].data)["finish_reason"] == "stop"


async def test_one_mebibyte_content_chunk_passes_whole(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    big = "x" * (1024 * 1024)
    fault_upstream.queue(sse_script(text_events(["a", big, "b"])))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == "a" + big + "b"
    assert events[-1].event == "response.completed"


async def test_request_is_passed_upstream_with_mapped_model_and_gateway_key(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url,
        api_key="sk-upstream-SECRET-0001",
        models={"aliases": {"gpt-4o": "deepseek-reasoner"}},
    )
    payload = body(
        model="gpt-4o",
        stream=True,
        temperature=0.2,
        tools=[{"type": "function", "function": {"name": "f"}}],
        stream_options={"include_usage": True},
        test_mode="normal",
        some_future_field={"x": 1},
    )
    headers = {"Authorization": "Bearer client-key-should-not-pass", "X-Custom": "1"}
    async with client.post(
        server.make_url("/v1/chat/completions"), json=payload, headers=headers
    ) as resp:
        events = await read_events(resp)
    assert events[0].json()["model"] == "gpt-4o"
    (request,) = fault_upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-upstream-SECRET-0001"
    assert "x-custom" not in request.headers
    sent = request.json
    assert sent["model"] == "deepseek-reasoner"
    assert sent["stream"] is True
    for key in ("temperature", "tools", "stream_options", "test_mode", "some_future_field"):
        assert sent[key] == payload[key]
    assert sent["messages"] == payload["messages"]


async def test_unknown_model_goes_to_the_default(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url)
    _, events = await stream(
        client, server.make_url("/v1/chat/completions"), body(model="gpt-9", stream=True)
    )
    assert fault_upstream.requests[0].json["model"] == "deepseek-chat"
    assert events[0].json()["model"] == "gpt-9"


# ------------------------------------------------------------- after the first byte: SSE errors


@pytest.mark.parametrize(
    ("name", "end"),
    [("truncated_chunked_body", Close()), ("tcp_reset", Reset()), ("clean_end_no_finish", End())],
)
async def test_break_after_first_byte_is_a_final_broken_event(
    name: str,
    end: Any,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    events_up = text_events(TOKENS)[:4]  # role + 3 tokens, no finish
    fault_upstream.queue(sse_script(events_up, end=end))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == "".join(TOKENS[:3])
    assert events[-1].event == "response.error"
    assert events[-1].json() == BROKEN
    assert [e.event for e in events].count("response.error") == 1


async def test_done_without_finish_reason_is_not_a_success(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script([*text_events(TOKENS)[:3], DONE]))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert events[-1].json() == BROKEN


async def test_silence_longer_than_read_timeout_ends_with_timeout_event(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS)[:3], end=Hang()))
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.5})
    started = time.monotonic()
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert time.monotonic() - started < 4
    last = events[-1]
    assert last.event == "response.error"
    assert last.json()["type"] == "upstream_stream_broken"
    assert "timed out" in last.json()["message"]
    await fault_upstream.wait_client_disconnect()  # the gateway dropped the stalled upstream


async def test_keepalive_comments_count_as_liveness_not_as_progress(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    keepalives: list[Any] = []
    for _ in range(4):
        keepalives += [Sleep(0.3), Send(b": keep-alive\n\n")]
    fault_upstream.queue((Head(), *keepalives, *[Send(e) for e in text_events(TOKENS)], End()))
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.6})
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == TEXT


async def test_upstream_error_event_mid_stream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    err = b'data: {"error": {"code": "overloaded", "message": "try later"}}\n\n'
    fault_upstream.queue(sse_script([*text_events(TOKENS)[:2], err]))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert events[-1].json() == {
        "type": "upstream_error",
        "code": "overloaded",
        "message": "try later",
    }


async def test_usage_from_a_later_choices_less_chunk(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events_up = [
        *text_events(["a", "b"], usage=None, done=False),
        chunk(choices=False, usage=usage),
        DONE,
    ]
    fault_upstream.queue(sse_script(events_up))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert events[-1].json()["usage"] == usage


async def test_missing_usage_is_null(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script(text_events(["a"], usage=None)))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert events[-1].json()["usage"] is None


async def test_odd_chunks_never_crash(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    odd = [
        chunk("", role="assistant"),
        b'data: {"id": "up-1", "choices": []}\n\n',
        b'data: {"id": "up-1"}\n\n',
        b'data: {"id": "up-1", "choices": [{"index": 0, "delta": {"content": null}}]}\n\n',
        b'data: {"id": "up-1", "choices": [{"index": 0, "delta": {"content": "ok"}}], "x": 1}\n\n',
        b"data: [1, 2]\n\n",
        b'data: "text"\n\n',
        chunk("", finish_reason="stop"),
        DONE,
    ]
    fault_upstream.queue(sse_script(odd))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == "ok"
    assert events[-1].event == "response.completed"


# ------------------------------------------------------- before the first byte: HTTP errors


async def test_connection_refused_is_502_connect_failed(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(f"http://127.0.0.1:{free_port()}", retry={"max_retries": 1})
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 502
    assert error["type"] == "upstream_connection_error"
    assert error["code"] == "connect_failed"


async def test_no_connection_within_connect_timeout_is_504_upstream_timeout(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    with blackholed_port() as port:
        server = await gateway(
            f"http://127.0.0.1:{port}",
            upstream={"connect_timeout": 0.3},
            retry={"max_retries": 1},
        )
        started = time.monotonic()
        status, error, resp = await error_of(client, server.make_url("/v1/chat/completions"))
        elapsed = time.monotonic() - started
    assert (status, error["type"], error["code"]) == (
        504,
        "upstream_connection_error",
        "upstream_timeout",
    )
    assert "0.3 s" in error["message"]
    assert resp.headers["x-should-retry"] == "false"  # the gateway tried twice itself
    assert 0.6 <= elapsed < 3.0  # two attempts of 0.3 s, and no hang


async def test_reset_before_response_is_502_connect_failed(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue((Reset(),), (Reset(),), (Reset(),))
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["code"]) == (502, "connect_failed")
    assert len(fault_upstream.requests) == 3  # 1 + max_retries (2)


async def test_break_before_any_event_is_an_http_error_not_a_stream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script([b": keep-alive\n\n"], end=Close()))
    server = await gateway(fault_upstream.url)
    before = await scrape(client, server.make_url("/metrics"))
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 502
    assert error["type"] == "upstream_connection_error"
    assert error["code"] == "upstream_stream_broken"
    after = await scrape(client, server.make_url("/metrics"))
    streams = "ds2oai_streams_total"
    assert delta(before, after, streams, dialect="spec", outcome="upstream_broken") == 1


async def test_no_headers_within_read_timeout_is_504(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue((Hang(),))
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.4})
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 504
    assert (error["type"], error["code"]) == ("upstream_connection_error", "upstream_timeout")


async def test_a_head_trickled_in_line_by_line_still_ends_at_the_read_timeout(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # Each header line comes well within the read timeout, the whole head never does.
    trickle: list[Send | Sleep] = [Send(b"HTTP/1.1 200 OK\r\n")]
    for _ in range(40):
        trickle += [Sleep(0.1), Send(b"X-Slow: 1\r\n")]
    fault_upstream.queue(tuple(trickle))
    server = await gateway(fault_upstream.url, upstream={"read_timeout": 0.5})
    started = time.monotonic()
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["code"]) == (504, "upstream_timeout")
    assert time.monotonic() - started < 2.0  # not the trickle's 4 s


async def test_non_json_5xx_after_retries_is_502_with_status_code(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    html = (Head(503, (("Content-Type", "text/html"),), chunked=False), Send(b"<h1>down</h1>"))
    fault_upstream.queue(html, html, html)
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 502
    assert error["code"] == "upstream_status_503"
    assert error["message"] == "<h1>down</h1>"
    assert len(fault_upstream.requests) == 3


async def test_200_that_is_not_sse_is_502(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(
        (Head(200, (("Content-Type", "text/plain"),), chunked=False), Send(b"hello"))
    )
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["code"]) == (502, "upstream_status_200")


async def test_5xx_then_ok_is_retried_transparently(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(json_response(500, {"error": {"message": "boom"}}))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(events) == "Hello world"
    assert len(fault_upstream.requests) == 2


@pytest.mark.parametrize(("gateway_retries", "sdk_requests"), [(1, 1), (0, 2)])
@pytest.mark.parametrize(
    ("status", "raised"), [(500, openai.InternalServerError), (429, openai.RateLimitError)]
)
async def test_the_openai_sdk_does_not_retry_what_the_gateway_already_retried(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    gateway_retries: int,
    sdk_requests: int,
    status: int,
    raised: type[openai.APIStatusError],
) -> None:
    # Without `x-should-retry: false` the SDK's retries would multiply the gateway's: with
    # both at their defaults (2), one call made 9 upstream attempts.
    hint = [("retry-after-ms", "20")]
    fault_upstream.queue(*[json_response(status, {"error": {"message": "boom"}}, hint)] * 4)
    server = await gateway(fault_upstream.url, retry={"max_retries": gateway_retries})
    base_url = str(server.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=1) as sdk:
        with pytest.raises(raised) as caught:
            await sdk.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.code == ("upstream_status_500" if status == 500 else "rate_limit")
    assert len(fault_upstream.requests) == sdk_requests * (gateway_retries + 1)


async def test_429_with_retry_after_is_honoured_then_succeeds(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(json_response(429, {"error": {"message": "slow"}}, [("Retry-After", "1")]))
    server = await gateway(fault_upstream.url)
    _, events = await stream(client, server.make_url("/v1/chat/completions"))
    assert events[-1].event == "response.completed"
    first, second = fault_upstream.requests
    assert second.received_at - first.received_at >= 0.95


async def test_429_with_long_retry_after_is_passed_on_without_waiting(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(json_response(429, {"error": {"message": "slow"}}, [("Retry-After", "7")]))
    server = await gateway(fault_upstream.url, retry={"retry_after_cap": 2.0})
    started = time.monotonic()
    status, error, resp = await error_of(client, server.make_url("/v1/chat/completions"))
    assert time.monotonic() - started < 1.5
    assert status == 429
    assert resp.headers["Retry-After"] == "7"
    assert (error["type"], error["code"], error["message"]) == (
        "rate_limit_error",
        "rate_limit",
        "slow",
    )


async def test_429_without_retry_after_gets_a_computed_one_after_retries(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    r429 = json_response(429, {"error": {"message": "busy"}})
    fault_upstream.queue(r429, r429, r429)
    server = await gateway(fault_upstream.url, rate_limit={"default_retry_after": 2.0})
    status, _, resp = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 429
    assert resp.headers["Retry-After"] == "2"
    assert len(fault_upstream.requests) == 3


@pytest.mark.parametrize("upstream_status", [401, 403])
async def test_upstream_auth_failure_is_502_and_never_reveals_the_key(
    upstream_status: int,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    message = "Authentication Fails, Your api key: sk-upstream-SECRET-0001 is invalid"
    fault_upstream.queue(json_response(upstream_status, {"error": {"message": message}}))
    server = await gateway(fault_upstream.url, api_key="sk-upstream-SECRET-0001")
    async with client.post(server.make_url("/v1/chat/completions"), json=body(stream=True)) as r:
        raw = await r.read()
        assert r.status == 502
    assert b"SECRET" not in raw
    assert b"sk-" not in raw
    error = (await r.json())["error"]
    assert (error["type"], error["code"]) == ("upstream_connection_error", "upstream_auth")
    assert len(fault_upstream.requests) == 1


async def test_upstream_402_is_insufficient_quota(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(json_response(402, {"error": {"message": "Insufficient Balance"}}))
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 402
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_balance")
    assert len(fault_upstream.requests) == 1


@pytest.mark.parametrize("upstream_status", [400, 422])
async def test_upstream_client_errors_keep_status_code_and_message(
    upstream_status: int,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    upstream_error = {"message": "bad temperature", "code": "invalid_temperature"}
    fault_upstream.queue(json_response(upstream_status, {"error": upstream_error}))
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == upstream_status
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["message"]) == ("invalid_temperature", "bad temperature")
    assert len(fault_upstream.requests) == 1


async def test_upstream_error_event_before_any_output_is_502(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script([b'data: {"error": {"code": "x1", "message": "nope"}}\n\n']))
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert status == 502
    assert (error["code"], error["message"]) == ("x1", "nope")


# ------------------------------------------------------------------------- client behaviour


async def test_client_disconnect_closes_the_upstream_connection_at_once(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(sse_script(text_events(TOKENS)[:2], end=Hang()))
    server = await gateway(fault_upstream.url)
    resp = await client.post(server.make_url("/v1/chat/completions"), json=body(stream=True))
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the stream has started
    resp.close()  # the client goes away while the upstream is silent
    started = time.monotonic()
    await fault_upstream.wait_client_disconnect(timeout=3)
    assert time.monotonic() - started < 2


async def test_client_disconnect_while_waiting_for_upstream_headers(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue((Hang(),))
    server = await gateway(fault_upstream.url)
    task = asyncio.create_task(
        client.post(server.make_url("/v1/chat/completions"), json=body(stream=True))
    )
    await fault_upstream.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fault_upstream.wait_client_disconnect(timeout=3)


async def test_client_disconnect_before_an_unlabelled_body_starts(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # No content type: the gateway waits for the first bytes to tell SSE from JSON.
    fault_upstream.queue((Head(200, ()), Hang()))
    server = await gateway(fault_upstream.url)
    task = asyncio.create_task(
        client.post(server.make_url("/v1/chat/completions"), json=body(stream=True))
    )
    await fault_upstream.wait_requests(1)
    await asyncio.sleep(0.1)  # the head is in; the body is not
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    await fault_upstream.wait_client_disconnect(timeout=3)
    assert time.monotonic() - started < 2


async def test_slow_client_backpressures_the_upstream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    token = "y" * 16 * 1024
    n = 2000  # ~32 MiB of content
    fault_upstream.queue(sse_script(text_events([token] * n)))
    server = await gateway(fault_upstream.url)
    resp = await client.post(server.make_url("/v1/chat/completions"), json=body(stream=True))
    await resp.content.readuntil(b"\n\n")
    await asyncio.sleep(0.5)  # the client stops reading; buffers fill up along the path
    # If the gateway buffered without bound, the upstream would have sent everything by now.
    assert not fault_upstream_done(fault_upstream)
    received = 0
    async for data in resp.content.iter_any():
        received += len(data)
    resp.close()
    assert received > n * len(token)


def fault_upstream_done(upstream: FaultUpstream) -> bool:
    return upstream.connections_open == 0


async def test_concurrent_streams_over_fault_upstream_are_exact(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.default = sse_script(text_events(TOKENS), split=3)
    server = await gateway(fault_upstream.url)
    url = server.make_url("/v1/chat/completions")

    async def one() -> str:
        _, events = await stream(client, url)
        return spec_text(events)

    assert await asyncio.gather(*(one() for _ in range(100))) == [TEXT] * 100


async def test_dns_failure_is_502_connect_failed(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway("http://no-such-upstream.invalid", retry={"max_retries": 0})
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["type"], error["code"]) == (
        502,
        "upstream_connection_error",
        "connect_failed",
    )


async def test_tls_failure_is_502_connect_failed(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # https:// to a plain-HTTP server: the TLS handshake fails
    server = await gateway(
        fault_upstream.url.replace("http://", "https://"), retry={"max_retries": 0}
    )
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["type"], error["code"]) == (
        502,
        "upstream_connection_error",
        "connect_failed",
    )


async def test_sse_without_a_content_type_is_still_read_as_sse(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    events = b"".join(text_events(TOKENS))
    fault_upstream.queue((Head(200, ()), Send(events), End()))
    server = await gateway(fault_upstream.url)
    _, got = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(got) == TEXT
    assert got[-1].event == "response.completed"


async def test_a_whole_json_completion_from_the_upstream_is_replayed_as_a_stream(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    completion = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "deepseek-chat",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    }
    fault_upstream.queue(json_response(200, completion), json_response(200, completion))
    server = await gateway(fault_upstream.url)
    _, got = await stream(client, server.make_url("/v1/chat/completions"))
    assert spec_text(got) == TEXT
    assert got[-1].json()["usage"]["total_tokens"] == 9
    async with client.post(
        server.make_url("/v1/chat/completions"), json=body(stream=False)
    ) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == TEXT


async def test_a_json_error_with_status_200_is_a_502(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue(json_response(200, {"error": {"code": "busy", "message": "try later"}}))
    server = await gateway(fault_upstream.url)
    status, error, _ = await error_of(client, server.make_url("/v1/chat/completions"))
    assert (status, error["code"], error["message"]) == (502, "busy", "try later")
