"""A fast DeepSeek Chat Completions upstream emulator for the benchmark.

Raw asyncio (`loop.create_server` with an `asyncio.Protocol`: no framework and no stream-reader
task per connection, so the emulator costs as little CPU as possible next to the system under
test), HTTP/1.1 keep-alive, chunked responses. Every response is precomputed bytes, cached per
`(chunks, delay, ttfc)`; the parameters come from fields of the request's JSON body, which the
gateway forwards upstream untouched:

- `bench_chunks` (default 50): content chunks (`"delta": {"content": "w<i> "}`), then one finish
  chunk (`finish_reason: "stop"` + usage) and `data: [DONE]`;
- `bench_delay_ms` (default 0): pause between content chunks;
- `bench_ttfc_ms` (default 0): time from the request to the first content chunk.

The response head goes out at once; content chunk `i` is written at
`received + ttfc + i * delay` (absolute times, so scheduling lag never accumulates as drift; a
late timer catches up by writing every chunk that is due). The finish chunk, `[DONE]` and the
chunked terminator go out with the last content chunk. With no delay and no ttfc the whole
response is one `write()`.

Also answers `GET /models` (the gateway's readiness probe) and 404 elsewhere. Standalone:
`python -m bench.upstream --port 9001`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any, cast

__all__ = ["DEFAULT_CHUNKS", "Emulator", "Plan", "build_plan", "chunk_frames"]

DEFAULT_CHUNKS = 50
_MAX_HEAD = 64 * 1024
_ID = "chatcmpl-bench"
_CREATED = 1_700_000_000
_MODEL = "deepseek-chat"


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk_frames(chunks: int) -> list[bytes]:
    """The SSE frames of one answer: `chunks` content frames, the finish frame, `[DONE]`."""
    frames: list[bytes] = []
    base = {"id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": _MODEL}
    base["system_fingerprint"] = "fp_bench"
    for i in range(chunks):
        choice = {"index": 0, "delta": {"content": f"w{i} "}, "logprobs": None}
        choice["finish_reason"] = None
        frames.append(_frame({**base, "choices": [choice], "usage": None}))
    finish = {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop"}
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
    usage["prompt_cache_hit_tokens"] = 0
    usage["prompt_cache_miss_tokens"] = 12
    frames.append(_frame({**base, "choices": [finish], "usage": usage}))
    frames.append(b"data: [DONE]\n\n")
    return frames


_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


@dataclass(frozen=True, slots=True)
class Plan:
    """Precomputed bytes of one streamed answer and when to write each segment."""

    chunks: int
    delay: float  # seconds between content chunks
    ttfc: float  # seconds to the first content chunk
    head: bytes
    segments: tuple[bytes, ...]  # chunked-encoded; the last one ends the body
    whole: bytes  # head + every segment, for an unpaced answer

    @property
    def paced(self) -> bool:
        return self.delay > 0 or self.ttfc > 0


def build_plan(chunks: int, delay_ms: float, ttfc_ms: float) -> Plan:
    frames = chunk_frames(chunks)
    content, tail = frames[:chunks], frames[chunks:]
    segments = [_chunked(f) for f in content]
    end = b"".join(_chunked(f) for f in tail) + b"0\r\n\r\n"
    if segments:
        segments[-1] += end
    else:
        segments.append(end)
    return Plan(
        chunks=chunks,
        delay=max(0.0, delay_ms) / 1000,
        ttfc=max(0.0, ttfc_ms) / 1000,
        head=_SSE_HEAD,
        segments=tuple(segments),
        whole=_SSE_HEAD + b"".join(segments),
    )


def _simple(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        content_type,
        len(body),
        body,
    )


_MODELS = _simple("200 OK", b'{"object":"list","data":[{"id":"deepseek-chat","object":"model"}]}')
_NOT_FOUND = _simple("404 Not Found", b'{"error":{"message":"not found","code":"not_found"}}')
_BAD = _simple("400 Bad Request", b'{"error":{"message":"bad request","code":"bad_request"}}')


class Emulator:
    """The emulator server; `await start()` returns the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.served = 0  # streamed answers started
        self._server: asyncio.Server | None = None
        self._plans: dict[tuple[int, float, float], Plan] = {}
        self._params: dict[bytes, tuple[int, float, float]] = {}
        self._live: set[_EmulatorProtocol] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _EmulatorProtocol(self), self.host, self.port, backlog=8192
        )
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in list(self._live):
                proto.abort()
            await self._server.wait_closed()
            self._server = None

    def plan(self, chunks: int, delay_ms: float, ttfc_ms: float) -> Plan:
        key = (chunks, delay_ms, ttfc_ms)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(chunks, delay_ms, ttfc_ms)
        return plan

    def params(self, body: bytes) -> tuple[int, float, float] | None:
        """(chunks, delay_ms, ttfc_ms) from a request body, cached by the body's bytes."""
        found = self._params.get(body)
        if found is not None:
            return found
        try:
            data = json.loads(body)
            chunks = int(data.get("bench_chunks", DEFAULT_CHUNKS))
            delay = float(data.get("bench_delay_ms", 0))
            ttfc = float(data.get("bench_ttfc_ms", 0))
        except (ValueError, TypeError, AttributeError):
            return None
        if chunks < 0 or chunks > 100_000:
            return None
        if len(self._params) > 4096:
            self._params.clear()
        found = self._params[body] = (chunks, delay, ttfc)
        return found


