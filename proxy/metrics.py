"""Every Prometheus metric, defined once, with tiny record helpers.

Its own registry (not the process-global default), so several proxies in one process
(the tests) each count their own traffic.
"""

from __future__ import annotations

import bisect
import os
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FLUSH_INTERVAL = 1.0  # seconds between tally flushes (``flusher``)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "spiffe_pep_requests",
            "Requests by route, policy verdict, reason and mode.",
            ["route", "decision", "reason", "mode"],
            registry=r,
        )
        self.duration = Histogram(
            "spiffe_pep_request_duration_seconds",
            "Time from request head to the last byte.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.handshake_failures = Counter(
            "spiffe_pep_tls_handshake_failures",
            "Refused or failed TLS handshakes by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "spiffe_pep_upstream_errors",
            "Upstream failures by upstream and reason.",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_violations = Counter(
            "spiffe_pep_upstream_protocol_violations",
            "Upstream connections closed for sending bytes beyond the responses asked of "
            "them (never pooled), by upstream and kind.",
            ["upstream", "kind"],
            registry=r,
        )
        self.open_connections = Gauge(
            "spiffe_pep_open_connections",
            "Client connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "spiffe_pep_connections_refused",
            "Connections closed unserved: limits.max_connections.",
            registry=r,
        )
        self.handshakes_refused = Counter(
            "spiffe_pep_handshakes_refused",
            "Connections closed before TLS: too many handshakes in flight (in all, or from "
            "one source address).",
            ["limit"],
            registry=r,
        )
        self.headers_dropped = Counter(
            "spiffe_pep_request_headers_dropped",
            "Client request headers dropped by a canonicalisation rule (underscore names).",
            ["rule"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "spiffe_pep_policy_reloads",
            "Policy reloads by result (ok or failed).",
            ["result"],
            registry=r,
        )
        self.policy_info = Gauge(
            "spiffe_pep_policy_info",
            "The policy in force (value 1), by its SHA-256.",
            ["sha256"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._policy_sha: str | None = None
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        # Requests counted since the last ``flush``: by labels, by duration bucket (the
        # last one +Inf) and the sum of durations.
        self._tally: dict[tuple[str, str, str, str], int] = {}
        self._bucket_tally = [0] * (len(DURATION_BUCKETS) + 1)
        self._seconds_tally = 0.0

        self.svid_not_after = Gauge(
            "spiffe_pep_svid_not_after_seconds",
            "Expiry of the proxy's own SVID (Unix time).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.bundle_ca_not_after = Gauge(
            "spiffe_pep_bundle_ca_not_after_seconds",
            "Expiry of each X.509 authority of each trust bundle (Unix time).",
            ["trust_domain", "subject"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.config_reloads = Counter(
            "spiffe_pep_config_reloads",
            "Runtime configuration reloads (SIGHUP) by result (ok or failed).",
            ["result"],
            registry=r,
        )
        self.credential_reloads = Counter(
            "spiffe_pep_credential_reloads",
            "SVID/key/bundle reloads by result (ok or failed).",
            ["result"],
            registry=r,
        )

        self.identity_drift = Counter(
            "spiffe_pep_identity_drift",
            "Subject drift (an identity from a new network, with two live credentials, "
            "from a new CA, or with a far longer credential lifetime), by kind and mode "
            "(alert or deny); once per connection, identity and kind.",
            ["kind", "mode"],
            registry=r,
        )
        self.drift_dropped = Counter(
            "spiffe_pep_drift_facts_dropped",
            "Learned facts not written to the drift store because its queue was full.",
            registry=r,
        )

    def count_request(
        self, route: str, decision: str, reason: str, mode: str, seconds: float
    ) -> None:
        """One finished request, tallied in plain Python and moved into the Prometheus
        metrics by ``flush``: a counter's ``inc`` and a histogram's ``observe`` take a
        lock each and run several Python frames in prometheus-client (in a worker, a
        write to a shared memory map each), the largest part of the metrics' cost per
        request, and their code and data pushed the request path's working set out of
        the CPU's caches."""
        key = (route, decision, reason, mode)
        tally = self._tally
        tally[key] = tally.get(key, 0) + 1
        self._bucket_tally[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._seconds_tally += seconds

    def flush(self) -> None:
        """Move the tallied requests into the request counter and duration histogram.
        Before every scrape of this process's registry (``exposition``, the admin page),
        every ``FLUSH_INTERVAL`` (``flusher``) and when the proxy stops (``app.serve``):
        a supervisor's aggregate of its workers is at most that much behind."""
        if not self._tally:
            return
        tally, self._tally = self._tally, {}
        buckets, self._bucket_tally = self._bucket_tally, [0] * len(self._bucket_tally)
        seconds, self._seconds_tally = self._seconds_tally, 0.0
        for key, n in tally.items():
            child = self._request_children.get(key)
            if child is None:
                route, decision, reason, mode = key
                child = self.requests.labels(
                    route=route, decision=decision, reason=reason, mode=mode
                )
                self._request_children[key] = child
            child.inc(n)
        # prometheus-client has no call for "n observations in bucket i": its per-bucket
        # values (not cumulative) and sum, as ``observe`` updates them (pinned by
        # tests/unit/test_metrics.py against a histogram fed by ``observe``).
        self.duration._sum.inc(seconds)
        for value, n in zip(self.duration._buckets, buckets, strict=True):
            if n:
                value.inc(n)

    async def flusher(self) -> None:
        """``flush`` every ``FLUSH_INTERVAL``, until cancelled."""
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            self.flush()

    def set_credentials(self, creds: Any) -> None:
        """Expiry gauges for the credentials in force (a ``tls.Credentials``)."""
        self.svid_not_after.set(creds.own_not_after.timestamp())
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # not supported across workers
            self.bundle_ca_not_after.clear()
        for td, bundle in creds.trust.bundles.items():
            for ca in bundle.x509_authorities:
                self.bundle_ca_not_after.labels(
                    trust_domain=str(td), subject=ca.subject.rfc4514_string()
                ).set(ca.not_valid_after_utc.timestamp())

    def set_policy(self, sha256: str) -> None:
        # Zero the old version rather than removing it: removal does not reach the files
        # other processes read in multiprocess mode.
        if self._policy_sha and self._policy_sha != sha256:
            self.policy_info.labels(sha256=self._policy_sha).set(0)
        self.policy_info.labels(sha256=sha256).set(1)
        self._policy_sha = sha256

    def exposition(self) -> bytes:
        self.flush()
        return bytes(generate_latest(self.registry))
