"""What the tests' loopback servers (FaultUpstream, ChaosProxy) share: lifecycle and address."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["LoopbackService"]


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
