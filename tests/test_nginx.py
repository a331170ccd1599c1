"""ds2oai behind Debian's nginx with `deploy/nginx.conf`: streams arrive unbuffered."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, GatewayFactory, free_port, wait_http
from tests.fault_upstream import FaultUpstream, sse_script, text_events
from tests.sse_client import parse_events, spec_text

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None and not os.environ.get("DS2OAI_REQUIRE_NGINX"), reason="nginx not installed"
)
TOKENS = [f"t{i} " for i in range(6)]


async def test_events_pass_through_nginx_as_they_happen(
    tmp_path: Path, fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    assert NGINX is not None, "DS2OAI_REQUIRE_NGINX is set but nginx is missing"
    fault_upstream.queue(sse_script(text_events(TOKENS), delay=0.3))
    server = await gateway(fault_upstream.url)
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("@PREFIX@", str(tmp_path)).replace("@LISTEN@", f"127.0.0.1:{port}")
    conf = conf.replace("@GATEWAY@", f"127.0.0.1:{server.port}")
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", proc)
        arrivals: list[float] = []
        raw = b""
        async with aiohttp.ClientSession() as client:
            started = time.monotonic()
            async with client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"messages": [], "stream": True},
            ) as resp:
                assert resp.status == 200
                async for data in resp.content.iter_any():
                    arrivals.append(time.monotonic() - started)
                    raw += data
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert spec_text(parse_events(raw)) == "".join(TOKENS)
    # ~2.4 s of paced upstream: the first event must not wait for the end of the answer
    assert arrivals[0] < 1.0
    assert arrivals[-1] > 1.8
    assert len(arrivals) >= len(TOKENS)
