"""A TCP chaos proxy for fault-injection tests: gateway <-> ChaosProxy <-> upstream.

Raw asyncio, no HTTP library: every accepted connection (from the gateway) is paired with a new
connection to the real upstream, the request direction is forwarded untouched, and the response
direction (upstream -> gateway) goes through the connection's *fault*, chosen by the proxy's
policy when the connection is accepted:

* :class:`Pass` - forward as is,
* :class:`ResetAfter` - forward ``nbytes`` response bytes, then abort with a TCP RST (``SO_LINGER``
  0) towards the gateway,
* :class:`StallAfter` - forward ``nbytes`` response bytes, then forward nothing more (the upstream
  is not read either) until the gateway gives up, or ``limit`` seconds passed,
* :class:`Drip` - forward ``size`` bytes every ``interval`` seconds,
* :class:`RandomSplit` - forward in random pieces of 1..``max_piece`` bytes, each written and
  flushed separately,
* :class:`TruncateAfterEvent` - forward up to the end of the ``events``-th SSE event of a response
  (0: right after the HTTP response head), then close (FIN) both sides. The proxy de-chunks
  ``Transfer-Encoding: chunked`` to find the event boundaries (blank lines: LF, CRLF or CR).

Byte counts are per connection (a pooled keep-alive connection carries several responses; the
event count of :class:`TruncateAfterEvent` restarts with each response head). A policy is one
fault for every connection, or a callable ``(connection_index) -> fault``; :func:`mixed_policy`
draws a random fault per connection from a seeded generator.

The proxy counts connections on both sides (``downstream_*`` = accepted from the gateway,
``upstream_*`` = opened to the upstream; a connection counts as open until its socket is
closed) and the faults that actually fired (``injected``), so a test can assert that nothing
leaked after a run (``await proxy.wait_idle()``)::

    async with ChaosProxy(upstream_port, policy=TruncateAfterEvent(3)) as proxy:
        ...  # point the gateway at proxy.url
        await proxy.wait_idle(timeout=3)
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Final, TypeAlias

from tests.loopback import LoopbackService

__all__ = [
    "BoundaryTracker",
    "ChaosProxy",
    "Drip",
    "Fault",
    "Pass",
    "Policy",
    "RandomSplit",
    "ResetAfter",
    "StallAfter",
    "TruncateAfterEvent",
    "fault_name",
    "mixed_policy",
]

READ_SIZE: Final = 65536
CLOSE_TIMEOUT: Final = 5.0  # a graceful close that takes longer is turned into an abort


# --------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Pass:
    """Forward everything untouched."""


@dataclass(frozen=True)
class ResetAfter:
    """After ``nbytes`` response bytes, abort the gateway's connection with a RST."""

    nbytes: int


@dataclass(frozen=True)
class StallAfter:
    """After ``nbytes`` response bytes, go silent until the gateway leaves (at most ``limit`` s)."""

    nbytes: int
    limit: float = 10.0


@dataclass(frozen=True)
class Drip:
    """``size`` response bytes every ``interval`` seconds."""

    interval: float = 0.002
    size: int = 1


@dataclass(frozen=True)
class RandomSplit:
    """Response bytes in random pieces of 1..``max_piece`` bytes, each flushed on its own."""

    seed: int = 0
    max_piece: int = 64


@dataclass(frozen=True)
class TruncateAfterEvent:
    """Close both sides after the ``events``-th SSE event of a response (0: after the head)."""

    events: int


Fault: TypeAlias = Pass | ResetAfter | StallAfter | Drip | RandomSplit | TruncateAfterEvent
Policy: TypeAlias = Fault | Callable[[int], Fault]

_NAMES: Final[dict[type[Fault], str]] = {
    Pass: "pass",
    ResetAfter: "reset",
    StallAfter: "stall",
    Drip: "drip",
    RandomSplit: "split",
    TruncateAfterEvent: "truncate",
}


def fault_name(fault: Fault) -> str:
    return _NAMES[type(fault)]


def mixed_policy(
    seed: int,
    *,
    weights: Sequence[tuple[str, float]] = (
        ("pass", 4),
        ("split", 2),
        ("reset", 1),
        ("stall", 1),
        ("truncate", 2),
        ("drip", 0.3),
    ),
    max_bytes: int = 2500,
    max_events: int = 12,
    stall_limit: float = 10.0,
    drip_interval: float = 0.001,
    drip_sizes: Sequence[int] = (1, 3),
) -> Callable[[int], Fault]:
    """A policy drawing a random fault per connection (deterministic for a given ``seed``).

    ``max_bytes``/``max_events`` bound the random cut points (reset, stall, truncate); choose them
    around the size of a reply so that cuts land in the head, mid-body and past the end."""
    rng = random.Random(seed)
    names = [name for name, _ in weights]
    cum = [w for _, w in weights]

    def choose(index: int) -> Fault:
        (name,) = rng.choices(names, weights=cum)
        match name:
            case "pass":
                return Pass()
            case "split":
                return RandomSplit(seed=rng.randrange(1 << 30), max_piece=rng.choice((1, 7, 64)))
            case "reset":
                return ResetAfter(rng.randrange(max_bytes))
            case "stall":
                return StallAfter(rng.randrange(max_bytes), stall_limit)
            case "truncate":
                return TruncateAfterEvent(rng.randrange(max_events + 1))
            case "drip":
                return Drip(drip_interval, rng.choice(drip_sizes))
        raise ValueError(f"unknown fault name {name!r}")

    return choose


