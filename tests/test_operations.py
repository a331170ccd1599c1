"""Operations surface: /metrics, /readyz, downstream keep-alives, queue-wait accounting."""

from __future__ import annotations

import logging
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory, blackholed_port, free_port
from tests.fault_upstream import FaultUpstream, Head, Send, Sleep, sse_script, text_events
from tests.sse_client import parse_events, spec_text

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: aiohttp.ClientSession, url: object) -> Samples:
    async with client.get(url) as resp:  # type: ignore[arg-type]
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("ds2oai_"), family.name  # SPEC §6: every name
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a sample grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_count_requests_streams_attempts_tokens_and_ttft(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    server = await gateway(
        fault_upstream.url, models={"aliases": {"metrics-model": "deepseek-chat"}}
    )
    before = await scrape(client, server.make_url("/metrics"))
    async with client.post(
        server.make_url("/v1/chat/completions"),
        json={"messages": [], "stream": True, "model": "metrics-model"},
    ) as resp:
        await resp.read()
    after = await scrape(client, server.make_url("/metrics"))

    assert (
        delta(before, after, "ds2oai_requests_total", route="/v1/chat/completions", status="200")
        == 1
    )
    assert delta(before, after, "ds2oai_streams_total", dialect="spec", outcome="completed") == 1
    assert delta(before, after, "ds2oai_upstream_attempts_total", status="200") == 1
    assert delta(before, after, "ds2oai_tokens_total", model="metrics-model", direction="in") == 5
    assert delta(before, after, "ds2oai_tokens_total", model="metrics-model", direction="out") == 2
    assert delta(before, after, "ds2oai_time_to_first_token_seconds_count") == 1
    assert delta(before, after, "ds2oai_gateway_added_latency_seconds_count") == 1
    assert delta(before, after, "ds2oai_middleware_seconds_count", middleware="retry") == 1
    assert value(after, "ds2oai_streams_in_flight") == 0
    assert value(after, "ds2oai_process_resident_memory_bytes") > 0  # prefixed like the rest


@pytest.mark.parametrize("bad", [-10, "5", 5.5, True, None])
async def test_token_counts_that_are_not_counts_are_ignored(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    bad: object,
) -> None:
    # Valid JSON, but not a count: it must neither break /metrics nor undo other requests'.
    server = await gateway(fault_upstream.url)
    before = await scrape(client, server.make_url("/metrics"))
    fault_upstream.queue(sse_script(text_events(["a", "b"])))  # prompt_tokens 5
    usage = {"prompt_tokens": bad, "completion_tokens": 1, "total_tokens": 1}
    fault_upstream.queue(sse_script(text_events(["c"], usage=usage)))
    for _ in range(2):
        async with client.post(
            server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
        ) as resp:
            assert resp.status == 200
            await resp.read()
    after = await scrape(client, server.make_url("/metrics"))

    assert (
        delta(before, after, "ds2oai_requests_total", route="/v1/chat/completions", status="200")
        == 2
    )
    assert delta(before, after, "ds2oai_tokens_total", model="deepseek-chat", direction="in") == 5
    assert delta(before, after, "ds2oai_tokens_total", model="deepseek-chat", direction="out") == 3


async def test_made_up_model_names_do_not_become_metric_labels(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # Any string a client sends as `model` would otherwise be a new label value (memory that
    # grows without bound); unknown names are counted under the upstream model they went to.
    server = await gateway(fault_upstream.url)
    before = await scrape(client, server.make_url("/metrics"))
    for name in ("made-up-1", "made-up-2"):
        async with client.post(
            server.make_url("/v1/chat/completions"),
            json={"messages": [], "stream": True, "model": name},
        ) as resp:
            await resp.read()
    after = await scrape(client, server.make_url("/metrics"))
    assert not [key for key in after if ("model", "made-up-1") in key[1]]
    out = "ds2oai_tokens_total"
    labels = {"model": "deepseek-chat", "direction": "out"}
    assert delta(before, after, out, **labels) == 4


async def test_broken_stream_is_counted_by_outcome(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    from tests.fault_upstream import Close

    fault_upstream.queue(sse_script(text_events(["a", "b"])[:2], end=Close()))
    server = await gateway(fault_upstream.url)
    before = await scrape(client, server.make_url("/metrics"))
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        await resp.read()
    after = await scrape(client, server.make_url("/metrics"))
    key = {"dialect": "spec", "outcome": "upstream_broken"}
    assert delta(before, after, "ds2oai_streams_total", **key) == 1


async def test_queue_wait_is_measured_from_upstream_keepalives_to_first_chunk(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    events = text_events(["x"])
    fault_upstream.queue(
        (
            Head(),
            Send(b": keep-alive\n\n"),
            Sleep(0.3),
            Send(b": keep-alive\n\n"),
            Sleep(0.3),
            *[Send(e) for e in events],
        )
    )
    server = await gateway(fault_upstream.url)
    before = await scrape(client, server.make_url("/metrics"))
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        await resp.read()
    after = await scrape(client, server.make_url("/metrics"))
    count = "ds2oai_upstream_queue_wait_seconds_count"
    total = "ds2oai_upstream_queue_wait_seconds_sum"
    assert delta(before, after, count) == 1
    assert delta(before, after, total) >= 0.55


async def test_downstream_keepalive_comments_while_the_upstream_is_silent(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    fault_upstream.queue((Head(), Sleep(0.9), *[Send(e) for e in text_events(["a", "b"])]))
    server = await gateway(fault_upstream.url, server={"keepalive_interval": 0.2})
    started = time.monotonic()
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        first = await resp.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        raw = first + await resp.read()
    assert first == b": keep-alive\n\n"
    assert first_at < 0.6
    comments = raw.count(b": keep-alive\n\n")
    assert 2 <= comments <= 6
    events = parse_events(raw)
    assert spec_text(events) == "ab"
    assert events[-1].event == "response.completed"


async def test_upstream_comments_do_not_hold_back_downstream_keepalives(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    # DeepSeek keeps a queued request alive with comments of its own, more often than ours:
    # they reach the gateway but no client byte, so they must not reset our keep-alive clock.
    queued = [step for _ in range(12) for step in (Sleep(0.08), Send(b": keep-alive\n\n"))]
    fault_upstream.queue((Head(), *queued, *[Send(e) for e in text_events(["a", "b"])]))
    server = await gateway(fault_upstream.url, server={"keepalive_interval": 0.25})
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        raw = await resp.read()
    assert 2 <= raw.count(b": keep-alive\n\n") <= 5
    assert spec_text(parse_events(raw)) == "ab"


async def test_keepalives_stop_once_the_answer_started(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    events = text_events(["a", "b"])
    fault_upstream.queue(
        (Head(), Send(events[0]), Send(events[1]), Sleep(0.7), *[Send(e) for e in events[2:]])
    )
    server = await gateway(fault_upstream.url, server={"keepalive_interval": 0.2})
    async with client.post(
        server.make_url("/v1/chat/completions"), json={"messages": [], "stream": True}
    ) as resp:
        raw = await resp.read()
    assert b": keep-alive" not in raw
    assert spec_text(parse_events(raw)) == "ab"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("GET", "/openai/v1/models/deepseek-chat"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/responses/resp_none"),  # a 404 error body
    ],
)
async def test_every_answer_returns_the_request_id(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    method: str,
    path: str,
) -> None:
    server = await gateway(fault_upstream.url)
    body = {"messages": [], "stream": True} if method == "POST" else None
    given = {"X-Request-Id": "ops-rid-7"}
    async with client.request(method, server.make_url(path), json=body, headers=given) as resp:
        await resp.read()
        assert resp.headers["X-Request-Id"] == "ops-rid-7"
    async with client.request(method, server.make_url(path), json=body) as resp:
        await resp.read()
        assert len(resp.headers["X-Request-Id"]) == 32  # made when none came


async def test_readyz_reflects_upstream_reachability(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    up = await gateway(fault_upstream.url)
    async with client.get(up.make_url("/readyz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    down = await gateway(f"http://127.0.0.1:{free_port()}")
    async with client.get(down.make_url("/readyz")) as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "not_ready"
    async with client.get(down.make_url("/healthz")) as resp:
        assert resp.status == 200


async def test_readyz_gives_up_on_a_blackholed_upstream_within_two_seconds(
    gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    with blackholed_port() as port:
        server = await gateway(f"http://127.0.0.1:{port}", upstream={"connect_timeout": 10.0})
        started = time.monotonic()
        async with client.get(server.make_url("/readyz")) as resp:
            assert resp.status == 503
        assert time.monotonic() - started < 3.0


async def test_request_log_has_no_content_unless_configured(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_prompt = "my-private-prompt-8812"
    payload = {"messages": [{"role": "user", "content": secret_prompt}], "stream": True}
    for log_content in (False, True):
        server = await gateway(fault_upstream.url, logging={"log_content": log_content})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ds2oai.access"):
            async with client.post(server.make_url("/v1/chat/completions"), json=payload) as r:
                await r.read()
        (line,) = [rec for rec in caplog.records if rec.getMessage() == "request"]
        assert (secret_prompt in str(vars(line))) is log_content
        assert line.__dict__["request_id"]
        assert line.__dict__["outcome"] == "completed"
