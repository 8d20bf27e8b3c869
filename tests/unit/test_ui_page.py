"""``proxy.ui_page`` (the admin page's HTML) and ``proxy.recent`` (what it remembers):
filters, escaping of every value from a certificate, a request or a log, counters,
reload history, expiry order; and the page without Graphviz."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy import audit, identity_map, recent, ui, ui_page
from proxy.devcerts import issue_ca, issue_svid
from proxy.policy import load_policy
from proxy.recent import Credential, Decision, Recent
from proxy.spiffe_id import SpiffeId
from proxy.svid import PeerSvid, fingerprint

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
POLICY = load_policy(
    textwrap.dedent("""\
    routes:
      - {name: orders, match: {path_prefix: /orders}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"]}
    """).encode(),
    "policy.yaml",
)
EVIL = '<img src=x onerror="alert(1)">'


def record(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": "2026-11-23T11:59:00.000001Z",
        "event": "request",
        "worker": 1,
        "spiffe_id": "spiffe://example.org/ns/prod/sa/web",
        "peer_addr": "127.0.0.1:5000",
        "method": "GET",
        "host": "app",
        "path": "/orders/1",
        "route": "orders",
        "decision": "allow",
        "mode": "enforce",
        "reason": "allowed",
        "status": 200,
        "leaf_sha256": "aa" * 32,
        "leaf_not_after": "2026-11-24T00:00:00.000000Z",
    }
    return {**base, **over}


def decision(**over: Any) -> Decision:
    r = record(**over)
    return Decision(*(r[k] for k in recent.FIELDS))


FILTERS = [
    ("nothing", "", decision(), True),
    ("identity_substring", "identity=sa%2Fweb", decision(), True),
    ("identity_other", "identity=sa%2Fdb", decision(), False),
    ("identity_pattern", "identity=spiffe://example.org/ns/prod/*", decision(), True),
    ("identity_pattern_other", "identity=spiffe://example.org/ns/dev/*", decision(), False),
    ("identity_bad_pattern", "identity=spiffe://*x", decision(), False),
    ("route", "route=orders", decision(), True),
    ("route_other", "route=payments", decision(), False),
    ("no_route", "route=%28no+route%29", decision(route=None), True),
    ("reason", "reason=allowed", decision(), True),
    ("reason_other", "reason=identity_not_allowed", decision(), False),
    ("all_three", "identity=web&route=orders&reason=allowed", decision(), True),
    ("too_many_fields_ignored", "&".join(["route=x"] * 50), decision(), True),
]


@pytest.mark.parametrize(
    ("query", "d", "matches"), [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS]
)
def test_filters(query: str, d: Decision, matches: bool) -> None:
    assert ui_page.Filters.from_query(query.encode()).matches(d) is matches


def test_filter_query_keeps_the_others() -> None:
    f = ui_page.Filters.from_query(b"identity=web&reason=allowed")
    assert f.query(route="orders") == "identity=web&route=orders&reason=allowed"
    assert f.query(identity="") == "reason=allowed"


def _page(**over: Any) -> ui_page.PageData:
    decisions = over.pop("decisions", [decision()])
    graph = identity_map.build(
        POLICY,
        [identity_map.Traffic(d.spiffe_id, d.route, d.decision, d.reason) for d in decisions],
    )
    base: dict[str, Any] = {
        "now": NOW,
        "version": "0.1.0",
        "served_by": "this process",
        "own_id": "spiffe://example.org/pep",
        "decisions": decisions,
        "counters": [],
        "expiries": [],
        "policy": ui_page.PolicyInfo("policy.yaml", "ab" * 32, 1, "2026-11-23 11:00:00Z"),
        "reloads": [],
        "drift": [],
        "graph": graph,
        "map_svg": None,
    }
    return ui_page.PageData(**{**base, **over})


# Every place a value from a request, a certificate or a log reaches the page.
HOSTILE = [
    ("request_path", {"decisions": [decision(path="/" + EVIL, decision="deny")]}),
    ("request_host", {"decisions": [decision(host=EVIL)]}),
    ("request_method", {"decisions": [decision(method=EVIL)]}),
    ("reason", {"decisions": [decision(reason=EVIL, decision="deny")]}),
    ("route", {"decisions": [decision(route=EVIL)]}),
    ("peer_addr", {"decisions": [decision(peer_addr=EVIL)]}),
    ("identity", {"decisions": [decision(spiffe_id="spiffe://x/" + EVIL)]}),
    ("subject", {"expiries": [ui_page.Expiry("client", "spiffe://x/a", "CN=" + EVIL, NOW)]}),
    ("own_id", {"own_id": EVIL}),
    ("reload_error", {"reloads": [{"event": "policy_reload_failed", "error": EVIL}]}),
    ("reload_location", {"reloads": [{"event": "policy_reload_failed", "location": EVIL}]}),
    ("drift_evidence", {"drift": [{"event": "identity_drift", "kind": "network", "x": EVIL}]}),
    ("drift_identity", {"drift": [{"event": "identity_drift", "spiffe_id": EVIL}]}),
    ("policy_note", {"policy": ui_page.PolicyInfo(EVIL, "", 0, "", EVIL)}),
    ("notes", {"notes": [EVIL]}),
    ("map_note", {"map_note": EVIL}),
]


@pytest.mark.parametrize("over", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_text(over: dict[str, Any]) -> None:
    page = ui_page.render(_page(**over), ui_page.Filters())
    assert "<img" not in page and 'onerror="' not in page
    assert "&lt;img src=x onerror=" in page


def test_hostile_filter_values_are_text() -> None:
    f = ui_page.Filters.from_query(b'identity="><b>x&route="><b>y&reason="><b>z')
    page = ui_page.render(_page(), f)
    assert "<b>" not in page and page.count("&quot;&gt;&lt;b&gt;") >= 3


def test_denials_come_first_newest_first() -> None:
    ds = [
        decision(time="2026-11-23T11:00:00Z", path="/path-a"),
        decision(time="2026-11-23T11:01:00Z", path="/path-b", decision="deny"),
        decision(time="2026-11-23T11:02:00Z", path="/path-c", decision="error", route=None),
        decision(time="2026-11-23T11:03:00Z", path="/path-d"),
    ]
    page = ui_page.render(_page(decisions=ds), ui_page.Filters())
    denials, allowed = page.index('id="denials"'), page.index('id="allowed"')
    assert denials < allowed
    assert (
        denials
        < page.index("/path-c")
        < page.index("/path-b")
        < allowed
        < page.index("/path-d")
        < page.index("/path-a")
    )


def test_empty_states() -> None:
    page = ui_page.render(_page(decisions=[]), ui_page.Filters())
    for marker in ('id="denials-empty"', 'id="allowed-empty"', 'id="reloads-empty"'):
        assert marker in page
    assert "No identity drift alerts." in page


def test_map_without_svg_is_a_table_and_says_why() -> None:
    page = ui_page.render(_page(map_note="dot is not installed"), ui_page.Filters())
    assert 'id="map-table"' in page and "dot is not installed" in page
    assert 'id="map-svg"' not in page


def test_svg_is_inlined_without_its_prolog() -> None:
    svg = '<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg id="g"><g class="node"/></svg>\n'
    page = ui_page.render(_page(map_svg=svg), ui_page.Filters())
    assert '<div class="map" id="map-svg"><svg id="g">' in page and "<?xml" not in page


COUNTERS = [
    ("requests", ("spiffe_pep_requests_total", {"decision": "deny"}, 3.0), "requests denied", "3"),
    ("gauge", ("spiffe_pep_open_connections", {}, 2.0), "open connections", "2"),
    (
        "failed_reload",
        ("spiffe_pep_policy_reloads_total", {"result": "failed"}, 1.0),
        "policy reloads failed",
        "1",
    ),
    ("absent_is_zero", ("other_total", {}, 9.0), "TLS handshakes failed", "0"),
]


@pytest.mark.parametrize(
    ("sample", "label", "value"), [c[1:] for c in COUNTERS], ids=[c[0] for c in COUNTERS]
)
def test_counters(sample: ui_page.Sample, label: str, value: str) -> None:
    rows = {row[0]: row[1] for row in ui_page.counters([sample, sample])}
    assert rows[label] == (f"{float(value) * 2:g}" if value != "0" else "0")


def test_reloads_newest_first_one_row_per_worker_burst() -> None:
    fail = {"event": "policy_reload_failed", "location": "p.yaml:3:5", "error": "bad"}
    rows = ui_page.reload_rows(
        [
            {**fail, "time": "2026-11-23T11:00:00.1Z"},
            {**fail, "time": "2026-11-23T11:00:00.4Z"},  # the other worker
            {"event": "policy_reloaded", "time": "2026-11-23T11:05:00Z", "policy_sha256": "cd"},
            {**fail, "time": "2026-11-23T11:09:00Z"},
        ]
    )
    assert [(r.what, r.ok, r.count) for r in rows] == [
        ("policy", False, 1),
        ("policy", True, 1),
        ("policy", False, 2),
    ]
    assert rows[2].location == "p.yaml:3:5" and rows[2].errors == ("bad",)


def test_expiries_nearest_first() -> None:
    ca = issue_ca("example.org")
    creds = [
        Credential("spiffe://e/a", "11", "CN=a", "", "2026-11-23T13:00:00Z"),
        Credential("spiffe://e/b", "22", "CN=b", "", "not a time"),
    ]
    rows = ui_page.expiries("spiffe://e/pep", NOW + dt.timedelta(days=2), {"e": [ca.cert]}, creds)
    assert [r.kind for r in rows] == ["client", "own SVID", "bundle CA", "client"]
    assert rows[-1].not_after is None  # unknown: last


def test_recent_is_bounded_and_learns_a_credential_once() -> None:
    ca = issue_ca("example.org")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, EVIL)])
    leaf = issue_svid(ca, ["spiffe://example.org/a"], subject=subject).cert
    peer = PeerSvid(
        SpiffeId.parse("spiffe://example.org/a"),
        leaf,
        fingerprint(leaf),
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )
    announced: list[Credential] = []
    r = Recent()
    r.announce = announced.append
    for i in range(recent.DECISIONS + 5):
        r.seen(peer)
        r.add_line(json.dumps(record(path=f"/{i}")))
    assert len(r.decisions) == recent.DECISIONS
    assert [c.subject for c in announced] == ["CN=" + EVIL]  # as in the certificate
    assert announced[0].not_after == audit.iso(leaf.not_valid_after_utc)
    copy = r.copy()
    r.add_line(json.dumps(record(path="/later")))
    kept = copy.recent_decisions()
    assert len(kept) == recent.DECISIONS and copy.credentials
    assert kept[0] == decision(path="/5") and kept[-1] == decision(path=f"/{recent.DECISIONS + 4}")


def test_recent_from_logs() -> None:
    events = [
        {
            "event": "peer_credential_seen",
            "leaf_sha256": "aa" * 32,
            "subject": "CN=x",
            "spiffe_id": "spiffe://example.org/ns/prod/sa/web",
            "not_after": "2026-11-24T00:00:00Z",
        },
        {"event": "policy_reload_failed", "location": "p:1:1", "error": "e"},
        {"event": "identity_drift", "kind": "new_network", "spiffe_id": "spiffe://e/a"},
        {"event": "listening"},
    ]
    r = Recent.from_logs([record(), record(event="other"), record(leaf_sha256="bb")], events)
    assert len(r.decisions) == 2 and len(r.reloads) == 1 and len(r.drift) == 1
    assert r.credentials["aa" * 32].subject == "CN=x"  # from the event
    assert r.credentials["bb"].subject == ""  # only the decision line: no subject


def test_page_without_graphviz(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on it
    inputs = ui.Inputs(
        Recent.from_logs([record(), record(decision="deny", reason="identity_not_allowed")], []),
        "spiffe://example.org/pep",
        NOW,
        {},
        POLICY,
        ui_page.PolicyInfo("policy.yaml", POLICY.sha256, 1, ""),
        [],
        "test",
    )
    page = ui.build_page(inputs, b"", NOW)
    assert 'id="map-table"' in page and "Graphviz&#x27;s dot is not installed" in page
