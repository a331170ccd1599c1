"""The load generator: a raw asyncio HTTP/1.1 client on keep-alive connections.

Not aiohttp's client: at tens of thousands of SSE frames per second the client must cost far
less CPU than the system it measures, so each connection is a bare `asyncio.Protocol` that
parses the response head, de-chunks the body by index arithmetic (no per-chunk copies) and
counts SSE frames with `bytes.count` over the complete frames of each read — no JSON parsing.

Per stream (`StreamResult`) it records the send time, the arrival of the first content frame
(time to first token), the lateness of every content frame against its upstream schedule
(`send + ttfc + i * delay`; the worst one always, each one when `record_frames`), the end of the
HTTP response, the number of content frames, whether the dialect's terminal event arrived and
any error. A stream is `complete` when it answered 200, carried exactly the expected number of
content frames, ended with its terminal event and showed no error event.

Virtual users (`run_load`) each own one pre-opened keep-alive connection and run streams back to
back (closed loop) until the run's stop time, or exactly `per_vu` streams; starts can be spread
over a ramp so that paced streams are evenly out of phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

__all__ = [
    "FORMATS",
    "OPENAI",
    "SPEC",
    "Connection",
    "LoadRun",
    "LoadSpec",
    "Request",
    "StreamResult",
    "WireFormat",
    "connect_many",
    "http_get",
    "make_request",
    "percentile",
    "run_load",
]

perf = time.perf_counter


@dataclass(frozen=True, slots=True)
class WireFormat:
    """How to recognise content frames, the terminal event and errors in a response body."""

    name: str
    content: bytes  # occurs once per content frame
    empty: bytes | None  # occurrences of `content` that are not content (empty deltas)
    terminal: bytes
    error: bytes


SPEC = WireFormat(
    "spec",
    content=b"event: response.output_text.delta\n",
    empty=None,
    terminal=b"event: response.completed\n",
    error=b"event: response.error\n",
)
# DeepSeek's own chunks (direct, nginx, the naive relay) and the OpenAI chat route alike.
OPENAI = WireFormat(
    "openai",
    content=b'"content":"',
    empty=b'"content":""',
    terminal=b"data: [DONE]",
    error=b'data: {"error"',
)
FORMATS = {f.name: f for f in (SPEC, OPENAI)}


@dataclass(frozen=True, slots=True)
class Request:
    raw: bytes
    fmt: WireFormat
    chunks: int
    delay: float  # seconds between upstream content chunks
    ttfc: float  # seconds to the first upstream content chunk
    record_frames: bool = False


def make_request(
    host: str,
    port: int,
    path: str,
    fmt: WireFormat,
    *,
    chunks: int,
    delay_ms: float = 0.0,
    ttfc_ms: float = 0.0,
    record_frames: bool = False,
    model: str = "deepseek-chat",
) -> Request:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Benchmark: say something."}],
            "stream": True,
            "bench_chunks": chunks,
            "bench_delay_ms": delay_ms,
            "bench_ttfc_ms": ttfc_ms,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return Request(head + body, fmt, chunks, delay_ms / 1000, ttfc_ms / 1000, record_frames)


@dataclass(slots=True)
class StreamResult:
    expected: int
    t_send: float
    t_first: float | None = None
    t_end: float = 0.0
    content: int = 0
    terminal: bool = False
    status: int = 0
    error: str | None = None
    max_late: float = 0.0
    lates: list[float] | None = None

    @property
    def complete(self) -> bool:
        return (
            self.error is None
            and self.status == 200
            and self.terminal
            and self.content == self.expected
        )

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def total(self) -> float:
        return self.t_end - self.t_send


_IDLE, _HEAD, _SIZE, _DATA, _CRLF, _TRAILER, _LENGTH, _EOF = range(8)


class Connection(asyncio.Protocol):
    """One keep-alive client connection; `request()` returns a future of the stream's result."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._state = _IDLE
        self._buf = b""
        self._sse = b""
        self._rem = 0
        self._keep = True
        self._req: Request | None = None
        self._res: StreamResult | None = None
        self._fut: asyncio.Future[StreamResult] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._res is not None:
            if self._state == _EOF:
                self._finish(perf(), [])
            else:
                self._finish(perf(), [], "connection lost")
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def request(self, req: Request) -> asyncio.Future[StreamResult]:
        fut: asyncio.Future[StreamResult] = self._loop.create_future()
        res = StreamResult(expected=req.chunks, t_send=perf())
        if req.record_frames:
            res.lates = []
        if self.transport is None or self.closed or self._res is not None:
            res.error = "connection not usable"
            res.t_end = res.t_send
            fut.set_result(res)
            return fut
        self._req, self._res, self._fut = req, res, fut
        self._state = _HEAD
        self._sse = b""
        self._buf = b""
        self.transport.write(req.raw)
        return fut

    def data_received(self, data: bytes) -> None:
        now = perf()
        if self._res is None:
            return  # nothing asked: ignore stray bytes
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos, n = 0, len(data)
        pieces: list[bytes] = []
        try:
            while True:
                state = self._state
                if state == _DATA:
                    if pos >= n:
                        break
                    end = pos + self._rem
                    if end <= n:
                        pieces.append(data[pos:end])
                        pos = end
                        self._state = _CRLF
                    else:
                        pieces.append(data[pos:])
                        self._rem -= n - pos
                        pos = n
                        break
                elif state == _CRLF:
                    if n - pos < 2:
                        break
                    pos += 2
                    self._state = _SIZE
                elif state == _SIZE:
                    nl = data.find(b"\r\n", pos)
                    if nl < 0:
                        break
                    size = int(data[pos:nl].split(b";", 1)[0], 16)
                    pos = nl + 2
                    if size:
                        self._rem = size
                        self._state = _DATA
                    else:
                        self._state = _TRAILER
                elif state == _HEAD:
                    end = data.find(b"\r\n\r\n", pos)
                    if end < 0:
                        break
                    self._head(data[pos:end].lower())
                    pos = end + 4
                    if self._state == _IDLE:
                        self._finish(now, pieces)
                        return
                elif state == _TRAILER:
                    nl = data.find(b"\r\n", pos)
                    if nl < 0:
                        break
                    if nl == pos:
                        self._finish(now, pieces)
                        return
                    pos = nl + 2  # a trailer field: skipped
                elif state == _LENGTH:
                    if pos >= n:
                        break
                    take = min(self._rem, n - pos)
                    pieces.append(data[pos : pos + take])
                    pos += take
                    self._rem -= take
                    if self._rem == 0:
                        self._finish(now, pieces)
                        return
                elif state == _EOF:
                    pieces.append(data[pos:])
                    pos = n
                    break
                else:
                    return
        except ValueError:
            self._finish(now, pieces, "malformed response")
            self.abort()
            return
        if pos < n:
            self._buf = data[pos:]
        if pieces:
            self._scan(now, pieces)

    def _head(self, head: bytes) -> None:
        res = self._res
        assert res is not None
        res.status = int(head[9:12])
        if res.status != 200:
            res.error = f"HTTP {res.status}"
        self._keep = b"\r\nconnection: close" not in head
        if b"\r\ntransfer-encoding: chunked" in head:
            self._state = _SIZE
            return
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._state = _EOF
            self._keep = False
            return
        stop = head.find(b"\r\n", at + 2)
        self._rem = int(head[at + 17 : stop if stop >= 0 else len(head)])
        self._state = _LENGTH if self._rem else _IDLE

    def _scan(self, now: float, pieces: list[bytes]) -> None:
        joined = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        sse = self._sse + joined if self._sse else joined
        cut = sse.rfind(b"\n\n")
        if cut < 0:
            self._sse = sse
            return
        frames = sse[: cut + 2]
        self._sse = sse[cut + 2 :]
        req, res = self._req, self._res
        assert req is not None
        assert res is not None
        fmt = req.fmt
        k = frames.count(fmt.content)
        if k and fmt.empty is not None:
            k -= frames.count(fmt.empty)
        if k > 0:
            first = res.content
            if res.t_first is None:
                res.t_first = now
            due = res.t_send + req.ttfc
            late = now - (due + first * req.delay)
            if late > res.max_late:
                res.max_late = late
            if res.lates is not None:
                res.lates.extend(now - (due + (first + j) * req.delay) for j in range(k))
            res.content = first + k
        if not res.terminal and fmt.terminal in frames:
            res.terminal = True
        if fmt.error in frames:
            res.error = "error event"

    def _finish(self, now: float, pieces: list[bytes], error: str | None = None) -> None:
        if pieces:
            self._scan(now, pieces)
        res, fut = self._res, self._fut
        self._state = _IDLE
        self._req = self._res = self._fut = None
        self._buf = self._sse = b""
        if res is None or fut is None:
            return
        res.t_end = now
        if error is not None and res.error is None:
            res.error = error
        if not self._keep or error is not None:
            self.close()
        if not fut.done():
            fut.set_result(res)


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _transport, proto = await loop.create_connection(Connection, host, port)
    return proto


