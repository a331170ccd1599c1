"""What the tests' loopback servers share: lifecycle and address (`LoopbackService`, the base of
FaultUpstream and ChaosProxy), and `RawServer` for a test that writes its own bytes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

__all__ = ["Handler", "LoopbackService", "RawServer", "chunk"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class LoopbackService:
    """`async with` starts and stops it; `port`/`url` once started. Subclasses set `_port`."""

    _port: int | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RawServer(LoopbackService):
    """A TCP server on 127.0.0.1 running ``handle(reader, writer)`` for each connection and
    closing the connection after it. ``stop()`` gives running handlers ``grace`` seconds, then
    cancels them, so nothing a test opened outlives it."""

    def __init__(self, handle: Handler, *, grace: float = 0.0) -> None:
        self._handle = handle
        self._grace = grace
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        if handlers and self._grace > 0:
            await asyncio.wait(handlers, timeout=self._grace)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
