"""Prometheus metrics, every name prefixed `ds2oai_`.

Module-level collectors in this module's own `REGISTRY`, so that `/metrics` holds only `ds2oai_`
names (prometheus-client's default registry adds `python_gc_*`, `python_info` and `process_*`):
the process's CPU, memory and open files are here as `ds2oai_process_*`. `render()` serves
them. With `--workers N` the CLI sets `PROMETHEUS_MULTIPROC_DIR` before the workers start and
`render()` aggregates every process's files, so one scrape of any worker sees the whole gateway
(without `ds2oai_process_*`, which describe one process). Recording functions are small and
never raise; nothing here touches requests or responses.

The per-request series go through `inc()` and `observe()`, which only add to this process's
pending sums (a dict update each); `flush()` hands them to prometheus-client, one locked update
per touched series instead of one per event (about 13 per request: 0.3 µs a counter, 0.7 µs a
histogram, measured). `render()` flushes first, and the server flushes every
`FLUSH_INTERVAL` seconds, so with `--workers N` another worker's latest updates reach a scrape
within that interval.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
from typing import TypeVar, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

__all__ = [
    "ADDED_LATENCY",
    "ATTEMPTS",
    "CONTENT_TYPE",
    "FLUSH_INTERVAL",
    "IN_FLIGHT",
    "LIMITS_BACKEND_ERRORS",
    "LIMITS_REFUSED",
    "MIDDLEWARE_SECONDS",
    "QUEUE_WAIT",
    "REGISTRY",
    "REQUESTS",
    "RESUMES",
    "RETRY_BUDGET_EXHAUSTED",
    "SELECTED",
    "STREAMS",
    "TOKENS",
    "TTFT",
    "child",
    "flush",
    "inc",
    "observe",
    "render",
]

log = logging.getLogger("ds2oai.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()
ProcessCollector(namespace="ds2oai", registry=REGISTRY)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "ds2oai_requests", "HTTP requests by route and status", ["route", "status"], registry=REGISTRY
)
STREAMS = Counter(
    "ds2oai_streams",
    "Finished answers by dialect and outcome",
    ["dialect", "outcome"],
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "ds2oai_upstream_attempts",
    "Upstream attempts by HTTP status (or connect_error / timeout)",
    ["status"],
    registry=REGISTRY,
)
TTFT = Histogram(
    "ds2oai_time_to_first_token_seconds",
    "Request start to the first upstream token",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ADDED_LATENCY = Histogram(
    "ds2oai_gateway_added_latency_seconds",
    "The upstream's first token arriving -> the same token written to the client",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "ds2oai_upstream_queue_wait_seconds",
    "Time the upstream kept the request queued (first keep-alive comment to first chunk)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENS = Counter(
    "ds2oai_tokens",
    "Tokens by model and direction (in/out)",
    ["model", "direction"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "ds2oai_streams_in_flight",
    "Answers being streamed now",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
MIDDLEWARE_SECONDS = Histogram(
    "ds2oai_middleware_seconds",
    "Time from entering a middleware until it returns its reply (inner stages included)",
    ["middleware"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
    registry=REGISTRY,
)

LIMITS_REFUSED = Counter(
    "ds2oai_limits_refused",
    "Requests refused by per-key limits, by key id (a hash) and limit (requests/tokens/streams)",
    ["key_id", "limit"],
    registry=REGISTRY,
)
LIMITS_BACKEND_ERRORS = Counter(
    "ds2oai_limits_backend_errors",
    "Failed calls to the per-key limits backend (Redis), by operation and on_redis_error policy",
    ["operation", "policy"],
    registry=REGISTRY,
)


RESUMES = Counter(
    "ds2oai_resumes",
    "Broken streams continued with chat prefix completion, by final outcome",
    ["outcome"],
    registry=REGISTRY,
)


SELECTED = Counter(
    "ds2oai_upstream_selected",
    "Requests sent to each upstream of the pool, by result (HTTP status, connect_error, timeout)",
    ["upstream", "result"],
    registry=REGISTRY,
)


RETRY_BUDGET_EXHAUSTED = Counter(
    "ds2oai_retry_budget_exhausted",
    "Retries not made because the retry budget was used up",
    registry=REGISTRY,
)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


@functools.lru_cache(maxsize=4096)
def _child(metric: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> object:
    return metric.labels(*labels)


def child(metric: _Metric, *labels: str) -> _Metric:
    """`metric.labels(*labels)`, looked up once per label set (prometheus-client takes a lock
    and builds the key on every call). Label values must come from bounded sets."""
    return cast(_Metric, _child(metric, labels))


FLUSH_INTERVAL = 1.0

# Pending since the last flush: counter or gauge series -> amount; histogram series -> its
# bucket counts and the sum of its observations.
_counts: dict[Counter | Gauge, float] = {}
_histograms: dict[Histogram, tuple[list[int], list[float]]] = {}


def inc(series: Counter | Gauge, amount: float = 1.0) -> None:
    """`series.inc(amount)` at the next flush (a gauge takes negative amounts too)."""
    _counts[series] = _counts.get(series, 0.0) + amount


def observe(series: Histogram, value: float) -> None:
    """`series.observe(value)` at the next flush. `series` has no labels left to fill."""
    pending = _histograms.get(series)
    if pending is None:
        pending = _histograms[series] = ([0] * len(_bounds(series)), [0.0])
    counts, total = pending
    # The first bucket whose upper bound is >= value: prometheus-client's own choice.
    counts[bisect.bisect_left(_bounds(series), value)] += 1
    total[0] += value


@functools.lru_cache(maxsize=1024)
def _bounds(series: Histogram) -> tuple[float, ...]:
    return tuple(series._upper_bounds)  # ends with +Inf


def flush() -> None:
    """Apply everything pending to prometheus-client (its files, in multiprocess mode).

    Never raises: a series the client refuses (a counter given a negative sum) is logged and
    dropped, and the others are applied all the same."""
    while _counts:
        series, amount = _counts.popitem()
        try:
            if amount:
                series.inc(amount)
        except Exception:
            log.exception("metric update dropped", extra={"series": _name(series)})
    while _histograms:
        histogram, (counts, total) = _histograms.popitem()
        try:
            # Not public API (stable since the first releases; constraints.txt pins the version
            # and tests/test_metrics.py compares the result with plain `observe()`): one locked
            # update per bucket that changed, not one per observation.
            buckets = histogram._buckets
            for i, n in enumerate(counts):
                if n:
                    buckets[i].inc(n)
            histogram._sum.inc(total[0])
        except Exception:
            log.exception("metric update dropped", extra={"series": _name(histogram)})


def _name(series: Counter | Gauge | Histogram) -> str:
    return f"{series._name}{dict(zip(series._labelnames, series._labelvalues, strict=False))}"


def render() -> bytes:
    """The exposition text; aggregated over worker processes when multiprocess mode is on."""
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
