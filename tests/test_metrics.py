"""`metrics.inc/observe/flush`: batched updates end up exactly as direct prometheus-client ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ds2oai import metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# On a bound, between bounds, below the first, above the last (+Inf), zero, repeated.
VALUES = (0.001, 0.0005, 0.0, 0.01, 0.05, 0.1, 0.1, 0.99, 1.0, 1.5, 300.0, 0.05)


def _series(registry: CollectorRegistry) -> tuple[Counter, Gauge, Histogram, Histogram]:
    counter = Counter("t_requests", "r", ["route"], registry=registry)
    gauge = Gauge("t_in_flight", "f", registry=registry)
    plain = Histogram("t_ttft_seconds", "t", buckets=BUCKETS, registry=registry)
    labelled = Histogram("t_stage_seconds", "s", ["stage"], buckets=BUCKETS, registry=registry)
    return counter, gauge, plain, labelled


def test_flushed_updates_render_as_the_same_updates_made_directly() -> None:
    direct, batched = CollectorRegistry(), CollectorRegistry()
    counter, gauge, plain, labelled = _series(direct)
    for value in VALUES:
        counter.labels("chat").inc()
        plain.observe(value)
        labelled.labels("auth").observe(value / 2)
    counter.labels("spec").inc(7)
    gauge.inc()
    gauge.inc()
    gauge.dec()

    counter, gauge, plain, labelled = _series(batched)
    for value in VALUES:
        metrics.inc(counter.labels("chat"))
        metrics.observe(plain, value)
        metrics.observe(labelled.labels("auth"), value / 2)
    metrics.inc(counter.labels("spec"), 7)
    metrics.inc(gauge)
    metrics.inc(gauge)
    metrics.inc(gauge, -1)
    assert b't_requests_total{route="chat"} 0.0' in generate_latest(batched)  # pending only
    metrics.flush()

    assert _samples(batched) == _samples(direct)
    metrics.flush()  # nothing pending: a second flush changes nothing
    assert _samples(batched) == _samples(direct)


def _samples(registry: CollectorRegistry) -> list[bytes]:
    """The exposition without creation timestamps (two registries never share those)."""
    return [ln for ln in generate_latest(registry).splitlines() if b"_created" not in ln]


def test_a_series_the_client_refuses_is_dropped_and_the_rest_applied() -> None:
    registry = CollectorRegistry()
    counter, gauge, plain, _ = _series(registry)
    metrics.inc(counter.labels("bad"), -3)  # prometheus-client refuses to decrease a counter
    metrics.inc(counter.labels("good"), 2)
    metrics.inc(gauge, 4)
    metrics.observe(plain, 0.5)
    metrics.flush()  # does not raise
    assert registry.get_sample_value("t_requests_total", {"route": "good"}) == 2
    assert registry.get_sample_value("t_requests_total", {"route": "bad"}) == 0
    assert registry.get_sample_value("t_in_flight") == 4
    assert registry.get_sample_value("t_ttft_seconds_count") == 1


def test_render_flushes_what_is_pending() -> None:
    before = metrics.render()
    metrics.inc(metrics.RETRY_BUDGET_EXHAUSTED)
    after = metrics.render()
    assert _value(after, b"ds2oai_retry_budget_exhausted_total") == (
        _value(before, b"ds2oai_retry_budget_exhausted_total") + 1
    )


def _value(text: bytes, name: bytes) -> float:
    for line in text.splitlines():
        if line.startswith(name + b" "):
            return float(line.split()[1])
    raise AssertionError(f"{name!r} not in the exposition")