# ------------------------------------------------------------------------ SSE boundary tracking


class BoundaryTracker:
    """Sans-IO: where, in the raw bytes of a sequence of HTTP/1.1 responses, each response head
    ends (boundary 0) and each SSE event of its body ends (boundary k: after the blank line that
    closes the k-th event). ``feed(data)`` returns ``(offset_in_data, k)`` pairs, ``offset`` being
    the index just after the boundary. Chunked, ``Content-Length`` and read-until-close bodies."""

    _HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _UNTIL_CLOSE = range(7)

    def __init__(self) -> None:
        self._state = self._HEAD
        self._line = bytearray()  # the head so far, or the current size/trailer line
        self._remaining = 0
        self._events = 0
        # SSE scan state: chars in the current line, lines in the current block, last was CR.
        self._line_len = 0
        self._block_lines = 0
        self._after_cr = False

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == self._HEAD:
                self._line += data[i : i + 1]
                i += 1
                if self._line.endswith(b"\r\n\r\n"):
                    self._start_body(bytes(self._line))
                    self._line.clear()
                    found.append((i, 0))
            elif state in (self._SIZE, self._DATA_END, self._TRAILER):
                byte = data[i : i + 1]
                i += 1
                if byte != b"\n":
                    self._line += byte
                    continue
                line = bytes(self._line).strip()
                self._line.clear()
                if state == self._SIZE:
                    size = int(line.split(b";", 1)[0] or b"0", 16)
                    self._remaining = size
                    self._state = self._DATA if size else self._TRAILER
                elif state == self._DATA_END:
                    self._state = self._SIZE
                elif not line:  # the empty line after the trailers: the response is over
                    self._state = self._HEAD
            elif state in (self._DATA, self._LENGTH):
                take = min(self._remaining, n - i)
                found.extend(self._scan(data, i, i + take))
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END if state == self._DATA else self._HEAD
            else:  # _UNTIL_CLOSE
                found.extend(self._scan(data, i, n))
                i = n
        return found

    def _start_body(self, head: bytes) -> None:
        self._events = 0
        self._line_len = self._block_lines = 0
        self._after_cr = False
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 200
        if code < 200 or code in (204, 304):
            self._state = self._HEAD  # no body (1xx are followed by the real head)
        elif "chunked" in headers.get("transfer-encoding", ""):
            self._state = self._SIZE
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"] or "0")
            self._state = self._LENGTH if self._remaining else self._HEAD
        else:
            self._state = self._UNTIL_CLOSE

    def _scan(self, data: bytes, start: int, stop: int) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        for j in range(start, stop):
            c = data[j]
            if c == 0x0A and self._after_cr:  # the LF of a CRLF: the line already ended at CR
                self._after_cr = False
                if found and found[-1][0] == j:  # a boundary at that CR ends after this LF
                    found[-1] = (j + 1, found[-1][1])
                continue
            self._after_cr = c == 0x0D
            if c in (0x0A, 0x0D):
                if self._line_len == 0:
                    if self._block_lines:
                        self._events += 1
                        self._block_lines = 0
                        found.append((j + 1, self._events))
                else:
                    self._block_lines += 1
                self._line_len = 0
            else:
                self._line_len += 1
        return found


# ---------------------------------------------------------------------------------- the proxy


@dataclass(eq=False)
class _Conn:
    index: int
    fault: Fault
    down_reader: asyncio.StreamReader
    down_writer: asyncio.StreamWriter
    up_writer: asyncio.StreamWriter | None = None
    sent: int = 0  # response bytes forwarded to the gateway
    fired: bool = False


