"""Several upstreams: weighted choice, failover before the first byte, circuit breakers,
and the retry budget — two fault-injecting upstreams, one of them failing."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp

from ds2oai.balancer import BreakerState
from ds2oai.config import config_from_mapping
from ds2oai.server import UPSTREAM, create_app
from tests.conftest import free_port
from tests.fault_upstream import FaultUpstream, Hang, json_response, sse_script, text_events
from tests.sse_client import parse_events, spec_text
from tests.test_operations import delta, scrape

PAYLOAD = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


def pool_config(targets: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstream": {"read_timeout": 5.0, "connect_timeout": 1.0},
        "retry": {"base_delay": 0.0, "max_delay": 0.0, "max_retries": 0},
        "store": {"backend": "memory"},
        "pool": targets,
        **sections,
    }


async def run(server: Any, n: int) -> list[tuple[int, str]]:
    results = []
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            async with client.post(server.make_url("/v1/chat/completions"), json=PAYLOAD) as r:
                raw = await r.read()
                results.append((r.status, spec_text(parse_events(raw)) if r.status == 200 else ""))
    return results


async def test_weights_split_traffic(aiohttp_server: Any) -> None:
    async with FaultUpstream() as a, FaultUpstream() as b:
        config = config_from_mapping(
            pool_config(
                {"a": {"base_url": a.url, "weight": 3}, "b": {"base_url": b.url, "weight": 1}}
            )
        )
        server = await aiohttp_server(create_app(config))
        results = await run(server, 200)
        assert results == [(200, "Hello world")] * 200
        share = len(a.requests) / 200
        assert 0.65 < share < 0.85


async def test_unreachable_upstream_fails_over_and_its_breaker_opens(aiohttp_server: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with FaultUpstream() as good:
        config = config_from_mapping(
            pool_config(
                {"dead": {"base_url": dead, "weight": 5}, "good": {"base_url": good.url}},
                balancer={"failure_threshold": 3, "open_seconds": 60},
            )
        )
        server = await aiohttp_server(create_app(config))
        results = await run(server, 40)
        assert results == [(200, "Hello world")] * 40  # every failure was failed over
        async with aiohttp.ClientSession() as client:
            metrics = await (await client.get(server.make_url("/metrics"))).text()
        dead_tries = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(
                'ds2oai_upstream_selected_total{result="connect_error",upstream="dead"}'
            )
        )
        assert dead_tries == 3  # then the breaker kept traffic away


async def test_5xx_from_one_upstream_fails_over_to_the_other(aiohttp_server: Any) -> None:
    broken = json_response(503, {"error": {"message": "overloaded"}})
    async with FaultUpstream(default=broken) as bad, FaultUpstream() as good:
        config = config_from_mapping(
            pool_config({"bad": {"base_url": bad.url, "weight": 1}, "good": {"base_url": good.url}})
        )
        server = await aiohttp_server(create_app(config))
        results = await run(server, 20)
        assert results == [(200, "Hello world")] * 20
        assert len(good.requests) == 20


async def test_half_open_probe_closes_the_breaker_when_the_upstream_recovers(
    aiohttp_server: Any,
) -> None:
    broken = json_response(500, {"error": {"message": "down"}})
    async with FaultUpstream(default=broken) as flaky, FaultUpstream() as good:
        config = config_from_mapping(
            pool_config(
                {"flaky": {"base_url": flaky.url, "weight": 100}, "good": {"base_url": good.url}},
                balancer={"failure_threshold": 2, "open_seconds": 0.3},
            )
        )
        server = await aiohttp_server(create_app(config))
        await run(server, 10)
        assert len(flaky.requests) == 2  # opened after two failures
        flaky.default = good.default  # it recovers
        await asyncio.sleep(0.35)
        await run(server, 10)
        # the half-open probe succeeded, so the heavy upstream takes traffic again
        assert len(flaky.requests) > 5


async def half_open(aiohttp_server: Any, a: FaultUpstream, b: FaultUpstream) -> Any:
    """A gateway over a heavy `a` and a light `b` whose `a` breaker is half-open."""
    config = config_from_mapping(
        pool_config(
            {"a": {"base_url": a.url, "weight": 1000}, "b": {"base_url": b.url, "weight": 0.001}},
            balancer={"failure_threshold": 1, "open_seconds": 0.2},
        )
    )
    server = await aiohttp_server(create_app(config))
    a.queue(json_response(503, {"error": {"message": "down"}}))
    await run(server, 1)  # opens a's breaker
    await asyncio.sleep(0.25)
    return server


async def test_a_probe_answered_429_lets_the_next_request_probe(aiohttp_server: Any) -> None:
    async with FaultUpstream() as a, FaultUpstream() as b:
        server = await half_open(aiohttp_server, a, b)
        a.queue(json_response(429, {"error": {"message": "slow down"}}))
        assert await run(server, 1) == [(200, "Hello world")]  # the probe's 429 fails over
        await run(server, 10)
        # a 429 says nothing of health: the next request probed, a recovered and took traffic
        assert len(a.requests) > 5


async def test_a_probe_whose_client_left_lets_the_next_request_probe(
    aiohttp_server: Any,
) -> None:
    async with FaultUpstream() as a, FaultUpstream() as b:
        server = await half_open(aiohttp_server, a, b)
        a.queue((Hang(),))  # the probe waits for a head that never comes; its client leaves
        async with aiohttp.ClientSession() as client:
            task = asyncio.create_task(
                client.post(server.make_url("/v1/chat/completions"), json=PAYLOAD)
            )
            await a.wait_requests(2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)
        await run(server, 10)
        assert len(a.requests) > 5


async def test_a_full_connection_pool_is_a_503_not_a_failure_of_the_upstreams(
    aiohttp_server: Any,
) -> None:
    # upstream.max_connections is the gateway's own limit, shared by the pool's upstreams:
    # waiting for it in vain says nothing about their health.
    slow = sse_script(text_events(["Hello", " world"]), delay=0.5)
    async with FaultUpstream(default=slow) as a, FaultUpstream(default=slow) as b:
        config = config_from_mapping(
            pool_config(
                {"a": {"base_url": a.url}, "b": {"base_url": b.url}},
                upstream={"read_timeout": 5.0, "connect_timeout": 0.2, "max_connections": 1},
                balancer={"failure_threshold": 2, "open_seconds": 60},
            )
        )
        app = create_app(config)
        server = await aiohttp_server(app)
        async with aiohttp.ClientSession() as client:
            before = await scrape(client, server.make_url("/metrics"))

            async def one() -> tuple[int, dict[str, Any], str]:
                async with client.post(server.make_url("/v1/chat/completions"), json=PAYLOAD) as r:
                    await r.read()
                    error = {} if r.status == 200 else (await r.json())["error"]
                    return r.status, error, r.headers.get("Retry-After", "")

            results = await asyncio.gather(*(one() for _ in range(4)))
            after = await scrape(client, server.make_url("/metrics"))
        assert sorted(status for status, _, _ in results) == [200, 503, 503, 503]
        # The upstreams did not fail: no stream outcome is counted for the 503s.
        streams = "ds2oai_streams_total"
        assert delta(before, after, streams, dialect="spec", outcome="upstream_error") == 0
        assert delta(before, after, streams, dialect="spec", outcome="completed") == 1
        for status, error, retry_after in results:
            if status == 503:
                assert (error["type"], error["code"]) == ("server_error", "gateway_busy")
                assert "upstream.max_connections" in error["message"]
                assert retry_after == "1"
        assert len(a.requests) + len(b.requests) == 1  # no failover, no retry
        for target in app[UPSTREAM].targets:
            assert target.breaker.state is BreakerState.CLOSED


async def test_retry_budget_caps_retries(aiohttp_server: Any) -> None:
    always_500 = json_response(500, {"error": {"message": "down"}})
    async with FaultUpstream(default=always_500) as up:
        config = config_from_mapping(
            {
                "upstream": {"base_url": up.url},
                "retry": {"base_delay": 0.0, "max_delay": 0.0, "max_retries": 3},
                "balancer": {"retry_budget_ratio": 0.0, "retry_budget_min": 4},
                "store": {"backend": "memory"},
            }
        )
        server = await aiohttp_server(create_app(config))
        results = await run(server, 10)
        assert Counter(status for status, _ in results) == {502: 10}
        assert len(up.requests) == 10 + 4  # 10 first attempts, only 4 retries in budget


async def test_readiness_asks_every_upstream_of_the_pool(aiohttp_server: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with FaultUpstream() as good:
        for targets, ready in (
            ({"dead": {"base_url": dead}, "good": {"base_url": good.url}}, True),
            ({"dead": {"base_url": dead}, "gone": {"base_url": dead}}, False),
        ):
            # [upstream].base_url stays at its default, which nothing listens on here
            server = await aiohttp_server(create_app(config_from_mapping(pool_config(targets))))
            async with (
                aiohttp.ClientSession() as client,
                client.get(server.make_url("/readyz")) as resp,
            ):
                body = await resp.json()
            assert (resp.status == 200) is ready, body
            assert "dead: ConnectError" in body["upstream"]
