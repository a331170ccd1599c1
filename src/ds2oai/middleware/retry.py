"""`retry` — retry failed upstream attempts before anything went downstream (`Retry`).

Reads: connect errors raised by the endpoint and the upstream reply status. Retries connect
errors and HTTP 429, 500, 502, 503, 504 up to `[retry] max_retries` extra times, with
exponential backoff and full jitter (`uniform(0, min(max_delay, base_delay * 2**n))`), honouring
`Retry-After`/`retry-after-ms` on every attempt (capped at `retry_after_cap`), all within
`deadline` seconds. Every discarded reply is closed. Position: inside `rate_limit` and
`reframe`: it only ever sees replies whose body nobody has read, so it cannot duplicate text.
A process-wide retry budget (`[balancer] retry_budget_ratio`, `retry_budget_min`) caps retries
at a fraction of recent requests, so a failing upstream is not hammered by retry storms.
Fails: when out of attempts, time or budget it returns the last reply / raises the last error,
marked `retried` if it had tried again (the client is then told not to retry on top of it: a
client's retries would multiply the upstream attempts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable

from ds2oai.balancer import RetryBudget
from ds2oai.chain import Exchange, Next, Reply
from ds2oai.config import Config, RetryConfig
from ds2oai.errors import UpstreamConnectError
from ds2oai.metrics import RETRY_BUDGET_EXHAUSTED
from ds2oai.upstream_errors import retry_after_value

__all__ = ["RETRYABLE_STATUSES", "Retry"]

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class Retry:
    name = "retry"

    def __init__(
        self,
        config: RetryConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        budget: RetryBudget | None = None,
    ) -> None:
        self._config = config
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._budget = budget

    @classmethod
    def from_config(cls, config: Config) -> Retry:
        b = config.balancer
        budget = RetryBudget(ratio=b.retry_budget_ratio, min_retries=b.retry_budget_min)
        return cls(config.retry, budget=budget)

    def _may_retry(self) -> bool:
        """The process-wide retry budget: retries add at most a fraction of the load."""
        if self._budget is None or self._budget.try_retry():
            return True
        RETRY_BUDGET_EXHAUSTED.inc()
        return False

    def backoff(self, retries_done: int) -> float:
        c = self._config
        cap: float = min(c.max_delay, c.base_delay * (2.0**retries_done))
        return self._rand() * cap

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        c = self._config
        deadline = self._clock() + c.deadline
        attempt = 0
        if self._budget is not None:
            self._budget.request()
        while True:
            # The first attempt goes out as it came: no copy per request.
            current = (
                exchange
                if attempt == exchange.attempt
                else dataclasses.replace(exchange, attempt=attempt)
            )
            reply: Reply | None = None
            try:
                reply = await call_next(current)
            except UpstreamConnectError as exc:
                exc.retried = attempt > 0
                if not exc.retryable or attempt >= c.max_retries:
                    raise
                delay = self.backoff(attempt)
                if self._clock() + delay > deadline or not self._may_retry():
                    raise
            else:
                if reply.status not in RETRYABLE_STATUSES:
                    return reply
                if attempt >= c.max_retries:
                    return _given_up(reply, attempt)
                delay = self.backoff(attempt)
                hinted = retry_after_value(reply.headers, -1.0)
                if hinted >= 0:
                    if hinted > c.retry_after_cap:
                        return _given_up(reply, attempt)  # asks for longer than we may wait
                    delay = hinted
                if self._clock() + delay > deadline or not self._may_retry():
                    return _given_up(reply, attempt)
                await reply.aclose()
            attempt += 1
            await self._sleep(delay)


def _given_up(reply: Reply, attempt: int) -> Reply:
    return dataclasses.replace(reply, retried=True) if attempt > 0 else reply
