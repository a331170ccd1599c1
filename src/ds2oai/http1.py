"""The upstream's HTTP/1.1 client: a keep-alive pool of asyncio protocols parsed by httptools.

Used only by `upstream.py`, the chain's innermost handler; it knows nothing of the chain, of
SSE or of DeepSeek. It sends one request per connection at a time, reads the answer's body as
it arrives, and hands a connection back to the pool only after a complete answer.

Why not aiohttp's client (the measurements are in docs/decisions.md): per streamed answer it
built a request object, a response object, a stream reader, timers per read and a resume per
HTTP chunk; that was most of the gap between the gateway and a byte pipe. This client does the
few things the upstream call needs and nothing else:

- `connect_timeout` bounds waiting for a pool slot, DNS, TCP and TLS together;
- `read_timeout` bounds silence: from the request to the head, then between body reads, while
  somebody waits for bytes (one timer per connection, moved lazily rather than re-created);
- gzip / deflate bodies are inflated on read, in slices, so a small body cannot inflate into
  an unbounded buffer; reading from the socket pauses while unread bytes pile up;
- a connection goes back to the pool only after a complete answer the server let live;
- a reader may instead have the body handed to a callback from the connection's own read
  callback, read by read (`Response.splice`), until the callback declines one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "Disconnected",
    "HTTPClientError",
    "Pool",
    "ReadTimeout",
    "Response",
]

log = logging.getLogger("ds2oai.http1")

_HIGH_WATER = 256 * 1024  # unread body bytes that pause reading from the socket
_INFLATE_SLICE = 64 * 1024  # the most inflated bytes one read returns
# Timers fire up to a millisecond early on uvloop (it rounds to whole milliseconds).
_CLOCK_SLACK = 0.001
_ACCEPT_ENCODING = b"Accept-Encoding: gzip, deflate\r\n"
# HEAD's answers have no body whatever their headers say; nothing here sends one.
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HTTPClientError(Exception):
    """Base of this module's errors."""


