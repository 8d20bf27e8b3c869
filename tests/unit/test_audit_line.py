"""The decision line as ``LineFormat`` writes it is, byte for byte, the JSON of
``build_record`` (the schema the README documents), for every kind of value a field
can hold."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import audit, headers
from proxy.devcerts import issue_ca, issue_svid
from proxy.jwtsvid import JwtSvid
from proxy.policy import load_policy
from proxy.policy.evaluate import Decision
from proxy.spiffe_id import SpiffeId
from proxy.svid import PeerSvid, fingerprint

POLICY = load_policy(
    b"routes:\n"
    b"  - {name: api-v1, match: {path_prefix: /}, upstream: app,"
    b" allow: ['spiffe://example.org/*'], mode: audit}\n"
)
ROUTE = POLICY.routes[0]
STARTED = dt.datetime(2026, 11, 24, 5, 6, 7, 890123, tzinfo=dt.UTC)


def _peer() -> PeerSvid:
    leaf = issue_svid(issue_ca("example.org"), ["spiffe://example.org/ns/a/sa/x"]).cert
    return PeerSvid(
        SpiffeId.parse("spiffe://example.org/ns/a/sa/x"),
        leaf,
        fingerprint(leaf),
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        'CN=issuer "x",O=\u00e9\\n',
    )


PEER = _peer()
JWT = JwtSvid(
    SpiffeId.parse("spiffe://example.org/jwt"),
    ("aud-1", 'aud "2"'),
    STARTED,
    "kid\u2028",
    "ES256",
)
BASE = audit.Exchange(request_id="rid-1", peer_addr="127.0.0.1:5555")

CASES = {
    "refused_before_policy": BASE,
    "allowed": dataclasses.replace(
        BASE,
        method="GET",
        host="api.internal",
        path="/v1/\u00e9?\"'<script>",
        decision=Decision(True, "allowed", ROUTE, "allow[0]"),
        outcome=audit.ALLOW,
        reason="allowed",
        status=200,
        upstream="app",
        upstream_status=200,
        bytes_in=12,
        bytes_out=345678,
    ),
    "jwt_and_origin_and_drift": dataclasses.replace(
        BASE,
        method="POST",
        decision=Decision(False, "jwt_audience", ROUTE, None, True, JWT),
        outcome=audit.DENY,
        reason="jwt_audience",
        status=401,
        origin="spiffe://other.org/front",
        origin_sha256="ff" * 32,
        jwt_presented=True,
        drift=("new_network", "new_issuer"),
    ),
    "no_decision_but_status": dataclasses.replace(BASE, status=499, reason="client_gone"),
}


@pytest.mark.parametrize("peer", [PEER, None], ids=["peer", "no_peer"])
@pytest.mark.parametrize("duration", [0.0, 0.0004567, 1.5, 12345.6789])
@pytest.mark.parametrize("extra", [None, {"detail": 'bad "chunk"\n'}], ids=["plain", "extra"])
@pytest.mark.parametrize("case", CASES)
def test_line_is_the_records_json(
    case: str, peer: PeerSvid | None, duration: float, extra: dict[str, str] | None
) -> None:
    ex = CASES[case]
    record = audit.build_record(ex, peer, "sha-\u00e9", STARTED, duration)
    record.update(extra or {})
    expected = json.dumps(record, separators=(",", ":"))
    line = audit.LineFormat(peer)
    assert line.encode(ex, "sha-\u00e9", audit.iso(STARTED), duration, extra) == expected
    # the per-connection cache of the route part answers the same the second time
    assert line.encode(ex, "sha-\u00e9", audit.iso(STARTED), duration, extra) == expected


@pytest.mark.parametrize(
    "t",
    [0.0, 1.0, 1764000000.0, 1764000000.5, 1764000000.999999, 1764000000.9999996, 1764000001.25e0,
     1795000000.123456, 4102444799.999999],
)  # fmt: skip
def test_iso_wall_is_iso_of_the_datetime(t: float) -> None:
    assert audit.iso_wall(t) == audit.iso(dt.datetime.fromtimestamp(t, dt.UTC))


@pytest.mark.parametrize(
    "seconds",
    [0.0, 4e-7, 5e-7, 6e-7, 0.000001, 0.0004567, 0.001, 0.00105, 0.0123, 0.1, 1.0, 1.5,
     59.9999995, 12345.6789, 86400.0],
)  # fmt: skip
def test_duration_text_is_the_json_of_the_microsecond_value(seconds: float) -> None:
    assert audit.duration_text(seconds) == json.dumps(round(seconds * 1e6) / 1000)


@given(st.floats(min_value=0.0, max_value=1e7, allow_nan=False))
def test_duration_text_matches_float_repr_for_any_duration(seconds: float) -> None:
    text = audit.duration_text(seconds)
    assert text == repr(round(seconds * 1e6) / 1000)
    assert abs(float(text) - seconds * 1000) <= 0.0005 + 1e-9 * seconds * 1000


def test_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = [headers.new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert int(ids[1][16:], 16) == int(ids[0][16:], 16) + 1
