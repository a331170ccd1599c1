"""The issue's test: two `ds2oai serve` processes sharing one Redis count one key's limit exactly.

A 100-requests-per-minute key, 300 attempts spread over both processes, 20 at a time: exactly
100 are answered 200 and 200 get a 429 with `Retry-After` and the `x-ratelimit-*` headers. The
processes' JSON log lines name the key by its hash only, never the key or the Redis password.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ds2oai.middleware.auth import key_id
from tests.conftest import ROOT, free_port, wait_http
from tests.fault_upstream import FaultUpstream
from tests.redis_server import RedisServer

TEAM_KEY = "sk-team-PLANTED-5d1e7c0a"
OTHER_KEY = "sk-other-PLANTED-c2b4"
REDIS_PASSWORD = "limits-e2e-PW-9f8e"
ATTEMPTS = 300
LIMIT = 100
AT_A_TIME = 20


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer(password=REDIS_PASSWORD) as server:
        yield server.url


def start_gateway(
    config: Path, log: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "ds2oai", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def test_two_processes_sharing_redis_admit_exactly_the_limit(
    tmp_path: Path, redis_url: str, fault_upstream: FaultUpstream
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[auth]
api_keys = ["{OTHER_KEY}"]
[auth.clients.team]
key_env = "TEAM_GATEWAY_KEY"
requests_per_minute = {LIMIT}
[limits]
on_redis_error = "closed"
[store]
backend = "memory"
[retry]
max_retries = 0
[middleware]
chain = ["auth", "limits", "rate_limit", "retry", "reframe"]
"""
    )
    env = {
        **os.environ,
        "UPSTREAM_BASE_URL": fault_upstream.url,
        "DS2OAI_CONFIG": str(config),
        "DS2OAI_LIMITS_REDIS_URL": redis_url,
        "TEAM_GATEWAY_KEY": TEAM_KEY,
    }
    env.pop("DEEPSEEK_API_KEY", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gateways = [start_gateway(config, tmp_path / f"gw{i}.log", env) for i in range(2)]
    try:
        for proc, url in gateways:
            await asyncio.to_thread(wait_http, url + "/healthz", proc)
        results = await attempts([url for _, url in gateways])
        other = await one_request(gateways[0][1], OTHER_KEY)
    finally:
        codes = [stop(proc) for proc, _ in gateways]
    assert codes == [0, 0]

    statuses = [status for status, _ in results]
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == ATTEMPTS - LIMIT
    served = {url: 0 for _, url in gateways}
    for (status, headers), (_, url) in zip(results, cycle_urls(gateways), strict=True):
        served[url] += status == 200
        assert headers["x-ratelimit-limit-requests"] == str(LIMIT)
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert headers["x-ratelimit-reset-requests"]
    assert all(count > 0 for count in served.values()), served  # both processes admitted some
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for s, h in results if s == 200)
    assert remaining == list(range(LIMIT))  # each admission saw a distinct count: atomic
    assert other[0] == 200  # another key has its own (unlimited) bucket
    assert "x-ratelimit-limit-requests" not in other[1]

    team_id = key_id(TEAM_KEY)
    access: list[dict[str, Any]] = []
    for i in range(2):
        raw = (tmp_path / f"gw{i}.log").read_bytes()
        for secret in (TEAM_KEY, OTHER_KEY, REDIS_PASSWORD):
            assert secret.encode() not in raw, f"{secret} leaked into gw{i}.log"
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.startswith("{")]
        access += [e for e in lines if e.get("path") == "/v1/chat/completions"]
    team = [e for e in access if e.get("key_id") == team_id]
    assert len(team) == ATTEMPTS
    assert sorted(e["status"] for e in team).count(429) == ATTEMPTS - LIMIT


def cycle_urls(
    gateways: list[tuple[subprocess.Popen[bytes], str]],
) -> list[tuple[subprocess.Popen[bytes], str]]:
    return [gateways[i % len(gateways)] for i in range(ATTEMPTS)]


async def attempts(urls: list[str]) -> list[tuple[int, dict[str, str]]]:
    """`ATTEMPTS` requests with the team key, alternating gateways, `AT_A_TIME` at once."""
    gate = asyncio.Semaphore(AT_A_TIME)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as client:

        async def attempt(i: int) -> tuple[int, dict[str, str]]:
            async with gate:
                return await post(client, urls[i % len(urls)], TEAM_KEY, stream=i % 2 == 0)

        return await asyncio.gather(*(attempt(i) for i in range(ATTEMPTS)))


async def one_request(url: str, key: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        return await post(client, url, key, stream=True)


async def post(
    client: aiohttp.ClientSession, url: str, key: str, *, stream: bool
) -> tuple[int, dict[str, str]]:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    async with client.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
        if resp.status == 429:
            error = json.loads(raw)["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        else:
            assert resp.status == 200, raw
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}
