"""`/readyz`: is the upstream answering? One probe at a time, its result cached briefly.

Any HTTP answer from the upstream (even 401 or 404) proves it is reachable; only a transport
failure or timeout makes the gateway not ready. The probe itself lives in `upstream.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["Readiness"]

Probe = Callable[[], Awaitable[tuple[bool, str]]]


class Readiness:
    def __init__(self, probe: Probe, *, ttl: float = 5.0) -> None:
        self._probe = probe
        self._ttl = ttl
        self._lock = asyncio.Lock()
        self._checked_at = -float("inf")
        self._result: tuple[bool, str] = (False, "not checked")

    async def check(self) -> tuple[bool, str]:
        async with self._lock:
            if time.monotonic() - self._checked_at > self._ttl:
                self._result = await self._probe()
                self._checked_at = time.monotonic()
            return self._result
