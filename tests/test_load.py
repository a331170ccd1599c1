"""Load and backpressure against ONE `ds2oai serve` process (its RSS read from /proc).

* 1,000 concurrent paced streams: every stream's text exact (tokens carry the stream's tag, so
  cross-talk between streams would show); the gateway's RSS before and with all 1,000 streams
  open gives the memory per open stream, printed and written to a JSON report under the temp dir.
* A slow reader (1 KiB per 10 ms) of a fast ~80 MB upstream reply: the gateway's RSS grows by
  less than a few MB (the slow client slows the upstream read), and when the reader goes away
  the upstream sees its connection closed.

The upstream is `LoadUpstream` below: raw asyncio, one request per connection, paced streams
held at a barrier until every stream has arrived (so all of them are open at once when the RSS
is read), or a firehose of large events written as fast as the connection drains.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import pytest

from tests.conftest import ROOT, free_port, wait_http
from tests.sse_client import parse_events, spec_text

N_STREAMS = 1000
N_CHUNKS = 20
INTERVAL = 0.05
REPORT = Path(tempfile.gettempdir()) / "ds2oai-load-report.json"


def _chunk(content: str = "", *, finish: str | None = None, usage: bool = False) -> bytes:
    obj: dict[str, Any] = {
        "id": "load-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = {"prompt_tokens": 1, "completion_tokens": N_CHUNKS, "total_tokens": 21}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def tokens_for(tag: int) -> list[str]:
    return [f"s{tag}w{j} " for j in range(N_CHUNKS)]


class LoadUpstream:
    """A fast fake DeepSeek: `"load": {"tag": k}` -> a paced stream (held at the barrier after
    its first event until `release` is set); `"load": {"firehose": n}` -> ~n bytes of 16 KiB
    content events, written as fast as the connection drains."""

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.open = 0
        self.peak_open = 0
        self.completed = 0
        self.client_gone = 0
        self.firehose_sent = 0
        self.firehose_gone = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0, backlog=4096)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            plan = json.loads(await reader.readexactly(length))["load"]
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            if "firehose" in plan:
                await self._firehose(writer, int(plan["firehose"]))
            else:
                await self._paced(writer, int(plan["tag"]))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.completed += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.client_gone += 1
        finally:
            self.open -= 1
            writer.transport.abort()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, event: bytes) -> None:
        if writer.transport.is_closing():
            raise ConnectionResetError("gone")
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()

    async def _paced(self, writer: asyncio.StreamWriter, tag: int) -> None:
        await self._send(writer, _chunk(""))
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()
        await self.release.wait()
        for token in tokens_for(tag):
            await asyncio.sleep(INTERVAL)
            await self._send(writer, _chunk(token))
        await self._send(writer, _chunk(finish="stop", usage=True) + b"data: [DONE]\n\n")

    async def _firehose(self, writer: asyncio.StreamWriter, total: int) -> None:
        event = _chunk("y" * 16 * 1024)
        try:
            await self._send(writer, _chunk(""))
            while self.firehose_sent < total:
                await self._send(writer, event)
                self.firehose_sent += len(event)
            await self._send(writer, _chunk(finish="stop") + b"data: [DONE]\n\n")
        except ConnectionError:
            self.firehose_gone.set()
            raise


# ------------------------------------------------------------------------------ the gateway


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(autouse=True)
def _raise_fd_limit() -> Iterator[None]:
    """2 fds per stream on each side: lift the soft limit to the hard one (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * N_STREAMS + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {N_STREAMS} streams")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Served:
    url: str
    pid: int


@pytest.fixture
def serve_gateway(tmp_path: Path) -> Iterator[Any]:
    """`start(upstream_url)` -> a `ds2oai serve` subprocess (stopped at teardown)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream_url: str) -> Served:
        config = tmp_path / "gateway.toml"
        config.write_text('[logging]\naccess_log = false\n[store]\nbackend = "memory"\n')
        port = free_port()
        env = {**os.environ, "UPSTREAM_BASE_URL": upstream_url, "DS2OAI_CONFIG": str(config)}
        env.pop("DEEPSEEK_API_KEY", None)
        log = (tmp_path / "gateway.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ds2oai", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        log.close()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        return Served(url, proc.pid)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _sample_peak(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with suppress(OSError):
            peak[0] = max(peak[0], rss_kib(pid))
        with suppress(TimeoutError):
            async with asyncio.timeout(0.02):
                await stop.wait()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as s:
        yield s


def _body(load: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "stream": True, "load": load}


# ------------------------------------------------------------------------------------- tests


async def test_1000_concurrent_paced_streams_are_exact_and_memory_per_stream_is_measured(
    serve_gateway: Any, session: aiohttp.ClientSession
) -> None:
    async with LoadUpstream(expected=N_STREAMS) as upstream:
        gw: Served = serve_gateway(upstream.url)
        url = gw.url + "/v1/chat/completions"

        async def one(tag: int) -> str:
            async with session.post(url, json=_body({"tag": tag})) as resp:
                assert resp.status == 200, await resp.text()
                events = parse_events(await resp.read())
                assert events[-1].event == "response.completed", events[-3:]
                return spec_text(events)

        # Warm up (imports, pools, allocator), then the baseline.
        upstream.release.set()
        upstream.expected = 50
        assert await asyncio.gather(*(one(t) for t in range(50))) == [
            "".join(tokens_for(t)) for t in range(50)
        ]
        upstream.release.clear()
        upstream.all_arrived.clear()
        upstream.arrived, upstream.expected, upstream.peak_open = 0, N_STREAMS, 0
        await asyncio.sleep(0.3)
        baseline = rss_kib(gw.pid)

        peak = [baseline]
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_peak(gw.pid, peak, stop))
        started = time.monotonic()
        tasks = []
        for tag in range(N_STREAMS):  # ramp up: 50 connects per 10 ms
            tasks.append(asyncio.create_task(one(tag)))
            if tag % 50 == 49:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(30):
            await upstream.all_arrived.wait()
        ramp = time.monotonic() - started
        await asyncio.sleep(0.5)  # every gateway stream has written its first event
        all_open = rss_kib(gw.pid)
        open_now = upstream.open
        upstream.release.set()
        texts = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        stop.set()
        await sampler

    assert texts == ["".join(tokens_for(t)) for t in range(N_STREAMS)]
    assert open_now == N_STREAMS
    per_stream = (all_open - baseline) / N_STREAMS
    report = {
        "streams": N_STREAMS,
        "chunks_per_stream": N_CHUNKS,
        "chunk_interval_s": INTERVAL,
        "ramp_up_s": round(ramp, 2),
        "elapsed_s": round(elapsed, 2),
        "rss_baseline_kib": baseline,
        "rss_all_open_kib": all_open,
        "rss_peak_kib": peak[0],
        "kib_per_open_stream": round(per_stream, 1),
        "kib_per_stream_at_peak": round((peak[0] - baseline) / N_STREAMS, 1),
    }
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload: {json.dumps(report)}\nreport written to {REPORT}")
    assert per_stream < 200, report  # generous: a regression guard, not a benchmark


async def test_slow_reader_of_a_fast_80mb_reply_does_not_grow_the_gateway(
    serve_gateway: Any,
) -> None:
    total = 80 * 1024 * 1024
    async with LoadUpstream() as upstream:
        gw: Served = serve_gateway(upstream.url)
        host, port = gw.url.removeprefix("http://").split(":")
        await asyncio.sleep(0.3)
        baseline = rss_kib(gw.pid)
        body = json.dumps(_body({"firehose": total})).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        peak = [baseline]
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_peak(gw.pid, peak, stop))
        received = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            received += len(await reader.read(1024))
            await asyncio.sleep(0.01)
        sent_when_closed = upstream.firehose_sent
        writer.transport.abort()  # the slow client goes away
        async with asyncio.timeout(5):
            await upstream.firehose_gone.wait()  # ... and the gateway closed the upstream
        stop.set()
        await sampler
    growth = peak[0] - baseline
    print(
        f"\nslow reader: read {received} B in 3 s, upstream had sent {sent_when_closed} B "
        f"of {total}, gateway RSS {baseline} KiB -> peak {peak[0]} KiB (+{growth} KiB)"
    )
    with suppress(OSError, ValueError):
        report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
        report["slow_reader"] = {
            "read_bytes": received,
            "upstream_sent_bytes": sent_when_closed,
            "rss_baseline_kib": baseline,
            "rss_peak_kib": peak[0],
            "rss_growth_kib": growth,
        }
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
    assert 100 * 1024 < received < 1024 * 1024
    assert sent_when_closed < total // 2, "the upstream was read far ahead of the client"
    assert growth < 8 * 1024, f"gateway RSS grew by {growth} KiB"