class ConnectError(HTTPClientError):
    """No connection: DNS, TCP or TLS failed (`os_error` says how)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(HTTPClientError):
    """No connection (or no free pool slot) within `connect_timeout`."""


class PoolTimeout(ConnectTimeout):
    """No free slot of the pool's own `limit` within `connect_timeout`: the client is busy,
    nothing is known about the server (no connection to it was tried)."""


class ReadTimeout(HTTPClientError):
    """The server said nothing for `read_timeout` while an answer was awaited."""


class Disconnected(HTTPClientError):
    """The connection ended or broke before the answer did (or spoke something not HTTP)."""


class _Excess(Exception):
    """Raised from a parser callback to stop it at bytes beyond a complete answer."""


@dataclass(frozen=True, slots=True)
class _Origin:
    key: tuple[str, str, int]  # scheme, host, port: what a pooled connection is good for
    host: str
    port: int
    tls: bool
    target: bytes  # path and query, as sent in the request line
    host_header: bytes


@lru_cache(maxsize=64)
def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isascii() or any(c <= " " or c == "\x7f" for c in target):
        raise ValueError(f"URL path must be ASCII without spaces: {url!r}")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        shown = f"{shown}:{port}"
    return _Origin(
        (parts.scheme, host, port), host, port, tls, target.encode("ascii"), shown.encode("idna")
    )


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_good_names: set[str] = set()  # names already checked (the same few, request after request)


def _head(
    method: str, origin: _Origin, headers: Iterable[tuple[str, str]], length: int | None
) -> bytes:
    if method not in _METHODS:
        raise ValueError(f"unsupported method {method!r}")
    lines = [method.encode(), b" ", origin.target, b" HTTP/1.1\r\nHost: ", origin.host_header]
    lines.append(b"\r\n")
    for name, value in headers:
        if name not in _good_names:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if len(_good_names) < 256:  # a middleware may invent names: stay bounded
                _good_names.add(name)
        if _BAD_VALUE.search(value):
            raise ValueError(f"invalid header value for {name!r}")
        if name.lower() == "accept-encoding":
            continue  # what the body may be compressed with is this module's to say
        lines.append(f"{name}: {value}\r\n".encode())
    lines.append(_ACCEPT_ENCODING)
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer currently read from it."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self._pool = pool
        self._loop = pool._loop
        self.key = key
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # The parser calls on_body once per HTTP chunk (DeepSeek: one per event); binding it
        # to the list's own append saves a Python call each time. The list lives as long as
        # the connection and is cleared in place.
        self._parts: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self._parts.append
        # Bytes before the first request is written (an overloaded server's instant 503):
        # kept for the parser. Later out-of-turn bytes make the connection unusable.
        self._early: list[bytes] | None = []
        self._lost_with: Exception | None = None
        self.uses = 0  # requests sent on it
        self._closed_here = False  # close() was called (rather than the server closing)
        self._reset(None)

    def _reset(self, read_timeout: float | None) -> None:
        self._parser: httptools.HttpResponseParser | None = None
        self._read_timeout = read_timeout
        self._status = 0
        self._headers: dict[str, str] = {}
        self._head_done = False
        self._delimited = False  # Content-Length or chunked: EOF before the end is an error
        self._keep_alive = False
        self._complete = False
        self._error: HTTPClientError | None = None
        self._parts.clear()
        self._size = 0  # bytes received and not yet read (with chunk framing: close enough)
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._tap: Callable[[bytes], bool] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if self._early is not None:
                self._early.append(data)
            else:  # nothing asked: a server talking out of turn is not reusable
                self.close()
            return
        self._size += len(data)
        try:
            parser.feed_data(data)
        # An upgrade (101) is not a subclass of the parser's error: not an answer we can read.
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # on_message_begin's _Excess included
            if not self._complete:
                self._fail(Disconnected(f"invalid HTTP from the upstream ({exc})"))
            self._keep_alive = False
            self._close_transport()
            return
        if self._head_done:
            # The read timeout is silence between reads once the head is in; until then it
            # counts from the request (`send`), so a head trickled in byte by byte still
            # ends within the read timeout.
            self._last_data = self._loop.time()
        tap = self._tap
        if tap is not None:
            parts = self._parts
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                try:
                    taken = tap(data)
                except Exception:
                    # Declined instead: the reader's task meets the same bytes on its usual
                    # path, where a failure is handled and answered as such.
                    log.warning("a splice tap failed; its reader takes the bytes", exc_info=True)
                    taken = False
                if taken:
                    parts.clear()
                    self._size = 0
            if not parts and not self._complete:
                return  # taken, or only chunk framing came: the spliced reader sleeps on
        # Left here: bytes the tap declined, the end, or a plain reader's bytes.
        if self._size > _HIGH_WATER and not self._head_done:
            # Only a read resumes a paused socket, and nothing reads before the head is in.
            self._fail(Disconnected(f"the upstream's response head is over {_HIGH_WATER} bytes"))
            self._keep_alive = False
            self._close_transport()
            return
        if self._size > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        if self._waiter is not None and (self._parts or self._complete or self._head_done):
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._lost_with = exc
        if self._parser is not None:
            self._ended()
        self._cancel_timer()
        self._wake()
        self._pool._lost(self)

    def _ended(self) -> None:
        """The connection is gone: what that means for the answer being read."""
        if self._complete or self._error is not None:
            return
        exc = self._lost_with
        if self._head_done and not self._delimited and exc is None:
            self._complete = True  # a body delimited by the end of the connection (FIN)
            self._keep_alive = False
        else:
            reason = f": {exc}" if exc is not None else ""
            self._error = Disconnected(f"the upstream closed the connection{reason}")

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        # Anything after a complete answer would parse as a second one: stop the parser
        # before it adds to the first answer's body; such a server gets no further request.
        if self._complete:
            raise _Excess

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # trailers: the head (already handed out) stays as it was
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer; the real one follows
            self._headers = {}
            return
        self._status = status
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        headers = self._headers
        self._delimited = "content-length" in headers or "transfer-encoding" in headers

    def on_message_complete(self) -> None:
        if self._head_done:
            self._complete = True

    # -- used by Pool and Response ----------------------------------------------------------

    def send(self, data: bytes, read_timeout: float | None) -> None:
        self._cancel_timer()  # none should be left (park cancels it), but a stray one would
        self._reset(read_timeout)  # fire into this answer's state
        self.uses += 1
        self._parser = httptools.HttpResponseParser(self)
        self._last_data = self._loop.time()  # the head's wait counts from the request
        if self._transport is not None:
            self._transport.write(data)
        early, self._early = self._early, None
        if early:
            self.data_received(b"".join(early))
        if self.closed:  # it answered (or not) and closed before the request went out
            self._ended()

    async def head(self) -> tuple[int, dict[str, str]]:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._status, self._headers

    async def read(self) -> bytes:
        """Body bytes as they arrived (possibly several network reads'); b"" at the end."""
        while True:
            parts = self._parts
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
                self._size = 0
                if self._paused and self._transport is not None:
                    self._paused = False
                    # Silence counts from now: the server could not send while paused (input
                    # already waiting is delivered before a due timer on both loops; this is
                    # for a pause long enough to have drained the server's side too).
                    self._last_data = self._loop.time()
                    self._transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    @property
    def closed_unanswered_after_reuse(self) -> bool:
        # Closed by the server (not by close()), and not a byte of answer (nothing is read
        # while waiting for the head, so none arrived).
        return (
            self.uses > 1
            and self.closed
            and not self._closed_here
            and self._size == 0
            and not self._head_done
        )

    @property
    def closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    @property
    def reusable(self) -> bool:
        # Unread body bytes do not matter: the answer is whole, its reader is done with it.
        return self._complete and self._keep_alive and not self.closed

    def park(self) -> None:
        """Between answers: no timer, no parser, nothing buffered, reading on."""
        self._cancel_timer()
        self._parser = None
        self._tap = None
        self._parts.clear()
        self._size = 0
        if self._paused:  # a whole answer left mostly unread had paused the socket
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def close(self) -> None:
        self._closed_here = True
        if self._error is None and not self._complete:
            self._error = Disconnected("the connection was closed")
        self._keep_alive = False
        self._close_transport()
        self._wake()

    # -- internals --------------------------------------------------------------------------

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _fail(self, error: HTTPClientError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def splice(self, tap: Callable[[bytes], bool]) -> asyncio.Future[None] | None:
        """See `Response.splice`."""
        if self._parts or self._complete or self._error is not None or self._paused:
            return None
        self._tap = tap
        return self._wait()  # armed like a read's: the read timeout runs

    def unsplice(self) -> None:
        self._tap = None
        self._waiter = None  # resolved already, or cancelled: nobody waits on it now

    def _wake(self) -> None:
        self._tap = None  # whoever waited takes over from the tap (see splice)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wait(self) -> asyncio.Future[None]:
        waiter = self._loop.create_future()
        self._waiter = waiter
        if self._read_timeout is not None and self._timer is None:
            self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._on_timer)
        return waiter

    def _on_timer(self) -> None:
        # Data moves the deadline without touching the timer: when it fires early, it re-arms
        # for the rest; with nobody waiting it lapses and the next wait arms it again.
        self._timer = None
        if self._waiter is None or self._read_timeout is None or self._complete:
            return
        deadline = self._last_data + self._read_timeout
        if self._loop.time() + _CLOCK_SLACK < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail(ReadTimeout(f"no data for {self._read_timeout:g} s"))
        self._keep_alive = False
        self._close_transport()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Response:
    """One answer: status, lower-cased headers, and its body through `read()`."""

    __slots__ = ("_conn", "_done", "_inflate", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._pool = pool
        self._conn = conn
        self._done = False
        self.status = status
        self.headers = headers
        encoding = headers.get("content-encoding", "").strip().lower()
        self._inflate: _Inflater | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = _Inflater(conn, encoding)

    @property
    def ready(self) -> bool:
        """Whether `read()` has bytes to return at once (plain bodies; a compressed one says
        False, as it may inflate to nothing yet)."""
        return not self._done and self._inflate is None and bool(self._conn._parts)

    def read(self) -> Awaitable[bytes]:
        """The next body bytes as they arrive; b"" after the last.

        Raises `ReadTimeout` (silence), `Disconnected` (cut, closed, or undecodable; also after
        `release()` or `close()`). Safe to cancel: nothing read is lost, the next call returns it.
        Not `async def`: it hands out the connection's (or inflater's) read, one coroutine less
        per read on the hot path.
        """
        if self._done:
            raise Disconnected("the answer was closed")
        if self._inflate is not None:
            return self._inflate.read()
        return self._conn.read()

    def splice(self, tap: Callable[[bytes], bool]) -> asyncio.Future[None] | None:
        """Hand the body to `tap` from the connection's own read callback, read by read.

        `tap(data)` returns True when it took the bytes (they are gone) or False to decline
        them, which ends the splice with the bytes left for `read()`; so does the end of the
        answer, a failure, `close()` or the read timeout (the next `read()` then says which).
        The returned future resolves when the splice ends; its waiter must call `unsplice()`
        after it, cancelled or not. None when there is nothing to splice: bytes already wait
        for `read()`, the answer is over, compressed, or reading is paused.

        Why: a paced stream sends one event per network read. Taking each on the callback
        spares a future, a task step and the resumption of the reader's await chain per event.
        """
        if self._done or self._inflate is not None:
            return None
        return self._conn.splice(tap)

    def unsplice(self) -> None:
        """End a splice (idempotent): from now on bytes wait for `read()` again."""
        if not self._done:
            self._conn.unsplice()

    def release(self) -> None:
        """Done with it: back to the pool if the whole answer is in (read or not), else close.

        DeepSeek sends `[DONE]` and the chunked terminator together, so a reader that stops at
        `[DONE]` still leaves a reusable connection; if the answer is not whole, the server
        is still sending, and closing is what stops it.
        """
        if not self._done:
            self._done = True
            self._pool._release(self._conn)

    def close(self) -> None:
        """Drop the connection (the server sees it close and stops), even if reusable."""
        if not self._done:
            self._done = True
            self._conn.close()


class _Inflater:
    """gzip / deflate bodies inflated a slice at a time, as the reader asks for them."""

    __slots__ = ("_conn", "_decoder", "_fed", "_raw_tried", "_tail")

    def __init__(self, conn: _Connection, encoding: str) -> None:
        self._conn = conn
        # 47: a gzip or zlib header, detected. "deflate" means the zlib format (RFC 9110
        # 8.4.1.2); some servers send raw deflate under that name, tried when zlib's fails.
        self._decoder = zlib.decompressobj(47)
        self._raw_tried = encoding != "deflate"
        self._fed = False  # any compressed byte: an empty body (204) inflates to nothing
        self._tail = b""

    async def read(self) -> bytes:
        while True:
            if not self._tail:
                data = await self._conn.read()
                if not data:
                    if not self._fed or self._decoder.eof:
                        return b""
                    try:  # output zlib still holds (a slice ended mid-copy)
                        rest = self._decoder.flush()
                    except zlib.error as exc:
                        raise Disconnected(f"undecodable body ({exc})") from None
                    if not self._decoder.eof:
                        raise Disconnected("truncated compressed body")
                    return rest
                self._tail = data
            decoder = self._decoder
            try:
                out = decoder.decompress(self._tail, _INFLATE_SLICE)
            except zlib.error as exc:
                if self._fed or self._raw_tried:
                    raise Disconnected(f"undecodable body ({exc})") from None
                self._raw_tried = True
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._fed = True
            self._tail = decoder.unconsumed_tail
            if decoder.eof:
                rest = decoder.unused_data
                if rest.strip(b"\0"):  # another gzip member follows (RFC 1952 2.2)
                    self._decoder = zlib.decompressobj(47)
                    self._tail = rest
            if out:
                return out


class Pool:
    """Keep-alive connections per origin, at most `limit` open in all (0: no limit)."""

    def __init__(
        self,
        *,
        limit: int = 0,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,  # default: the system's CAs, made on first use
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._conns: set[_Connection] = set()
        self._slots: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl_context
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Response:
        """Send a request; return once the answer's head is in (its body is read later)."""
        if self._closed:
            raise Disconnected("the client is closed")
        origin = _origin(url)
        head = _head(method, origin, headers, None if body is None else len(body))
        conn = self._idle_connection(origin.key)
        if conn is None:
            conn = await self._connect(origin, connect_timeout)
        while True:
            conn.send(head + body if body else head, read_timeout)
            try:
                status, reply_headers = await conn.head()
            except Disconnected:
                stale = conn.closed_unanswered_after_reuse
                conn.close()
                if not stale:
                    raise
                # The server closed its idle end as the request went out (keep-alive timeouts
                # racing): nothing was answered, so nothing was processed. Once more, fresh.
                conn = await self._connect(origin, connect_timeout, fresh=True)
                continue
            except BaseException:
                conn.close()
                raise
            return Response(self, conn, status, reply_headers)

    def abort(self) -> None:
        """Close every connection, busy or idle; requests waiting for a head, a slot or a
        connection fail with `Disconnected`, and so does every request from now on."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._idle.clear()
        for conn in list(self._conns):
            conn.close()
        for slot in self._slots:
            if not slot.done():
                slot.set_result(None)  # each waiter then sees the pool closed
        self._slots.clear()

    async def close(self) -> None:
        self.abort()
        await asyncio.sleep(0)  # let the transports call connection_lost

    # -- internals --------------------------------------------------------------------------

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        expired = self._loop.time() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used: least likely closed by the server
            if conn.idle_since > expired and not conn.closing:
                return conn
            conn.close()
        return None

    async def _connect(
        self, origin: _Origin, within: float | None, *, fresh: bool = False
    ) -> _Connection:
        waiting = False  # for a slot of the pool's limit, not for the server
        try:
            async with asyncio.timeout(within):
                while self._limit and self._open >= self._limit:
                    waiting = True
                    self._evict_one_idle()  # another origin's idle connection makes room
                    slot = self._loop.create_future()
                    self._slots.append(slot)
                    try:
                        await slot
                    except BaseException:
                        if slot.done() and not slot.cancelled():
                            self._free_slot()  # the wake-up was ours: pass it on
                        raise
                    if self._closed:
                        raise Disconnected("the client is closed")
                    conn = None if fresh else self._idle_connection(origin.key)
                    if conn is not None:
                        return conn
                waiting = False
                self._open += 1
                try:
                    _, conn = await self._loop.create_connection(
                        lambda: _Connection(self, origin.key),
                        origin.host,
                        origin.port,
                        ssl=self._ssl_context() if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None,
                    )
                except BaseException:
                    self._open -= 1
                    self._free_slot()
                    raise
                if conn.closed:
                    # Lost before this task resumed (its _lost() found nothing to count off):
                    # it holds no slot; what it said before closing is still read below.
                    self._open -= 1
                    self._free_slot()
                else:
                    self._conns.add(conn)
                if self._closed:  # closed while connecting
                    conn.close()
                    raise Disconnected("the client is closed")
        except TimeoutError as exc:
            if exc.errno is not None:  # the kernel's ETIMEDOUT, not asyncio.timeout's
                raise ConnectError(exc) from None
            if waiting:
                raise PoolTimeout(f"no free connection slot within {within} s") from None
            raise ConnectTimeout(f"no connection within {within} s") from None
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors too
            raise ConnectError(exc) from None
        return conn

    def _evict_one_idle(self) -> None:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            self._idle[oldest.key].remove(oldest)
            oldest.close()  # its connection_lost frees the slot

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.reusable:
            conn.close()
            return
        conn.park()
        conn.idle_since = self._loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._keepalive, self._sweep)
        self._free_slot()

    def _lost(self, conn: _Connection) -> None:
        if conn not in self._conns:
            return  # never handed out (a connect cut short): _connect did the accounting
        self._conns.remove(conn)
        self._open -= 1
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        expired = self._loop.time() - self._keepalive
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= expired]:
                idle.remove(conn)
                conn.close()
        if any(self._idle.values()):
            self._sweeper = self._loop.call_later(self._keepalive, self._sweep)
