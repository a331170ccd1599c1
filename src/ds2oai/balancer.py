"""Choosing an upstream: weighted choice, per-upstream circuit breakers, a retry budget.

Sans-IO policy objects with an injectable clock and random source; `upstream.py` consults
them (which upstream to try, whether to fail over) and `middleware/retry.py` asks the budget
before each retry. Nothing here does I/O.

- `CircuitBreaker`: CLOSED until `threshold` failures happen within `window` seconds, then
  OPEN for `open_seconds` (the upstream is skipped), then HALF_OPEN: exactly one probe request
  is let through; its success closes the breaker, its failure opens it again.
- `RetryBudget` (Envoy's idea): retries may add at most `ratio` of the requests seen in the
  last `window` seconds (plus `min_retries` so a quiet gateway can still retry), so a failing
  upstream is not hammered by retry storms.
- `choose()`: weighted random among the upstreams whose breaker allows a request.
"""

from __future__ import annotations

import collections
import enum
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

__all__ = ["BreakerState", "CircuitBreaker", "RetryBudget", "choose"]

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        window: float = 30.0,
        open_seconds: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._window = window
        self._open_seconds = open_seconds
        self._clock = clock
        self._failures: collections.deque[float] = collections.deque()
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._open_seconds:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allows(self) -> bool:
        """May a request go to this upstream now? (Does not reserve the half-open probe.)"""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probing
        )

    def acquire(self) -> bool:
        """Take the right to send one request; in HALF_OPEN only one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def abandon(self) -> None:
        """The half-open probe proved nothing (its client left, or the upstream said 429):
        let the next request probe. Only the request that took the probe may call this."""
        self._probing = False

    def success(self) -> None:
        self._failures.clear()
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        now = self._clock()
        if self._opened_at is not None:  # the half-open probe failed: open again
            self._opened_at = now
            self._probing = False
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self._window:
            self._failures.popleft()
        if len(self._failures) >= self._threshold:
            self._opened_at = now
            self._failures.clear()


class RetryBudget:
    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries: int = 10,
        window: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._min = min_retries
        self._window = window
        self._clock = clock
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        for series in (self._requests, self._retries):
            while series and now - series[0] > self._window:
                series.popleft()

    def request(self) -> None:
        """Count one first attempt."""
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_retry(self) -> bool:
        """Count and allow one retry if the budget has room."""
        now = self._clock()
        self._trim(now)
        allowed = max(self._min, int(len(self._requests) * self._ratio))
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


class _Weighted(Protocol):
    @property
    def weight(self) -> float: ...

    @property
    def breaker(self) -> CircuitBreaker: ...


W = TypeVar("W", bound=_Weighted)


def choose(
    candidates: Sequence[W],
    *,
    exclude: Sequence[W] = (),
    rand: Callable[[], float] = random.random,
    ignore_breakers: bool = False,
) -> W | None:
    """Weighted random pick among candidates whose breaker allows a request."""
    usable = [
        c
        for c in candidates
        if c not in exclude and c.weight > 0 and (ignore_breakers or c.breaker.allows())
    ]
    if not usable:
        return None
    total = sum(c.weight for c in usable)
    point = rand() * total
    for candidate in usable:
        point -= candidate.weight
        if point < 0:
            return candidate
    return usable[-1]
