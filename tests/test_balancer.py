"""Circuit breaker, retry budget and weighted choice (sans-IO, fake clock)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ds2oai.balancer import BreakerState, CircuitBreaker, RetryBudget, choose


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so mypy does not narrow across the calls in between


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_failures_within_the_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, window=10, open_seconds=5, clock=clock)
    breaker.failure()
    breaker.failure()
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.failure()
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.allows()
    assert not breaker.acquire()


def test_failures_outside_the_window_do_not_count() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, window=10, open_seconds=5, clock=clock)
    breaker.failure()
    breaker.failure()
    clock.now += 11
    breaker.failure()
    assert state_of(breaker) is BreakerState.CLOSED


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, window=10, open_seconds=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.acquire()
    assert not breaker.acquire()  # a second request waits for the probe's verdict
    assert not breaker.allows()


def test_a_failed_probe_opens_again_and_a_good_one_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, window=10, open_seconds=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.acquire()
    breaker.failure()
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 5
    assert breaker.acquire()
    breaker.success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.acquire()
    assert breaker.acquire()


def test_retry_budget_allows_a_minimum_then_a_ratio_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries=2, window=10, clock=clock)
    for _ in range(5):
        budget.request()
    assert budget.try_retry()
    assert budget.try_retry()
    assert not budget.try_retry()  # max(2, 5 * 0.2) = 2
    for _ in range(15):
        budget.request()
    assert budget.try_retry()
    assert budget.try_retry()
    assert not budget.try_retry()  # 20 * 0.2 = 4
    clock.now += 11
    assert budget.try_retry()  # the window moved on


@dataclass(eq=False)
class Target:
    name: str
    weight: float
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)


def test_choose_follows_weights_and_skips_open_breakers() -> None:
    a, b = Target("a", 3), Target("b", 1)
    points = iter([i / 400 for i in range(400)])
    picks = Counter(choose([a, b], rand=lambda: next(points)) for _ in range(400))
    assert picks[a] == 300
    assert picks[b] == 100
    for _ in range(5):
        a.breaker.failure()
    assert all(choose([a, b], rand=lambda: 0.1) is b for _ in range(5))
    assert choose([a, b], exclude=[b]) is None
    assert choose([Target("z", 0)]) is None