async def connect_many(host: str, port: int, n: int, batch: int = 200) -> list[Connection | None]:
    """Open `n` connections, `batch` at a time (kind to listen backlogs); None where it failed."""
    conns: list[Connection | None] = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        got = await asyncio.gather(
            *(connect(host, port) for _ in range(size)), return_exceptions=True
        )
        conns.extend(c if isinstance(c, Connection) else None for c in got)
    return conns


@dataclass(frozen=True, slots=True)
class LoadSpec:
    host: str
    port: int
    request: Request
    concurrency: int
    duration: float = 0.0  # seconds (after the ramp) during which streams are started
    ramp: float = 0.0  # virtual user i starts at ramp * i / concurrency
    per_vu: int = 0  # > 0: exactly this many streams per virtual user, duration ignored
    drain_timeout: float = 30.0  # after the last start; then open streams are aborted


@dataclass(slots=True)
class LoadRun:
    results: list[StreamResult]
    t_start: float
    t_stop: float  # no stream started after this
    t_done: float
    connect_errors: int = 0
    aborted: int = 0
    incomplete: list[StreamResult] = field(default_factory=list)

    def finished_between(self, t0: float, t1: float) -> list[StreamResult]:
        return [r for r in self.results if t0 <= r.t_end < t1]

    def started_between(self, t0: float, t1: float) -> list[StreamResult]:
        return [r for r in self.results if t0 <= r.t_send < t1]


