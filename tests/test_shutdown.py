"""SIGTERM with streams in flight: stop accepting, let streams finish within the grace, end the
rest with their terminal error (a request still waiting for the upstream: a 502), exit 0; a
second SIGTERM exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ds2oai.chain import Exchange, Next, Reply
from tests.conftest import ROOT, free_port, wait_http
from tests.fault_upstream import FaultUpstream, Hang, sse_script, text_events
from tests.sse_client import parse_events, spec_text

SHORT = [f"s{i} " for i in range(5)]
LONG = [f"l{i} " for i in range(100)]


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, upstream_url: str, grace: float, extra: str = ""
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`ds2oai serve` as a real process (signals reach it as they would in production); killed
    on the way out if a test left it running. `extra`: more of its TOML config."""
    config = tmp_path / "gw.toml"
    config.write_text(f'[server]\nshutdown_grace = {grace}\n[store]\nbackend = "memory"\n{extra}')
    port = free_port()
    env = {**os.environ, "UPSTREAM_BASE_URL": upstream_url, "DS2OAI_CONFIG": str(config)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds2oai", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def read_stream(client: aiohttp.ClientSession, url: str, fault: str) -> bytes:
    payload = {"messages": [], "stream": True, "fault": fault}
    async with client.post(url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_drains_streams_then_cuts_the_rest_with_a_terminal_error(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # SIGHUP too: the terminal or session that ran the gateway went away.
    async with FaultUpstream() as upstream:
        upstream.route("short", sse_script(text_events(SHORT), delay=0.2))  # ~1.2 s
        upstream.route("long", sse_script(text_events(LONG), delay=0.2))  # ~20 s
        with gateway_process(tmp_path, upstream.url, grace=3.0) as (proc, url):
            async with aiohttp.ClientSession() as client:
                short = asyncio.create_task(read_stream(client, url, "short"))
                long = asyncio.create_task(read_stream(client, url, "long"))
                await upstream.wait_requests(2)
                await asyncio.sleep(0.3)
                started = time.monotonic()
                proc.send_signal(signum)
                await asyncio.sleep(0.3)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with client.get(url + "/healthz"):
                        pass
                short_raw, long_raw = await asyncio.gather(short, long)
                cut_after = time.monotonic() - started
            rc = await asyncio.to_thread(proc.wait, 10)
    assert rc == 0
    short_events = parse_events(short_raw)
    assert short_events[-1].event == "response.completed"
    assert spec_text(short_events) == "".join(SHORT)
    long_events = parse_events(long_raw)
    assert long_events[-1].event == "response.error"
    assert "shutting down" in long_events[-1].json()["message"]
    assert "".join(LONG).startswith(spec_text(long_events))
    assert 2.9 < cut_after < 4.0  # the whole grace (3 s), then the cut


async def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    async with FaultUpstream() as upstream:
        upstream.route("long", sse_script(text_events(LONG), delay=0.2))
        with gateway_process(tmp_path, upstream.url, grace=30.0) as (proc, url):
            async with aiohttp.ClientSession() as client:
                long = asyncio.create_task(read_stream(client, url, "long"))
                await upstream.wait_requests(1)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                assert proc.poll() is None  # still draining
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 5)
                assert time.monotonic() - started < 2
                with pytest.raises(aiohttp.ClientPayloadError):
                    await long


async def test_a_request_still_waiting_for_the_upstream_gets_a_502_at_the_cut(
    tmp_path: Path,
) -> None:
    async with FaultUpstream() as upstream:
        upstream.route("hang", (Hang(),))  # the upstream takes the request and never answers
        with gateway_process(tmp_path, upstream.url, grace=1.5) as (proc, url):
            async with aiohttp.ClientSession() as client:
                payload = {"messages": [], "stream": True, "fault": "hang"}
                request = asyncio.ensure_future(
                    client.post(url + "/v1/chat/completions", json=payload)
                )
                await upstream.wait_requests(1)
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                async with await request as resp:
                    status, body = resp.status, await resp.json()
            rc = await asyncio.to_thread(proc.wait, 10)
    assert rc == 0
    assert status == 502
    assert "shutting down" in body["error"]["message"]
    assert len(upstream.requests) == 1  # not sent again


class Hangs:
    """A stage that never calls on (a bug, or a wait on something that never comes)."""

    name = "hangs"

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        await asyncio.Event().wait()
        raise AssertionError("never reached")


async def test_a_request_a_stage_holds_past_the_grace_gets_a_503_and_the_exit_is_prompt(
    tmp_path: Path,
) -> None:
    chain = '[middleware]\nchain = ["tests.test_shutdown:Hangs", "auth", "retry", "reframe"]\n'
    async with FaultUpstream() as upstream:
        with gateway_process(tmp_path, upstream.url, grace=1.5, extra=chain) as (proc, url):
            async with aiohttp.ClientSession() as client:
                payload = {"messages": [], "stream": True}
                request = asyncio.ensure_future(
                    client.post(url + "/v1/chat/completions", json=payload)
                )
                await asyncio.sleep(0.5)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                async with await request as resp:
                    status, body = resp.status, await resp.json()
            rc = await asyncio.to_thread(proc.wait, 10)
            exited_after = time.monotonic() - started
    assert rc == 0
    assert (status, body["error"]["code"]) == (503, "shutting_down")
    # The grace, then about a second: aiohttp would have waited the grace and its margin twice.
    assert exited_after < 1.5 + 2.0
    assert upstream.requests == []