class ChaosProxy(LoopbackService):
    """Listen on 127.0.0.1:0, forward to ``upstream_host:upstream_port`` through faults."""

    def __init__(
        self,
        upstream_port: int,
        *,
        policy: Policy = Pass(),
        upstream_host: str = "127.0.0.1",
        backlog: int = 1024,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.policy = policy
        self.backlog = backlog
        self.downstream_open = 0
        self.downstream_total = 0
        self.upstream_open = 0
        self.upstream_total = 0
        self.upstream_connect_errors = 0
        self.injected: Counter[str] = Counter()  # faults that fired, by name
        self.assigned: Counter[str] = Counter()  # faults assigned to connections, by name
        self.handler_errors = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._waiters: list[asyncio.Future[None]] = []

    # -- lifecycle

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("ChaosProxy already started")
        self._server = await asyncio.start_server(
            self._on_connect, "127.0.0.1", 0, backlog=self.backlog
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, abort every connection still open, wait for the handlers."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            conn.down_writer.transport.abort()
            if conn.up_writer is not None:
                conn.up_writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def open_connections(self) -> int:
        """Sockets not yet closed, both sides together."""
        return self.downstream_open + self.upstream_open

    @property
    def faults_injected(self) -> int:
        return sum(n for name, n in self.injected.items() if name != "pass")

    async def wait_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until no connection is open on either side; ``TimeoutError`` after ``timeout``."""
        async with asyncio.timeout(timeout):
            while self.open_connections or self._tasks:
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

    def _choose(self, index: int) -> Fault:
        return self.policy(index) if callable(self.policy) else self.policy

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback so the task is tracked before it runs (nothing escapes stop()).
        index = self.downstream_total
        self.downstream_total += 1
        self.downstream_open += 1
        fault = self._choose(index)
        self.assigned[fault_name(fault)] += 1
        conn = _Conn(index, fault, reader, writer)
        self._conns.add(conn)
        task = asyncio.get_running_loop().create_task(self._handle(conn))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._notify()

        task.add_done_callback(done)

    async def _handle(self, conn: _Conn) -> None:
        up_writer: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task[None]] = []
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                self.upstream_connect_errors += 1
                conn.down_writer.transport.abort()
                return
            self.upstream_open += 1
            self.upstream_total += 1
            conn.up_writer = up_writer
            # Exact cut points: a drain returns only once the transport buffer is empty.
            conn.down_writer.transport.set_write_buffer_limits(high=0)
            loop = asyncio.get_running_loop()
            request = loop.create_task(self._pump_request(conn.down_reader, up_writer))
            response = loop.create_task(self._pump_response(conn, up_reader))
            pumps = [request, response]
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if request not in done and self._stalled(conn):
                # Stalled: keep both sockets open until the gateway leaves or the limit.
                assert isinstance(conn.fault, StallAfter)
                with suppress(TimeoutError):
                    async with asyncio.timeout(conn.fault.limit):
                        await asyncio.shield(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.handler_errors += 1
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with suppress(BaseException):
                    await pump
            await self._close(conn.down_writer)
            self.downstream_open -= 1
            if up_writer is not None:
                await self._close(up_writer)
                self.upstream_open -= 1
            self._conns.discard(conn)
            self._notify()

    @staticmethod
    def _stalled(conn: _Conn) -> bool:
        return isinstance(conn.fault, StallAfter) and conn.fired

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        if not writer.transport.is_closing():
            writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()
        except (TimeoutError, asyncio.CancelledError):
            writer.transport.abort()
            with suppress(Exception):
                await writer.wait_closed()
        except Exception:  # reset by the peer: closed all the same
            writer.transport.abort()

    @staticmethod
    async def _pump_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Gateway -> upstream, untouched; returns when the gateway closes or resets."""
        with suppress(ConnectionError, OSError):
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()

    async def _pump_response(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Upstream -> gateway through the fault; returns at EOF or when the fault ended it."""
        fault = conn.fault
        writer = conn.down_writer
        tracker = BoundaryTracker() if isinstance(fault, TruncateAfterEvent) else None
        rng = random.Random(fault.seed) if isinstance(fault, RandomSplit) else None
        try:
            while data := await reader.read(READ_SIZE):
                match fault:
                    case Pass():
                        await self._write(conn, data)
                    case ResetAfter(nbytes) | StallAfter(nbytes):
                        room = nbytes - conn.sent
                        if room > len(data):
                            await self._write(conn, data)
                            continue
                        await self._write(conn, data[: max(room, 0)])
                        self._fire(conn)
                        if isinstance(fault, ResetAfter):
                            self._reset(writer)
                        return  # stall: _handle keeps the sockets open
                    case Drip(interval, size):
                        self._fire(conn)
                        for i in range(0, len(data), max(size, 1)):
                            await self._write(conn, data[i : i + max(size, 1)])
                            await asyncio.sleep(interval)
                    case RandomSplit(_, max_piece):
                        assert rng is not None
                        self._fire(conn)
                        i = 0
                        while i < len(data):
                            step = rng.randint(1, max(max_piece, 1))
                            await self._write(conn, data[i : i + step])
                            await asyncio.sleep(0)
                            i += step
                    case TruncateAfterEvent(events):
                        assert tracker is not None
                        cut = next((off for off, k in tracker.feed(data) if k == events), None)
                        if cut is None:
                            await self._write(conn, data)
                            continue
                        await self._write(conn, data[:cut])
                        self._fire(conn)
                        return  # _handle closes both sides (FIN)
        except (ConnectionError, OSError):
            pass  # either side went away: _handle closes the other

    async def _write(self, conn: _Conn, data: bytes) -> None:
        if not data:
            return
        conn.down_writer.write(data)
        await conn.down_writer.drain()
        conn.sent += len(data)

    def _fire(self, conn: _Conn) -> None:
        if not conn.fired:
            conn.fired = True
            self.injected[fault_name(conn.fault)] += 1

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