async def _vu(
    index: int,
    spec: LoadSpec,
    conns: list[Connection | None],
    results: list[StreamResult],
    t_start: float,
    t_stop: float,
) -> None:
    if spec.ramp > 0:
        await asyncio.sleep(max(0.0, t_start + spec.ramp * index / spec.concurrency - perf()))
    done = 0
    while True:
        if spec.per_vu:
            if done >= spec.per_vu:
                return
        elif perf() >= t_stop:
            return
        conn = conns[index]
        if conn is None or conn.closed:
            try:
                conn = conns[index] = await connect(spec.host, spec.port)
            except OSError as exc:
                now = perf()
                failed = StreamResult(spec.request.chunks, now, t_end=now)
                failed.error = f"connect: {exc.__class__.__name__}"
                results.append(failed)
                done += 1
                await asyncio.sleep(0.05)
                continue
        results.append(await conn.request(spec.request))
        done += 1


async def run_load(spec: LoadSpec, on_start: Callable[[float], None] | None = None) -> LoadRun:
    """Run the virtual users of `spec`; `on_start(t)` is called once the connections are open."""
    loop = asyncio.get_running_loop()
    conns = await connect_many(spec.host, spec.port, spec.concurrency)
    connect_errors = sum(1 for c in conns if c is None)
    results: list[StreamResult] = []
    t_start = perf()
    t_stop = t_start + spec.ramp + spec.duration
    if on_start is not None:
        on_start(t_start)
    tasks = [
        loop.create_task(_vu(i, spec, conns, results, t_start, t_stop))
        for i in range(spec.concurrency)
    ]
    deadline = t_stop + spec.drain_timeout
    aborted = 0
    try:
        _done, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline - perf()))
        if pending:
            for conn in conns:
                if conn is not None and not conn.closed:
                    aborted += 1
                    conn.abort()
            _done, pending = await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()
    finally:
        for conn in conns:
            if conn is not None:
                conn.close()
    await asyncio.sleep(0)
    run = LoadRun(results, t_start, t_stop, perf(), connect_errors, aborted)
    run.incomplete = [r for r in results if not r.complete]
    return run


async def http_get(host: str, port: int, path: str, wait: float = 2.0) -> int:
    """Status of `GET path` (0 if no answer within `wait` s): readiness checks of processes."""
    try:
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
