"""``proxy.metrics``: requests are tallied in plain Python and flushed into the Prometheus
metrics; what a scrape shows must be what ``Counter.inc`` and ``Histogram.observe``
called per request would have shown (this also pins the histogram internals the flush
writes to)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.metrics import DURATION_BUCKETS, Metrics

# On the bucket bounds, between them, below the first and past the last (+Inf).
DURATIONS = [0.0, 0.0001, 0.0005, 0.00051, 0.001, 0.003, 0.1, 0.25, 1.0, 7.5, 10.0, 10.5, 99.0]
LABELS = [
    ("orders", "allow", "allowed", "enforce"),
    ("orders", "deny", "identity_not_allowed", "enforce"),
    ("", "deny", "no_route", "audit"),
]


def _samples(
    registry: CollectorRegistry, name: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in registry.collect()
        if fam.name == name
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def _reference(calls: list[tuple[tuple[str, str, str, str], float]]) -> CollectorRegistry:
    r = CollectorRegistry()
    requests = Counter(
        "spiffe_pep_requests", "", ["route", "decision", "reason", "mode"], registry=r
    )
    duration = Histogram(
        "spiffe_pep_request_duration_seconds", "", buckets=DURATION_BUCKETS, registry=r
    )
    for (route, decision, reason, mode), seconds in calls:
        requests.labels(route=route, decision=decision, reason=reason, mode=mode).inc()
        duration.observe(seconds)
    return r


@pytest.mark.parametrize("flushes", [1, 3])
def test_a_scrape_shows_what_inc_and_observe_per_request_would(flushes: int) -> None:
    calls = [(LABELS[i % len(LABELS)], d) for i, d in enumerate(DURATIONS * 3)]
    m = Metrics()
    chunk = -(-len(calls) // flushes)
    for start in range(0, len(calls), chunk):
        for labels, seconds in calls[start : start + chunk]:
            m.count_request(*labels, seconds)
        m.flush()
    m.flush()  # nothing tallied: no change
    ref = _reference(calls)
    for name in ("spiffe_pep_requests", "spiffe_pep_request_duration_seconds"):
        got, want = _samples(m.registry, name), _samples(ref, name)
        assert got.keys() == want.keys() and got
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key


def test_exposition_flushes_what_was_tallied() -> None:
    m = Metrics()
    m.count_request("orders", "allow", "allowed", "enforce", 0.002)
    text = m.exposition().decode()
    assert (
        'spiffe_pep_requests_total{decision="allow",mode="enforce",reason="allowed",'
        'route="orders"} 1.0' in text
    )
    assert 'spiffe_pep_request_duration_seconds_bucket{le="0.0025"} 1.0' in text
    assert 'spiffe_pep_request_duration_seconds_bucket{le="0.001"} 0.0' in text
    assert "spiffe_pep_request_duration_seconds_count 1.0" in text
