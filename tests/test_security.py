"""Secrets stay secret; the client cannot steer the upstream (SSRF) or its headers."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.fault_upstream import Close, FaultUpstream, json_response, sse_script, text_events

UPSTREAM_KEY = "sk-upstream-PLANTED-93be1c"
CLIENT_KEY = "client-PLANTED-4471aa"


async def test_planted_keys_never_reach_responses_metrics_or_logs(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaky = f"Authentication Fails, Your api key: {UPSTREAM_KEY} is invalid"
    fault_upstream.queue(
        json_response(401, {"error": {"message": leaky}}),
        json_response(400, {"error": {"message": f"bad {UPSTREAM_KEY}", "code": "x"}}),
        json_response(500, {"error": {"message": f"boom Bearer {UPSTREAM_KEY}"}}),
        json_response(500, {"error": {"message": f"boom Bearer {UPSTREAM_KEY}"}}),
        json_response(500, {"error": {"message": f"boom Bearer {UPSTREAM_KEY}"}}),
        sse_script(
            [
                *text_events(["a"])[:2],
                f'data: {{"error": {{"message": "{UPSTREAM_KEY}"}}}}\n\n'.encode(),
            ]
        ),
        sse_script(text_events(["a"])[:2], end=Close()),
    )
    server = await gateway(
        fault_upstream.url, api_key=UPSTREAM_KEY, auth={"api_keys": [CLIENT_KEY]}
    )
    url = server.make_url("/v1/chat/completions")
    seen = b""
    with caplog.at_level(logging.DEBUG):
        for headers in ({"Authorization": f"Bearer {CLIENT_KEY}"},) * 5 + (
            {"Authorization": "Bearer wrong"},
            {},
        ):
            async with client.post(
                url, json={"messages": [], "stream": True}, headers=headers
            ) as resp:
                seen += await resp.read() + str(dict(resp.headers)).encode()
        async with client.get(server.make_url("/metrics")) as resp:
            seen += await resp.read()
    logged = "\n".join(str(vars(record)) for record in caplog.records)
    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert secret.encode() not in seen
        assert secret not in logged
    assert b"[redacted]" in seen  # the upstream's messages were kept, the key removed


async def test_the_client_cannot_steer_the_upstream_url_or_headers(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(fault_upstream.url, api_key="sk-gw")
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={
            "messages": [],
            "stream": True,
            "upstream_url": "http://169.254.169.254/latest",
            "base_url": "http://169.254.169.254",
        },
        headers={
            "Host": "169.254.169.254",
            "X-Forwarded-Host": "169.254.169.254",
            "X-Forwarded-For": "10.0.0.1",
            "Authorization": "Bearer client-secret",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Cookie": "session=abc",
            "TE": "trailers",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Upgrade": "websocket",
        },
    ) as resp:
        assert resp.status == 200
        await resp.read()
    (request,) = fault_upstream.requests  # the request went to the configured upstream
    assert request.path == "/v1/chat/completions"
    sent = request.headers
    assert sent["authorization"] == "Bearer sk-gw"
    for header in (
        "proxy-authorization",
        "cookie",
        "te",
        "x-hop",
        "upgrade",
        "x-forwarded-host",
        "x-forwarded-for",
    ):
        assert header not in sent
    assert sent["host"].startswith("127.0.0.1")


async def test_models_and_stored_responses_need_a_key_and_stay_with_it(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url,
        auth={
            "api_keys": ["key-a"],
            "clients": {"team": {"key": "key-b", "models": ["deepseek-chat"]}},
        },
    )
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    async with client.get(server.make_url("/v1/models")) as resp:
        assert resp.status == 401
    async with client.get(server.make_url("/v1/models"), headers=b) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["deepseek-chat"]
    async with client.get(server.make_url("/v1/models/deepseek-chat")) as resp:
        assert resp.status == 401
    async with client.get(server.make_url("/v1/models/deepseek-chat"), headers=b) as resp:
        assert (await resp.json())["id"] == "deepseek-chat"
    async with client.get(server.make_url("/v1/models/deepseek-reasoner"), headers=a) as resp:
        assert (await resp.json())["id"] == "deepseek-reasoner"
    async with client.get(server.make_url("/v1/models/deepseek-reasoner"), headers=b) as resp:
        assert resp.status == 404  # not this key's: as if it did not exist
        assert (await resp.json())["error"]["code"] == "model_not_found"
    async with client.post(
        server.make_url("/v1/responses"), json={"input": "hi"}, headers=a
    ) as resp:
        assert resp.status == 200
        response_id = (await resp.json())["id"]
    url = server.make_url(f"/v1/responses/{response_id}")
    async with client.get(url, headers=a) as resp:
        assert resp.status == 200
    async with client.get(url) as resp:
        assert resp.status == 401
    for method in ("GET", "DELETE"):
        async with client.request(method, url, headers=b) as resp:
            assert resp.status == 404  # another key: as if it did not exist
    async with client.get(
        server.make_url(f"/v1/responses/{response_id}/input_items"), headers=b
    ) as resp:
        assert resp.status == 404
    async with client.post(
        server.make_url("/v1/responses"),
        json={"input": "more", "previous_response_id": response_id},
        headers=b,
    ) as resp:
        assert resp.status == 400
    async with client.delete(url, headers=a) as resp:
        assert resp.status == 200


PLAIN_KEY = "plainTokenNotKeyLike42"  # nothing key-like about it: only the gateway knows


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/openai/v1/chat/completions", "/openai/v1/responses"]
)
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("status", [400, 422])
async def test_an_upstream_echoing_the_key_in_its_error_code_leaks_nothing(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    path: str,
    stream: bool,
    status: int,
) -> None:
    code = f"c\x1b[2J\r\nInjected: {PLAIN_KEY} " + "x" * 3000
    fault_upstream.queue(json_response(status, {"error": {"message": PLAIN_KEY, "code": code}}))
    server = await gateway(fault_upstream.url, api_key=PLAIN_KEY)
    body = {"messages": [{"role": "user", "content": "hi"}], "input": "hi", "stream": stream}
    async with client.post(server.make_url(path), json=body) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert PLAIN_KEY not in str(error)
    assert len(error["code"]) <= 100
    assert "\x1b" not in error["code"]
    assert "\n" not in error["code"]


async def test_a_non_string_error_code_is_no_code(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    nested = {"nested": PLAIN_KEY}
    fault_upstream.queue(json_response(400, {"error": {"message": "bad", "code": nested}}))
    server = await gateway(fault_upstream.url, api_key=PLAIN_KEY)
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_request_error"
    assert PLAIN_KEY not in str(error)
