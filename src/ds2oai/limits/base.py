"""Per-key limit counting: `KeyRule`, `Decision`, the `Limiter` interface and `MemoryLimiter`.

Three limits per client key, each 0 = unlimited:

* requests per minute — a *sliding log*: the admission times of the last `window` seconds are
  kept; a request is admitted while fewer than the limit are in the log. Exact: never more
  than N admissions in any `window`-long interval (a fixed window lets 2N through around its
  boundary; GCRA lets N through at once and then one every `window/N` s, so more than N in a
  minute). Memory per key is O(limit). Refused requests are not logged.
* tokens per minute — tokens are known only when an answer ends, so they are charged then
  (`finish`), as a log of (time, tokens); a request is refused while the key's total over the
  last `window` seconds is at or over the limit. One answer may therefore overshoot; the next
  requests wait until enough of the window has passed.
* concurrent streams — leased slots: `acquire` takes one with an expiry (`lease` seconds),
  `finish` gives it back, `renew` extends it. A process that dies holding slots loses them
  after the lease, so a crash cannot block a key for ever.

`acquire` checks all three and records the request only when it is admitted, atomically (the
memory limiter runs on one event loop without awaiting; the Redis limiter in one Lua script).
Every failure of a backend is a `LimiterError` whose message never holds a password.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from ds2oai.errors import GatewayError

__all__ = [
    "DEFAULT_LEASE",
    "WINDOW",
    "Decision",
    "KeyRule",
    "Limiter",
    "LimiterError",
    "MemoryLimiter",
]

WINDOW: Final = 60.0  # seconds: the "minute" of requests/tokens per minute
# Seconds a concurrency slot lives without renewal (renewed every third of it while the
# answer streams). Short, because a lease nobody will give back blocks its key until it
# expires: one taken by an acquire that timed out on a stalled Redis and ran when Redis woke
# (the request went on, fail-open, without it), or one of a process that died.
DEFAULT_LEASE: Final = 90.0


class LimiterError(GatewayError):
    """The limits backend failed (unreachable, timed out, bad answer); no password inside."""


@dataclass(frozen=True, slots=True)
class KeyRule:
    """The limits of one client key; 0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_streams: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.concurrent_streams)

    @property
    def needs_finish(self) -> bool:
        """True when the end of an answer must be reported (a slot to free, tokens to charge)."""
        return bool(self.tokens_per_minute or self.concurrent_streams)


@dataclass(frozen=True, slots=True)
class Decision:
    """What `acquire` found. `refused` is None (admitted), "requests", "tokens" or "streams".

    `requests_used` counts the log including this request when admitted; `requests_reset` is
    the seconds until the oldest logged request leaves the window (when one more fits again).
    `tokens_used` is the window's token total; `tokens_reset` the seconds until it drops (below
    the limit, when refused for tokens). `retry_after`: seconds to wait when refused.
    """

    refused: str | None
    requests_used: int = 0
    requests_reset: float = 0.0
    tokens_used: int = 0
    tokens_reset: float = 0.0
    retry_after: float = 0.0


class Limiter(Protocol):
    """Counting for `KeyLimits`. `lease_id` is unique per request (a random hex string).

    `acquire` admits or refuses; when admitted with `concurrent_streams` set it holds a slot
    under `lease_id` until `finish` (which also charges `tokens`) or the lease expires. Every
    failure is a `LimiterError`. `close` is idempotent.
    """

    async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Decision: ...

    async def renew(self, key_id: str, lease_id: str) -> None: ...

    async def finish(self, key_id: str, rule: KeyRule, lease_id: str, tokens: int) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_total: int = 0
    streams: dict[str, float] = field(default_factory=dict)  # lease id -> expiry


class MemoryLimiter:
    """One process's counts (the default). No method awaits, so each runs atomically."""

    def __init__(
        self,
        *,
        window: float = WINDOW,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.lease = lease
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def __repr__(self) -> str:
        return "MemoryLimiter()"

    def _state(self, key_id: str, now: float) -> _KeyState:
        state = self._keys.setdefault(key_id, _KeyState())
        horizon = now - self.window
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= horizon:
            state.token_total -= state.tokens.popleft()[1]
        for lease_id, expiry in list(state.streams.items()):
            if expiry <= now:
                del state.streams[lease_id]
        return state

    def streams_held(self, key_id: str) -> int:
        """Live slots of a key (for tests and debugging)."""
        return len(self._state(key_id, self._clock()).streams)

    async def acquire(self, key_id: str, rule: KeyRule, lease_id: str) -> Decision:
        now = self._clock()
        state = self._state(key_id, now)
        used = len(state.requests)
        reset = state.requests[0] + self.window - now if state.requests else 0.0
        tokens_reset = state.tokens[0][0] + self.window - now if state.tokens else 0.0
        refused: str | None = None
        wait = 0.0
        if rule.requests_per_minute and used >= rule.requests_per_minute:
            refused = "requests"
            # The (used - limit + 1) oldest must leave the window before one more fits.
            wait = state.requests[used - rule.requests_per_minute] + self.window - now
        elif rule.tokens_per_minute and state.token_total >= rule.tokens_per_minute:
            refused = "tokens"
            total = state.token_total
            for at, tokens in state.tokens:
                total -= tokens
                wait = at + self.window - now
                if total < rule.tokens_per_minute:
                    break
            tokens_reset = wait
        elif rule.concurrent_streams and len(state.streams) >= rule.concurrent_streams:
            refused = "streams"
            wait = 1.0  # a slot frees when some answer ends; nobody knows when
        else:
            if rule.requests_per_minute:
                state.requests.append(now)
                used += 1
                reset = state.requests[0] + self.window - now
            if rule.concurrent_streams:
                state.streams[lease_id] = now + self.lease
        return Decision(
            refused,
            requests_used=used,
            requests_reset=reset,
            tokens_used=state.token_total,
            tokens_reset=tokens_reset,
            retry_after=wait,
        )

    async def renew(self, key_id: str, lease_id: str) -> None:
        # Re-added even if it expired meanwhile: the answer is still running, so it counts.
        now = self._clock()
        self._state(key_id, now).streams[lease_id] = now + self.lease

    async def finish(self, key_id: str, rule: KeyRule, lease_id: str, tokens: int) -> None:
        now = self._clock()
        state = self._state(key_id, now)
        state.streams.pop(lease_id, None)
        if rule.tokens_per_minute and tokens > 0:
            state.tokens.append((now, tokens))
            state.token_total += tokens

    async def close(self) -> None:
        self._keys.clear()