class _EmulatorProtocol(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_busy",
        "_close",
        "_handle",
        "_i",
        "_loop",
        "_owner",
        "_plan",
        "_t0",
        "transport",
    )

    def __init__(self, owner: Emulator) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._buf = b""
        self._busy = False
        self._close = False
        self._plan: Plan | None = None
        self._i = 0
        self._t0 = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._owner._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._live.discard(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._serve()

    def _serve(self) -> None:
        """Answer every complete request in the buffer (one at a time while a stream runs)."""
        while not self._busy and self.transport is not None:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._reply(_BAD, close=True)
                return
            head = buf[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._reply(_BAD, close=True)
                    return
            elif b"\r\ntransfer-encoding:" in head:
                self._reply(_BAD, close=True)  # the benchmark's clients always send a length
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self._buf = buf[total:]
            close = b"\r\nconnection: close" in head
            line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
            method, _, rest = line.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method == b"post" and path.endswith(b"/chat/completions"):
                params = self._owner.params(body)
                if params is None:
                    self._reply(_BAD, close=close)
                else:
                    self._stream(self._owner.plan(*params), close)
            elif method == b"get" and path.endswith(b"/models"):
                self._reply(_MODELS, close=close)
            else:
                self._reply(_NOT_FOUND, close=close)

    def _reply(self, data: bytes, *, close: bool) -> None:
        if self.transport is not None:
            self.transport.write(data)
            if close:
                self.transport.close()

    def _stream(self, plan: Plan, close: bool) -> None:
        assert self.transport is not None
        self._owner.served += 1
        if close:
            self._busy = True  # nothing after this request is read
        if not plan.paced:
            self._reply(plan.whole, close=close)
            return
        self.transport.write(plan.head)
        self._busy = True
        self._close = close
        self._plan = plan
        self._i = 0
        self._t0 = self._loop.time() + plan.ttfc
        self._handle = self._loop.call_at(self._t0, self._tick)

    def _tick(self) -> None:
        plan = self._plan
        transport = self.transport
        if plan is None or transport is None:
            return
        segments = plan.segments
        n = len(segments)
        now = self._loop.time() + 1e-4
        i = self._i
        due = i
        while due < n and self._t0 + due * plan.delay <= now:
            due += 1
        if due == i:
            due = i + 1  # a timer never fires without writing
        transport.write(b"".join(segments[i:due]) if due - i > 1 else segments[i])
        self._i = due
        if due < n:
            self._handle = self._loop.call_at(self._t0 + due * plan.delay, self._tick)
            return
        self._handle = None
        self._plan = None
        if self._close:
            transport.close()
            return
        self._busy = False
        if self._buf:
            self._serve()


async def _serve_forever(host: str, port: int) -> None:
    emulator = Emulator(host, port)
    await emulator.start()
    print(f"bench upstream emulator on {emulator.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
