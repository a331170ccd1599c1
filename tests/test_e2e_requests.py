"""Client input checks and client auth, end to end (SPEC §4, first rows)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from ds2oai.server import _client_headers
from tests.conftest import GatewayFactory
from tests.fault_upstream import DONE, FaultUpstream, chunk, sse_script
from tests.sse_client import read_events, spec_text


async def post_raw(
    client: aiohttp.ClientSession,
    url: Any,
    data: bytes,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with client.post(url, data=data, headers=headers or {}) as resp:
        assert resp.content_type == "application/json"
        return resp.status, (await resp.json())["error"]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'{"model": "deepseek-chat"}', "missing_messages"),
        (b'{"messages": "hi"}', "invalid_messages"),
        (b'{"messages": [], "stream": "yes"}', "invalid_stream"),
        (b'{"messages": [], "model": 5}', "invalid_model"),
        (b'{"messages": [], "n": 2}', "unsupported_n"),
        (b'{"messages": [], "n": "1"}', "unsupported_n"),
    ],
)
async def test_bad_bodies_are_400_naming_the_check(
    data: bytes,
    code: str,
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    server = await gateway(fault_upstream.url)
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), data)
    assert (status, error["type"], error["code"]) == (400, "invalid_request_error", code)
    assert fault_upstream.requests == []


async def test_body_over_the_limit_is_413(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url, server={"max_body_bytes": 2048})
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), big)
    assert (status, error["code"]) == (413, "body_too_large")


async def test_chunked_body_over_the_limit_is_413(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url, server={"max_body_bytes": 2048})

    async def gen() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    async with client.post(server.make_url("/v1/chat/completions"), data=gen()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_wrong_method_is_405_json(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url)
    async with client.get(server.make_url("/v1/chat/completions")) as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")


async def test_unknown_route_is_404_json(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url)
    async with client.post(server.make_url("/v2/nothing"), json={}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}],
)
async def test_missing_or_wrong_client_key_is_401(
    headers: dict[str, str],
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    server = await gateway(fault_upstream.url, auth={"api_keys": ["k-one", "k-two"]})
    data = b'{"messages": [], "stream": true}'
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), data, headers)
    assert (status, error["type"], error["code"]) == (
        401,
        "authentication_error",
        "invalid_api_key",
    )
    assert "k-one" not in error["message"]
    assert fault_upstream.requests == []


async def test_right_client_key_passes_and_is_not_forwarded(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url, api_key="sk-gateway", auth={"api_keys": ["k-one", "k-two"]}
    )
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={"messages": [], "stream": True},
        headers={"Authorization": "Bearer k-two"},
    ) as resp:
        assert resp.status == 200
        assert spec_text(await read_events(resp)) == "Hello world"
    assert fault_upstream.requests[0].headers["authorization"] == "Bearer sk-gateway"


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({"max_completion_tokens": 64}, {"max_tokens": 64}),
        ({"max_completion_tokens": 64, "max_tokens": 32}, {"max_tokens": 32}),
        ({"max_completion_tokens": None}, {}),
        ({"max_tokens": 16, "temperature": 0.2}, {"max_tokens": 16, "temperature": 0.2}),
    ],
)
async def test_max_completion_tokens_reaches_deepseek_as_max_tokens(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    fields: dict[str, Any],
    sent: dict[str, Any],
) -> None:
    server = await gateway(fault_upstream.url)
    body = {"messages": [], "stream": True, **fields}
    async with client.post(server.make_url("/openai/v1/chat/completions"), json=body) as resp:
        assert resp.status == 200
        await resp.read()
    upstream = fault_upstream.requests[0].json
    assert "max_completion_tokens" not in upstream
    assert {k: upstream[k] for k in ("max_tokens", "temperature") if k in upstream} == sent


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema", "json_schema": "City"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "City", "schema": []}},
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_a_malformed_json_schema_response_format_is_400(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    response_format: dict[str, Any],
    param: str,
) -> None:
    server = await gateway(fault_upstream.url)
    data = json.dumps({"messages": [], "response_format": response_format}).encode()
    status, error = await post_raw(client, server.make_url("/openai/v1/chat/completions"), data)
    assert (status, error["code"], error["param"]) == (400, "invalid_response_format", param)
    assert fault_upstream.requests == []


@pytest.mark.parametrize(
    ("route", "fields"),
    [
        ("/openai/v1/chat/completions", {"stream": False, "n": 1}),
        ("/openai/v1/chat/completions", {"stream": True}),
        ("/v1/chat/completions", {"stream": True, "stream_options": {"x_extra": 1}}),
    ],
)
async def test_every_chat_request_asks_the_upstream_for_usage(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    route: str,
    fields: dict[str, Any],
) -> None:
    # An upstream may send usage only when asked; a collected answer, metrics and token
    # limits need it whatever the client asked.
    server = await gateway(fault_upstream.url)
    async with client.post(server.make_url(route), json={"messages": [], **fields}) as resp:
        assert resp.status == 200
        await resp.read()
    options = fault_upstream.requests[0].json["stream_options"]
    assert options == {**fields.get("stream_options", {}), "include_usage": True}


@pytest.mark.parametrize(
    "encoding",
    ["gzip", "x-foo", "compress", "gzip, br", "x-gzip", ["gzip", "snappy"], "gzip, gzip"],
)
async def test_a_body_that_is_not_what_its_content_encoding_says_is_400(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    encoding: str | list[str],
) -> None:
    # A plain body labelled gzip, or labelled with an encoding (or two header lines of them)
    # the gateway cannot undo.
    server = await gateway(fault_upstream.url)
    data = b'{"messages": [], "stream": true}'
    lines = [encoding] if isinstance(encoding, str) else encoding
    headers = CIMultiDict([("Content-Type", "application/json")])
    for line in lines:
        headers.add("Content-Encoding", line)
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), data, headers)
    assert (status, error["code"]) == (400, "invalid_body_encoding")
    assert fault_upstream.requests == []


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
async def test_a_compressed_body_is_inflated(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    coding: str,
) -> None:
    server = await gateway(fault_upstream.url)
    body = {"messages": [{"role": "user", "content": "hé " * 1000}], "stream": True}
    plain = json.dumps(body).encode()
    packed = zlib.compress(plain) if coding == "deflate" else gzip.compress(plain)
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    async with client.post(
        server.make_url("/v1/chat/completions"), data=packed, headers=headers
    ) as r:
        assert r.status == 200
        assert spec_text(await read_events(r)) == "Hello world"
    assert fault_upstream.requests[0].json["messages"] == body["messages"]


async def test_a_compression_bomb_is_413_without_inflating_it(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # 64 KiB on the wire, 64 MiB inflated: refused at the limit (1 MiB here), not after
    # inflating all of it; and without a key, refused before the body is even read.
    server = await gateway(
        fault_upstream.url, server={"max_body_bytes": 1 << 20}, auth={"api_keys": ["k"]}
    )
    packer = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    packed = b"".join(packer.compress(block) for _ in range(64)) + packer.flush()
    assert len(packed) < 1 << 17
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), packed, headers)
    assert (status, error["code"]) == (401, "invalid_api_key")
    headers["Authorization"] = "Bearer k"
    status, error = await post_raw(client, server.make_url("/v1/chat/completions"), packed, headers)
    assert (status, error["code"]) == (413, "body_too_large")
    assert "once decoded" in error["message"]
    assert fault_upstream.requests == []


@pytest.mark.parametrize("coding", ["br", "zstd"])
async def test_encodings_the_gateway_cannot_undo_get_its_json_400(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    coding: str,
) -> None:
    server = await gateway(fault_upstream.url)
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    status, error = await post_raw(
        client, server.make_url("/openai/v1/chat/completions"), b"\x0b\x03\x80", headers
    )
    assert (status, error["code"]) == (400, "invalid_body_encoding")


@pytest.mark.parametrize(("depth", "status"), [(128, 200), (129, 400), (5000, 400)])
async def test_nesting_is_limited_to_128_levels(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, depth: int, status: int
) -> None:
    fault_upstream.queue(
        sse_script([chunk("ok", role="assistant"), chunk("", finish_reason="stop"), DONE])
    )
    server = await gateway(fault_upstream.url)
    # The body itself is level 1 and `messages` level 2: `x` holds the rest.
    nested = b"[" * (depth - 1) + b"]" * (depth - 1)
    body = b'{"messages": [{"role": "user", "content": "hi"}], "stream": false, "x": %s}' % nested
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/openai/v1/chat/completions"), data=body) as response,
    ):
        assert response.status == status
        if status == 400:
            assert (await response.json())["error"]["code"] == "too_deeply_nested"


def test_headers_named_in_connection_are_not_passed_to_stages() -> None:
    request = make_mocked_request(
        "POST",
        "/v1/chat/completions",
        headers=CIMultiDict(
            [
                ("Connection", "keep-alive, X-Hop"),
                ("Connection", "X-Other"),
                ("X-Hop", "1"),
                ("X-Other", "3"),
                ("X-Kept", "2"),
                ("Cookie", "c"),
            ]
        ),
    )
    assert _client_headers(request) == {"x-kept": "2"}


async def test_an_error_that_says_close_closes_the_connection(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    # A pipelined second request on the same connection gets no answer: the first one's body
    # was never read, so nothing after it on that connection can be trusted.
    server = await gateway(fault_upstream.url)
    body = b'{"messages": [], "stream": true}'
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: snappy\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" % (len(body), body)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # to the end of the connection
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.count(b"HTTP/1.1 ") == 1
