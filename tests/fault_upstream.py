"""Fault-injecting fake DeepSeek upstream for the gateway's end-to-end tests.

Unlike ``mock_upstream`` (an aiohttp.web app), this server is written on raw asyncio streams so a
test has byte-level control over what goes on the wire: bodies truncated mid-chunk, TCP resets,
one-byte writes that split multibyte UTF-8 characters across TCP segments, hangs, and so on.

Every accepted connection serves exactly one request (every response carries
``Connection: close``).  The response is driven by a *script*, a tuple of steps:

* :class:`Head` - status line and headers (chunked or not),
* :class:`Send` - body bytes, optionally written in ``split``-byte pieces,
* :class:`Sleep` - pause (cut short when the client goes away),
* :class:`End` - finish the body properly and close,
* :class:`Close` - close the connection without finishing the body,
* :class:`Reset` - abort the connection with a TCP RST,
* :class:`Hang` - send nothing more and wait for the client to leave (at most ``hang_limit``).

A script that runs out of steps without a terminal step ends as if :class:`End` came next.  A
:class:`Send` before any :class:`Head` writes its bytes raw, which allows malformed responses.

Which script answers a request: a route (``route(key, script)``) when the request's JSON body has
``"fault": key``; else the next queued script (``queue(...)``); else the server's ``default``.

Example::

    async with FaultUpstream() as up:
        up.queue(sse_script(text_events(["Hé", "llo"]), split=1, end=Close()))
        ...  # point the gateway at up.url and make a request
        await up.wait_client_disconnect()
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import Any, Final, Literal, TypeAlias

from tests.loopback import LoopbackService

__all__ = [
    "DONE",
    "Close",
    "End",
    "FaultUpstream",
    "Hang",
    "Head",
    "RecordedRequest",
    "Reset",
    "Script",
    "Send",
    "Sleep",
    "Step",
    "chunk",
    "json_response",
    "sse_script",
    "text_events",
]

logger = logging.getLogger(__name__)

SSE_HEADERS: Final[tuple[tuple[str, str], ...]] = (("Content-Type", "text/event-stream"),)
HANG_LIMIT: Final = 60.0  # default upper bound for Hang, seconds
REQUEST_TIMEOUT: Final = 30.0  # how long a connection may take to deliver its request
CLOSE_TIMEOUT: Final = 5.0  # how long a graceful close may take before the socket is aborted


# --------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Head:
    """Status line and headers.  ``Connection: close`` is always added (unless given here), and
    ``Transfer-Encoding: chunked`` when ``chunked`` (unless given here)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = SSE_HEADERS
    chunked: bool = True


@dataclass(frozen=True)
class Send:
    """Body bytes.  ``split > 0`` writes them in pieces of ``split`` bytes (one chunk frame each
    when chunked), draining and yielding to the loop after each piece."""

    data: bytes
    split: int = 0


@dataclass(frozen=True)
class Sleep:
    """Pause for ``seconds``; a client disconnect during the pause ends the script."""

    seconds: float


@dataclass(frozen=True)
class End:
    """Finish the body (chunked terminator, or nothing when not chunked) and close."""


@dataclass(frozen=True)
class Close:
    """Close the TCP connection (FIN) without finishing the body."""


@dataclass(frozen=True)
class Reset:
    """Abort the TCP connection with a RST (``SO_LINGER`` 0)."""


@dataclass(frozen=True)
class Hang:
    """Send nothing more; wait until the client goes away (at most ``hang_limit`` seconds,
    after which the connection is closed like :class:`Close`)."""


Step: TypeAlias = Head | Send | Sleep | End | Close | Reset | Hang
Script: TypeAlias = tuple[Step, ...]

_END: Final = End()


# ------------------------------------------------------------------------------ script helpers

DONE: Final = b"data: [DONE]\n\n"


class _Auto(Enum):
    AUTO = "auto"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> Script:
    """A complete non-chunked JSON response (with ``Content-Length``)."""
    body = _dumps(obj)
    head = Head(
        status,
        (
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *headers,
        ),
        chunked=False,
    )
    return (head, Send(body), End())


def sse_script(
    events: Sequence[bytes], *, end: Step = _END, split: int = 0, delay: float = 0.0
) -> Script:
    """``Head`` (200, SSE, chunked), one ``Send`` per event (``Sleep(delay)`` between events when
    ``delay > 0``), then ``end``."""
    steps: list[Step] = [Head()]
    for i, event in enumerate(events):
        if i and delay > 0:
            steps.append(Sleep(delay))
        steps.append(Send(event, split))
    steps.append(end)
    return tuple(steps)


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    usage: Mapping[str, Any] | None = None,
    id: str = "up-1",
    model: str = "deepseek-chat",
    created: int = 1700000000,
    reasoning: str | None = None,
    choices: bool = True,
    logprobs: Mapping[str, Any] | None = None,
) -> bytes:
    """One DeepSeek ``chat.completion.chunk`` SSE event: ``data: {json}\\n\\n``.

    The delta holds ``role`` / ``content`` / ``reasoning_content`` (only those given);
    ``choices=False`` gives ``"choices": []`` (a usage-only chunk); ``logprobs`` is the
    choice's ``logprobs`` as sent."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    obj: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_fault",
        "choices": (
            [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
            if choices
            else []
        ),
        "usage": dict(usage) if usage is not None else None,
    }
    return b"data: " + _dumps(obj) + b"\n\n"


def text_events(
    tokens: Sequence[str],
    *,
    usage: Mapping[str, Any] | Literal[_Auto.AUTO] | None = _Auto.AUTO,
    finish_reason: str = "stop",
    done: bool = True,
) -> list[bytes]:
    """A normal text stream: role chunk, one chunk per token, finish chunk, ``[DONE]``.

    ``usage`` defaults to ``{"prompt_tokens": 5, "completion_tokens": len(tokens),
    "total_tokens": 5 + len(tokens)}`` on the finish chunk; ``None`` leaves it out."""
    if usage is _Auto.AUTO:
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": len(tokens),
            "total_tokens": 5 + len(tokens),
        }
    events = [chunk("", role="assistant")]
    events.extend(chunk(token) for token in tokens)
    events.append(chunk("", finish_reason=finish_reason, usage=usage))
    if done:
        events.append(DONE)
    return events


# ---------------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received (``received_at`` is loop time once the body was read)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float


class _BadRequest(Exception):
    pass


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    chunked: bool = False
    head_sent: bool = False
    counted: bool = False  # client disconnect already counted
    finished: bool = False  # bookkeeping done (connections_open decremented)


class FaultUpstream(LoopbackService):
    """Fake upstream on 127.0.0.1 whose responses follow scripts (see the module docstring)."""

    def __init__(
        self, default: Script | None = None, *, hang_limit: float = HANG_LIMIT, backlog: int = 2048
    ) -> None:
        self.default: Script = (
            default if default is not None else sse_script(text_events(["Hello", " world"]))
        )
        self.hang_limit = hang_limit
        # a burst of connects must not overflow the accept queue (asyncio's default is 100)
        self.backlog = backlog
        self.requests: list[RecordedRequest] = []
        self.connections_open = 0
        self.connections_total = 0
        self.client_disconnects = 0
        self.handler_errors = 0  # unexpected exceptions inside connection handlers
        self._queue: deque[Script] = deque()
        self._routes: dict[str, Script] = {}
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._stopping = False
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []

    # -- lifecycle

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        if self._server is not None:
            raise RuntimeError("FaultUpstream already started")
        self._stopping = False
        self._server = await asyncio.start_server(
            self._on_connect, "127.0.0.1", 0, backlog=self.backlog
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, drop every open connection and wait for all tasks.  Idempotent."""
        server, self._server = self._server, None
        self._stopping = True
        if server is not None:
            server.close()
        conns = list(self._conns)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            self._finish(conn)
            await self._wait_closed(conn.writer)
        if server is not None:
            await server.wait_closed()

    # -- scripting

    def queue(self, *scripts: Script) -> None:
        """The next requests get these scripts, in order; after them, ``default``."""
        self._queue.extend(scripts)

    def route(self, key: str, script: Script) -> None:
        """Requests whose JSON body has ``"fault": key`` get ``script`` (every time; before the
        queue, which they do not consume)."""
        self._routes[key] = script

    # -- waiting

    async def wait_client_disconnect(self, count: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``client_disconnects >= count``; ``TimeoutError`` after ``timeout``."""
        await self._wait_until(lambda: self.client_disconnects >= count, timeout)

    async def wait_requests(self, count: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``len(requests) >= count``; ``TimeoutError`` after ``timeout``."""
        await self._wait_until(lambda: len(self.requests) >= count, timeout)

    async def _wait_until(self, predicate: Callable[[], bool], limit: float) -> None:
        async with asyncio.timeout(limit):
            while not predicate():
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    with suppress(ValueError):
                        self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- connections

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so the task is tracked before it ever runs.
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self.connections_open += 1
        self.connections_total += 1
        if self._stopping:
            self._finish(conn)
            return
        task = asyncio.get_running_loop().create_task(self._handle(conn))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._finish(conn)  # in case the task was cancelled before it started

        task.add_done_callback(done)

    def _finish(self, conn: _Conn) -> None:
        """Bookkeeping for a connection that is over; aborts its transport if still open."""
        if conn.finished:
            return
        conn.finished = True
        if not conn.writer.transport.is_closing():
            conn.writer.transport.abort()
        self._conns.discard(conn)
        self.connections_open -= 1
        self._notify()

    @staticmethod
    async def _wait_closed(writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
            with suppress(Exception):
                await writer.wait_closed()
        except ConnectionError:
            pass  # the peer reset the connection: it is closed all the same
        except Exception:
            logger.debug("fault upstream: error while closing", exc_info=True)

    async def _handle(self, conn: _Conn) -> None:
        monitor: asyncio.Task[None] | None = None
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await self._read_request(conn)
            except _BadRequest as exc:
                logger.debug("fault upstream: bad request: %s", exc)
                body = str(exc).encode()
                conn.writer.write(
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                with suppress(ConnectionError):
                    await conn.writer.drain()
                return
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                logger.debug("fault upstream: no complete request", exc_info=True)
                return
            if request is None:
                return
            self.requests.append(request)
            self._notify()
            script = self._choose(request)
            monitor = asyncio.get_running_loop().create_task(self._monitor(conn))
            self._tasks.add(monitor)
            monitor.add_done_callback(self._tasks.discard)
            await self._run(conn, script)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.handler_errors += 1
            logger.debug("fault upstream: connection handler failed", exc_info=True)
        finally:
            if monitor is not None:
                monitor.cancel()
                with suppress(asyncio.CancelledError):
                    await monitor
            if not conn.writer.transport.is_closing():
                if self._stopping:
                    conn.writer.transport.abort()
                else:
                    conn.writer.close()
            await self._wait_closed(conn.writer)
            self._finish(conn)

    async def _monitor(self, conn: _Conn) -> None:
        """Read (and discard) until the client closes or resets; then set ``conn.gone``."""
        try:
            while await conn.reader.read(65536):
                pass
        except Exception:
            logger.debug("fault upstream: client read failed", exc_info=True)
        finally:
            conn.gone.set()

    def _client_left(self, conn: _Conn) -> None:
        if not conn.counted and not self._stopping:
            conn.counted = True
            self.client_disconnects += 1
            self._notify()

    # -- request

    async def _read_request(self, conn: _Conn) -> RecordedRequest | None:
        reader = conn.reader
        line = await reader.readline()
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLFs before the request line
            line = await reader.readline()
        if not line:
            return None
        try:
            method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
        except ValueError:
            raise _BadRequest(f"malformed request line {line!r}") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(f"unsupported version {version!r}")
        headers = await self._read_headers(reader)
        if headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.writer.drain()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _BadRequest("bad Content-Length") from None
            if length < 0:
                raise _BadRequest("bad Content-Length")
            body = await reader.readexactly(length)
        parsed: Any = None
        if body:
            with suppress(ValueError):
                parsed = json.loads(body)
        return RecordedRequest(
            method=method,
            path=target,
            headers=headers,
            body=body,
            json=parsed,
            received_at=asyncio.get_running_loop().time(),
        )

    @staticmethod
    async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            if line in (b"\r\n", b"\n"):
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(f"malformed header line {line!r}")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

    @classmethod
    async def _read_chunked(cls, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(f"bad chunk size line {line!r}") from None
            if size == 0:
                await cls._read_headers(reader)  # trailers
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            if await reader.readline() not in (b"\r\n", b"\n"):
                raise _BadRequest("chunk not followed by CRLF")

    def _choose(self, request: RecordedRequest) -> Script:
        body = request.json
        if isinstance(body, dict):
            key = body.get("fault")
            if isinstance(key, str) and key in self._routes:
                return self._routes[key]
        if self._queue:
            return self._queue.popleft()
        return self.default

    # -- response

    async def _run(self, conn: _Conn, script: Script) -> None:
        for step in script:
            match step:
                case Head():
                    if conn.head_sent:
                        raise ValueError("script has a second Head")
                    if not await self._write(conn, self._head_bytes(step), 0):
                        self._client_left(conn)
                        return
                    conn.head_sent = True
                    conn.chunked = step.chunked
                case Send():
                    if step.data and not await self._write(conn, step.data, step.split):
                        self._client_left(conn)
                        return
                case Sleep():
                    if await self._wait_gone(conn, step.seconds):
                        self._client_left(conn)
                        return
                case End():
                    await self._end(conn)
                    return
                case Close():
                    conn.writer.close()
                    return
                case Reset():
                    self._reset(conn)
                    return
                case Hang():
                    if await self._wait_gone(conn, self.hang_limit):
                        self._client_left(conn)
                    return
        await self._end(conn)

    @staticmethod
    def _head_bytes(head: Head) -> bytes:
        try:
            reason = HTTPStatus(head.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {head.status} {reason}"]
        names = {name.lower() for name, _ in head.headers}
        lines.extend(f"{name}: {value}" for name, value in head.headers)
        if head.chunked and "transfer-encoding" not in names:
            lines.append("Transfer-Encoding: chunked")
        if "connection" not in names:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write(self, conn: _Conn, data: bytes, split: int) -> bool:
        """Write ``data`` (framed as chunks when the body is chunked); False if the client left."""
        step = split if split > 0 else max(len(data), 1)
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        framed = conn.chunked and conn.head_sent
        for i, piece in enumerate(pieces):
            if conn.gone.is_set() or conn.writer.transport.is_closing():
                return False
            conn.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framed else piece)
            try:
                await conn.writer.drain()
            except ConnectionError:
                return False
            if i + 1 < len(pieces):
                await asyncio.sleep(0)
        return True

    async def _wait_gone(self, conn: _Conn, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as the client has gone away."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await conn.gone.wait()
        except TimeoutError:
            return conn.gone.is_set()
        return True

    async def _end(self, conn: _Conn) -> None:
        # The body's content is all out; a client leaving now is not counted as a disconnect.
        if conn.chunked and conn.head_sent and not conn.writer.transport.is_closing():
            conn.writer.write(b"0\r\n\r\n")
            with suppress(ConnectionError):
                await conn.writer.drain()
        conn.writer.close()

    @staticmethod
    def _reset(conn: _Conn) -> None:
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()


def token_logprobs(token: str, logprob: float = -0.25) -> dict[str, Any]:
    """A chunk's ``logprobs`` for one answer token, as DeepSeek sends them when asked."""
    entry = {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
    return {"content": [entry]}
