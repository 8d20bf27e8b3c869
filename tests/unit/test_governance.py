"""The pure governance modules (proxy/governance/): records, SQL text, judging again,
inventory, unused grants, suggestion, replay and output, each over small tables."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy import audit
from proxy.governance import records as R
from proxy.governance import report, sql
from proxy.governance.inventory import (
    CONCURRENT,
    LONG_LIVED,
    ONLY_DENIED,
    SEVERAL_NETWORKS,
    inventory,
    max_concurrent,
)
from proxy.governance.judge import JWT_UNKNOWN, Judge
from proxy.governance.replay import ALLOW_TO_DENY, DENY_TO_ALLOW, replay
from proxy.governance.suggest import is_identifier, normalise, shapes, suggest
from proxy.governance.unused import PATTERN_BROAD, PATTERN_UNUSED, ROUTE_NEVER_HIT, unused
from proxy.policy import load_policy, tools
from proxy.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
WEB = "spiffe://e.org/ns/prod/sa/web"
BATCH = "spiffe://e.org/ns/batch/sa/nightly"
CHECKOUT = "spiffe://e.org/ns/prod/sa/checkout"
DEV = "spiffe://e.org/ns/dev/sa/tool"
EDGE = "spiffe://e.org/ns/mesh/sa/edge"
PARTNER = "spiffe://p.org/ns/pay/sa/api"
T0 = "2026-11-23T12:00:00.000000Z"
NB = "2026-11-23T11:30:00.000000Z"
NA = "2026-11-23T12:30:00.000000Z"
AUD = "spiffe://e.org/billing"

POLICY = textwrap.dedent("""\
    max_cert_lifetime: 24h
    revoked:
      cert_sha256: ["dead000000000000000000000000000000000000000000000000000000000000"]
    routes:
      - name: health
        match: {path: /healthz, methods: [GET]}
        upstream: app
        allow: ["spiffe://e.org/*"]
      - name: invoices-write
        match: {hosts: [billing.internal], path_prefix: /api/invoices, methods: [POST]}
        upstream: billing
        allow: ["spiffe://e.org/ns/prod/sa/checkout"]
        audiences: ["spiffe://e.org/billing"]
      - name: invoices
        match: {hosts: [billing.internal], path_prefix: /api/invoices}
        upstream: billing
        allow: ["spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/dev/*"]
      - name: payments
        match: {path_prefix: /payments}
        upstream: app
        allow: ["spiffe://e.org/ns/mesh/sa/edge"]
        origin: ["spiffe://p.org/*"]
      - name: reports
        match: {path: /reports/*/pdf}
        upstream: app
        allow: ["spiffe://e.org/ns/batch/*"]
        max_cert_lifetime: 2h
      - name: legacy
        match: {path_prefix: /legacy}
        upstream: app
        allow: ["spiffe://e.org/ns/prod/sa/web"]
    """)


def policy(text: str = POLICY) -> Policy:
    return load_policy(text.encode(), "policy.yaml")


def group(spiffe_id: str | None = WEB, path: str | None = "/healthz", **kw: Any) -> R.RequestGroup:
    base: dict[str, Any] = dict(
        spiffe_id=spiffe_id,
        origin=None,
        origin_sha256=None,
        method="GET",
        host="billing.internal",
        path=path,
        jwt_presented=False,
        jwt_sub=None,
        jwt_aud=(),
        decision="allow",
        reason="allowed",
        route="health",
        mode="enforce",
        upstream="app",
        count=1,
        first=T0,
        last=T0,
        leaf_sha256="ab" * 32,
        leaf_not_before=NB,
        leaf_not_after=NA,
        time=T0,
    )
    base.update(kw)
    return R.RequestGroup(**base)


def stats() -> R.InputStats:
    return R.InputStats.of({R.REQUEST: 0})


# --- records ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("", ()),
        ('["a","b"]', ("a", "b")),
        (["a"], ("a",)),
        ("single", ("single",)),
        ("[not json", ("[not json",)),
    ],
    ids=["null", "empty", "json_list_text", "list", "one_string", "broken_json"],
)
def test_audiences(value: Any, expected: tuple[str, ...]) -> None:
    assert R.audiences(value) == expected


@pytest.mark.parametrize(
    ("value", "sub", "reason", "expected"),
    [
        ("true", None, None, True),
        ("false", "spiffe://e.org/x", None, False),
        (True, None, None, True),
        (None, "spiffe://e.org/x", "allowed", True),
        (None, None, "jwt_wrong_audience", True),
        (None, None, "jwt_missing", False),
        (None, None, "allowed", False),
    ],
    ids=[
        "logged_true",
        "logged_false_wins",
        "bool",
        "old_log_validated_subject",
        "old_log_jwt_failure",
        "old_log_jwt_missing",
        "old_log_no_token",
    ],
)
def test_jwt_presented(value: Any, sub: str | None, reason: str | None, expected: bool) -> None:
    assert R.presented(value, sub, reason) is expected


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", "10.1.2.0/24"),
        ("2001:db8::1", "2001:db8::/64"),
        ("unknown", "unknown"),
        (None, "unknown"),
    ],
    ids=["ipv4", "ipv6", "not_an_address", "none"],
)
def test_network(ip: str | None, expected: str) -> None:
    assert R.network(ip) == expected


def test_times_round_trip_in_the_logs_format() -> None:
    t = R.parse_time(T0)
    assert t == dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
    assert R.iso(t) == T0
    assert R.lifetime(NB, NA) == 3600


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(90 * 86400, "90d"), (3600, "1h"), (5400, "90m"), (5401, "1.5h"), (30, "30s"), (None, "?")],
    ids=["days", "hours", "minutes", "fraction", "seconds", "unknown"],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert R.human_duration(seconds) == text


def test_the_decision_line_carries_every_field_the_commands_read() -> None:
    ex = audit.Exchange(request_id="r", peer_addr="127.0.0.1:1")
    record = audit.build_record(ex, None, "sha", dt.datetime.now(dt.UTC), 0.001)
    missing = set(R.READ) - set(record)
    assert not missing, f"the decision line lacks {missing}"


def test_the_readme_documents_every_field_of_the_contract() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Decision log") :]
    section = section[: section.index("\n## ", 5)]
    for f in R.FIELDS:
        assert f"`{f.name}`" in section, f"README 'Decision log' does not document {f.name}"


# --- SQL text ---------------------------------------------------------------------------


def test_sql_literals_quote_single_quotes() -> None:
    assert sql.literal("it's") == "'it''s'"
    src = sql.source(["/logs/a'b.jsonl"], ["/logs/c.gz"])
    assert "'/logs/a''b.jsonl'" in src and "compression = 'gzip'" in src
    assert src.count("read_json(") == 2
    with pytest.raises(ValueError):
        sql.source([], [])


def test_sql_window_and_credential_classes() -> None:
    assert "outside_window" not in sql.kind(None)
    assert f"time < '{T0}'" in sql.kind(T0)
    q = sql.request_groups("SELECT 1", T0, ["dead"], [3600.0, 86400.0])
    assert "IN ('dead')" in q and "> 3600.0" in q and "> 86400.0" in q
    plain = sql.request_groups("SELECT 1")
    assert "'' AS c_revoked" in plain and "0 AS c_lifetime" in plain


# --- judging again ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("g", "outcome", "route", "reason"),
    [
        (group(), "allow", "health", "allowed"),
        (group(DEV, "/api/invoices/7"), "allow", "invoices", "allowed"),
        (group(BATCH, "/api/invoices/7"), "deny", "invoices", "identity_not_allowed"),
        (group(WEB, "/api/invoices/7", host="other.internal"), "deny", None, "no_matching_route"),
        (
            group(
                CHECKOUT,
                "/api/invoices",
                method="POST",
                jwt_presented=True,
                jwt_sub=CHECKOUT,
                jwt_aud=(AUD,),
            ),
            "allow",
            "invoices-write",
            "allowed",
        ),
        (
            group(
                CHECKOUT,
                "/api/invoices",
                method="POST",
                jwt_presented=True,
                jwt_sub=CHECKOUT,
                jwt_aud=("spiffe://e.org/other",),
            ),
            "deny",
            "invoices-write",
            "jwt_wrong_audience",
        ),
        (
            group(
                CHECKOUT,
                "/api/invoices",
                method="POST",
                jwt_presented=True,
                jwt_sub=WEB,
                jwt_aud=(AUD,),
            ),
            "deny",
            "invoices-write",
            "jwt_subject_mismatch",
        ),
        (group(CHECKOUT, "/api/invoices", method="POST"), "deny", "invoices-write", "jwt_missing"),
        (group(EDGE, "/payments/1", origin=PARTNER), "allow", "payments", "allowed"),
        (group(EDGE, "/payments/1", origin=DEV), "deny", "payments", "origin_not_allowed"),
        (group(EDGE, "/payments/1"), "deny", "payments", "origin_missing"),
        (group(BATCH, "/reports/2026/pdf"), "allow", "reports", "allowed"),
        (
            group(BATCH, "/reports/2026/pdf", leaf_not_before="2026-11-23T09:00:00.000000Z"),
            "deny",
            "reports",
            "certificate_lifetime_too_long",
        ),
        (
            group(
                BATCH,
                "/reports/2026/pdf",
                leaf_not_before="2026-11-20T09:00:00.000000Z",
                leaf_not_after="2026-12-23T12:00:00.000000Z",
            ),
            "deny",
            "reports",
            "certificate_lifetime_too_long",
        ),
        (group(leaf_sha256="dead" + "0" * 60), "deny", None, "certificate_revoked"),
        (
            group(EDGE, "/payments/1", origin=PARTNER, origin_sha256="dead" + "0" * 60),
            "deny",
            None,
            "certificate_revoked",
        ),
        (group(time="2026-11-23T13:00:00.000000Z"), "deny", None, "certificate_expired"),
        (group(leaf_not_before=None), "allow", "health", "allowed"),
    ],
    ids=[
        "allowed",
        "second_pattern",
        "not_allowed",
        "no_route",
        "jwt_rebuilt_for_its_audience",
        "jwt_of_another_audience",
        "jwt_of_another_subject",
        "no_token",
        "origin_allowed",
        "origin_not_allowed",
        "origin_missing",
        "lifetime_under_route_limit",
        "lifetime_over_route_limit",
        "lifetime_over_policy_limit",
        "revoked_leaf",
        "revoked_origin_leaf",
        "expired_at_the_logged_time",
        "no_not_before_lifetime_not_judged",
    ],
)
def test_judge(g: R.RequestGroup, outcome: str, route: str | None, reason: str) -> None:
    judged = Judge(policy()).judge(g)
    assert judged is not None
    assert (judged.outcome, judged.route, judged.reason) == (outcome, route, reason)


@pytest.mark.parametrize(
    "g",
    [
        group(None),
        group(path=None),
        group(method=None),
        group("spiffe://E.org/x"),
        group(EDGE, origin="nope"),
    ],
    ids=["no_identity", "no_path", "no_method", "bad_spiffe_id", "bad_origin"],
)
def test_judge_refuses_what_it_cannot_rebuild(g: R.RequestGroup) -> None:
    assert Judge(policy()).judge(g) is None


def test_a_token_not_validated_when_logged_is_judged_without_it_and_said_so() -> None:
    judged = Judge(policy()).judge(
        group(CHECKOUT, "/api/invoices", method="POST", jwt_presented=True)
    )
    assert judged is not None and judged.reason == "jwt_missing" and judged.note == JWT_UNKNOWN
    judged = Judge(policy()).judge(group(CHECKOUT, "/api/invoices/1", jwt_presented=True))
    assert judged is not None and judged.outcome == "allow" and judged.note == ""


def test_judging_is_cached_only_where_the_policy_cannot_tell_requests_apart() -> None:
    judge = Judge(policy())
    same = [group(DEV, f"/api/invoices/{i}") for i in range(50)]
    assert {judge.judge(g).outcome for g in same} == {"allow"}  # type: ignore[union-attr]
    assert judge.evaluated == 1
    assert judge.judge(group(DEV, "/legacy/x")).reason == "identity_not_allowed"  # type: ignore[union-attr]
    assert judge.judge(group(WEB, "/legacy/x")).outcome == "allow"  # type: ignore[union-attr]
    assert judge.judge(group(DEV, "/api/invoices/1", method="POST")).route == "invoices-write"  # type: ignore[union-attr]
    assert judge.evaluated == 4
    # The class of a path is exactly the routes whose host and path match it.
    assert judge.target_class("billing.internal", "/api/invoices/9") == (1, 2)
    assert judge.target_class("other", "/api/invoices/9") == ()


def test_judge_agrees_with_the_policy_tests_decision_function() -> None:
    p = policy()
    for spiffe_id, method, host, path in [
        (WEB, "GET", "billing.internal", "/api/invoices/3"),
        (BATCH, "GET", "billing.internal", "/api/invoices/3"),
        (WEB, "GET", "x", "/legacy"),
        (DEV, "GET", "x", "/legacy"),
        (BATCH, "GET", "x", "/reports/1/pdf"),
    ]:
        want = tools.outcome(tools.decide(p, spiffe_id, method, host, path))
        now = dt.datetime.now(dt.UTC)
        g = group(
            spiffe_id,
            path,
            method=method,
            host=host,
            time=R.iso(now),
            leaf_not_before=R.iso(now - dt.timedelta(hours=1)),
            leaf_not_after=R.iso(now + dt.timedelta(hours=1)),
        )
        judged = Judge(p).judge(g)
        assert judged is not None and (judged.outcome, judged.route, judged.reason) == want


# --- replay -----------------------------------------------------------------------------


def test_replay_lists_exactly_the_flips_grouped_by_identity_and_route() -> None:
    old = [
        group(DEV, "/api/invoices/1", route="invoices", count=5),
        group(DEV, "/api/invoices/2", route="invoices", count=2),
        group(WEB, "/api/invoices/1", route="invoices", count=7),
        group(
            BATCH,
            "/api/invoices/1",
            decision="deny",
            reason="identity_not_allowed",
            route="invoices",
            count=3,
        ),
        group(WEB, "/bad", decision="error", reason="bad_request_target", route=None, count=4),
        group(None, count=2),
    ]
    tight = POLICY.replace(
        'allow: ["spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/dev/*"]',
        'allow: ["spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/batch/*"]',
    )
    s = stats()
    result = replay(old, Judge(policy(tight)), s)
    flips = [(f.direction, f.spiffe_id, f.old_route, f.new_route, f.requests) for f in result.flips]
    assert flips == [
        (ALLOW_TO_DENY, DEV, "invoices", "invoices", 7),
        (DENY_TO_ALLOW, BATCH, "invoices", "invoices", 3),
    ]
    assert result.breaks == 7 and result.opens == 3 and result.unchanged == 7
    assert result.judged == 17
    assert s.skipped == {R.SKIP_REFUSED: 4, R.SKIP_INCOMPLETE: 2}
    dev = result.flips[0]
    assert dev.reasons == {"identity_not_allowed": 7}
    assert [e["request"] for e in dev.to_json(3)["examples"]] == [
        "GET billing.internal /api/invoices/1",
        "GET billing.internal /api/invoices/2",
    ]
    text = report.text(result.tables(), result.notes())
    assert "allow->deny" in text and "7 allow->deny, 3 deny->allow" in text


def test_replay_of_the_same_policy_changes_nothing() -> None:
    logged = [
        group(DEV, "/api/invoices/1", route="invoices"),
        group(
            BATCH,
            "/api/invoices/1",
            decision="deny",
            reason="identity_not_allowed",
            route="invoices",
        ),
        group(EDGE, "/payments/1", origin=PARTNER, route="payments"),
    ]
    result = replay(logged, Judge(policy()), stats())
    assert result.flips == [] and result.breaks == 0 and result.unchanged == 3


# --- unused -----------------------------------------------------------------------------


def test_unused_finds_routes_never_hit_patterns_unused_and_broad_grants() -> None:
    logged = [
        group(WEB, "/healthz"),
        group(DEV, "/healthz"),
        group(BATCH, "/healthz"),
        group(WEB, "/api/invoices/1"),
        group(DEV, "/api/invoices/1", decision="deny"),  # the logged verdict does not matter
        group(EDGE, "/payments/9", origin=PARTNER),
        group(WEB, "/bad", decision="error"),
    ]
    result = unused(logged, Judge(policy()), stats(), "in all the logs", few=2)
    found = {(f.kind, f.route, f.pattern) for f in result.findings}
    assert found == {
        (ROUTE_NEVER_HIT, "invoices-write", None),
        (ROUTE_NEVER_HIT, "reports", None),
        (ROUTE_NEVER_HIT, "legacy", None),
        (PATTERN_BROAD, "invoices", "allow[0] spiffe://e.org/ns/prod/*"),
        (PATTERN_BROAD, "invoices", "allow[1] spiffe://e.org/ns/dev/*"),
    }
    broad = next(f for f in result.findings if f.pattern == "allow[0] spiffe://e.org/ns/prod/*")
    assert broad.ids == (WEB,) and broad.requests == 1
    # health's whole-trust-domain grant was used by three identities: not "broad" at few=2
    result = unused(logged, Judge(policy()), stats(), "all", few=3)
    assert (PATTERN_BROAD, "health") in {(f.kind, f.route) for f in result.findings}


def test_a_pattern_that_matched_only_denied_callers_is_unused() -> None:
    text = textwrap.dedent("""\
        routes:
          - name: r
            match: {path_prefix: /}
            upstream: app
            allow: ["spiffe://e.org/ns/prod/sa/web", "spiffe://e.org/ns/dev/*"]
            deny: ["spiffe://e.org/ns/dev/sa/tool"]
        """)
    result = unused([group(WEB, "/x"), group(DEV, "/x")], Judge(policy(text)), stats(), "all")
    assert [(f.kind, f.pattern) for f in result.findings] == [
        (PATTERN_UNUSED, "allow[1] spiffe://e.org/ns/dev/*")
    ]


# --- inventory --------------------------------------------------------------------------


def usage(spiffe_id: str | None = WEB, **kw: Any) -> R.UsageRow:
    base: dict[str, Any] = dict(
        spiffe_id=spiffe_id,
        origin=None,
        origin_sha256=None,
        leaf_sha256="aa",
        leaf_issuer="CN=ca",
        leaf_not_before=NB,
        leaf_not_after=NA,
        peer_ip="10.0.0.1",
        route="r",
        decision="allow",
        count=1,
        first=T0,
        last=T0,
    )
    base.update(kw)
    return R.UsageRow(**base)


@pytest.mark.parametrize(
    ("intervals", "most"),
    [
        ([], 0),
        ([("a", "b")], 1),
        ([("a", "b"), ("c", "d")], 1),
        ([("a", "c"), ("b", "d")], 2),
        ([("a", "b"), ("b", "c")], 2),
        ([("a", "d"), ("b", "b"), ("c", "c")], 2),
    ],
    ids=["none", "one", "sequential", "overlapping", "touching", "instants_inside"],
)
def test_max_concurrent(intervals: list[tuple[str, str]], most: int) -> None:
    assert max_concurrent(intervals) == most


def test_inventory_aggregates_identities_credentials_and_flags() -> None:
    rows = [
        usage(
            WEB, count=3, first="2026-11-23T10:00:00.000000Z", last="2026-11-23T10:30:00.000000Z"
        ),
        usage(
            WEB,
            leaf_sha256="bb",
            count=2,
            first="2026-11-23T10:40:00.000000Z",
            last="2026-11-23T11:00:00.000000Z",
            route="s",
        ),
        usage(WEB, decision="deny", route=None, count=1),
        usage(
            BATCH,
            leaf_sha256="cc",
            leaf_not_before="2026-01-01T00:00:00.000000Z",
            leaf_not_after="2027-01-01T00:00:00.000000Z",
            peer_ip="10.0.1.5",
        ),
        usage(
            BATCH,
            leaf_sha256="dd",
            peer_ip="192.168.0.1",
            first="2026-11-23T11:00:00.000000Z",
            last="2026-11-23T13:00:00.000000Z",
        ),
        usage(DEV, decision="deny", count=4),
        usage(EDGE, origin=PARTNER, origin_sha256="ee", count=6),
        usage(None, count=9),
    ]
    s = stats()
    result = inventory(rows, s, [None, 86400.0])
    by = {(i.spiffe_id, i.kind): i for i in result.identities}
    web = by[(WEB, "peer")]
    assert web.verdicts == {"allow": 5, "deny": 1} and web.routes == {"r": 3, "s": 2}
    assert [c.sha256 for c in web.credentials.values()] == ["aa", "bb"]
    assert web.first_seen == "2026-11-23T10:00:00.000000Z" and web.flags == [f"{CONCURRENT}(2)"]
    batch = by[(BATCH, "peer")]
    assert set(batch.flags) == {LONG_LIVED, SEVERAL_NETWORKS, f"{CONCURRENT}(2)"}
    assert batch.credentials["cc"].flags == [LONG_LIVED] and batch.credentials["dd"].flags == []
    assert batch.networks == {"10.0.1.0/24": 1, "192.168.0.0/24": 1}
    assert by[(DEV, "peer")].flags == [ONLY_DENIED]
    origin = by[(PARTNER, "origin")]
    assert origin.via == {EDGE: 6} and list(origin.credentials) == ["ee"]
    assert s.skipped == {R.SKIP_INCOMPLETE: 9}
    tables = result.tables()
    assert [t.title for t in tables] == ["Workload identities", "Credentials"]
    assert len(tables[1].rows) == 7  # web aa, bb; batch cc, dd; dev aa; edge aa; origin ee
    assert result.to_json()["identities"][0]["trust_domain"] == "e.org"
    rows_csv = list(csv.reader(io.StringIO(report.csv_text(result.csv_table()))))
    assert rows_csv[0][0] == "spiffe_id" and len(rows_csv) == 1 + 7  # one row per credential


def test_inventory_without_a_limit_flags_no_lifetime() -> None:
    rows = [usage(leaf_not_before="2020-01-01T00:00:00.000000Z")]
    assert LONG_LIVED not in inventory(rows, stats()).identities[0].flags


# --- suggest: path shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "identifier"),
    [
        ("1234", True),
        ("2026-11-23", True),
        ("3f2b8a1c-5d6e-4f70-8a9b-0c1d2e3f4a5b", True),
        ("deadbeef42", True),
        ("aB3dE5fG7hJ9kL1mN", True),
        ("a*b", True),
        ("invoices", False),
        ("v1", False),
        ("deadbeef", False),
        ("configuration-items", False),
    ],
    ids=[
        "digits",
        "date",
        "uuid",
        "hex",
        "token",
        "star",
        "word",
        "version",
        "hex_word",
        "long_word",
    ],
)
def test_is_identifier(segment: str, identifier: bool) -> None:
    assert is_identifier(segment) is identifier


def test_shapes_glob_identifiers_and_siblings_of_one_shape_keep_the_rest_exact() -> None:
    got = shapes(
        [
            "/api/invoices/1",
            "/api/invoices/2/",
            "/api/invoices",
            "/users/alice/profile",
            "/users/bob/profile",
            "/users/carol/profile",
            "/users/dave/settings",
            "/",
            "/healthz",
        ],
        glob_min=3,
    )
    assert got == {
        "/api/invoices/1": ("glob", "/api/invoices/*"),
        "/api/invoices/2": ("glob", "/api/invoices/*"),
        "/api/invoices": ("exact", "/api/invoices"),
        "/users/alice/profile": ("glob", "/users/*/profile"),
        "/users/bob/profile": ("glob", "/users/*/profile"),
        "/users/carol/profile": ("glob", "/users/*/profile"),
        "/users/dave/settings": ("exact", "/users/dave/settings"),
        "/": ("exact", "/"),
        "/healthz": ("exact", "/healthz"),
    }


def test_shapes_below_the_glob_threshold_stay_exact() -> None:
    got = shapes(["/users/alice/profile", "/users/bob/profile"], glob_min=3)
    assert {v for v in got.values()} == {
        ("exact", "/users/alice/profile"),
        ("exact", "/users/bob/profile"),
    }


def test_a_deep_tree_used_alike_becomes_a_prefix_and_mixed_use_does_not() -> None:
    paths = [
        "/docs/guide/intro",
        "/docs/guide/setup/linux",
        "/docs/guide/setup/mac",
        "/docs/api",
        "/docs/api/v1/ref",
        "/docs/faq",
        "/docs/changelog",
        "/docs/about/team",
        "/other",
    ]
    same = {p: frozenset({("GET", WEB)}) for p in paths}
    got = shapes(paths, prefix_min=8, profiles=same)
    assert set(got.values()) == {("prefix", "/docs"), ("exact", "/other")}
    assert set(shapes(paths, prefix_min=9, profiles=same).values()) == {("exact", p) for p in paths}
    mixed = dict(same, **{"/docs/faq": frozenset({("GET", DEV)})})
    got = shapes(paths, prefix_min=8, profiles=mixed)
    assert set(got.values()) == {("exact", p) for p in paths}


def test_normalise_drops_one_trailing_slash() -> None:
    assert [normalise(p) for p in ("/", "/a/", "/a")] == ["/", "/a", "/a"]


# --- suggest: policies ------------------------------------------------------------------


def observed() -> list[R.RequestGroup]:
    out = [
        group(WEB, f"/api/invoices/{i}", route="invoices", upstream="billing", count=i)
        for i in range(1, 6)
    ]
    out += [
        group(DEV, f"/api/invoices/{i}", route="invoices", upstream="billing") for i in range(3)
    ]
    out += [
        group(
            CHECKOUT,
            "/api/invoices",
            method="POST",
            jwt_presented=True,
            jwt_sub=CHECKOUT,
            jwt_aud=(AUD,),
            route="invoices-write",
            upstream="billing",
            count=4,
        ),
        group(WEB, "/healthz", host="orders.internal", count=2),
        group(WEB, "/healthz", count=3),
        group(EDGE, "/payments/1", origin=PARTNER, route="payments", count=2),
        group(WEB, "/v6", host="[::1]", route="legacy", count=1),
        # audit mode: denied but forwarded, so granted
        group(
            BATCH,
            "/reports/2026/pdf",
            decision="deny",
            reason="identity_not_allowed",
            mode="audit",
            route="reports",
        ),
        # enforce mode: denied, not granted, and becomes a deny test
        group(
            BATCH,
            "/legacy/x",
            decision="deny",
            reason="identity_not_allowed",
            route="legacy",
            upstream=None,
            count=6,
        ),
        group(WEB, "/bad", decision="error", route=None),
    ]
    return out


def test_suggest_grants_exactly_what_was_forwarded_and_its_tests_pass() -> None:
    s = stats()
    result = suggest(observed(), s, policy())
    p = result.policy
    assert [t.passed for t in tools.run_tests(p)] == [True] * len(p.tests)
    assert s.skipped == {R.SKIP_REFUSED: 1, R.SKIP_NOT_FORWARDED: 6}
    assert result.still_denied == {}
    judge = Judge(p)
    for g in observed():
        judged = judge.judge(g)
        assert judged is not None
        forwarded = g.decision == "allow" or g.mode == "audit"
        if g.decision != "error":
            assert judged.outcome == ("allow" if forwarded else "deny"), g
    routes = {r.name: r for r in p.routes}
    inv = next(r for r in p.routes if r.match.path and r.match.path.value == "/api/invoices/*")
    assert sorted(a.text for a in inv.allow) == [DEV, WEB] and inv.upstream == "billing"
    assert inv.match.methods == frozenset({"GET", "HEAD"})  # GET implies HEAD
    write = next(r for r in p.routes if r.match.methods == frozenset({"POST"}))
    assert write.audiences == (AUD,) and [a.text for a in write.allow] == [CHECKOUT]
    pay = next(r for r in p.routes if r.match.path and r.match.path.value == "/payments/*")
    assert [o.text for o in pay.origin] == [PARTNER] and [a.text for a in pay.allow] == [EDGE]
    health = [r for r in p.routes if r.match.path and r.match.path.value == "/healthz"]
    assert len(health) == 1 and sorted(h.text for h in health[0].match.hosts) == [
        "billing.internal",
        "orders.internal",
    ]
    assert routes  # names are unique by construction of the dict
    v6 = next(r for r in p.routes if r.match.path and r.match.path.value == "/v6")
    assert v6.match.hosts == () and v6 is p.routes[-1]  # host-less routes come last
    # Nothing else is granted: another identity, method, host or route is denied.
    for spiffe_id, method, host, path in [
        (DEV, "POST", "billing.internal", "/api/invoices"),
        (PARTNER, "GET", "billing.internal", "/api/invoices/1"),
        (WEB, "DELETE", "billing.internal", "/api/invoices/1"),
        (WEB, "GET", "other.internal", "/api/invoices/1"),
        (WEB, "GET", "billing.internal", "/admin"),
        (BATCH, "GET", "billing.internal", "/legacy/x"),
    ]:
        assert tools.outcome(tools.decide(p, spiffe_id, method, host, path))[0] == "deny"
    text = result.text
    assert "# 18 requests from 2 identities" in text  # the invoices evidence
    assert (
        '- {id: "spiffe://e.org/ns/batch/sa/nightly", request: "GET billing.internal /legacy/x", expect: deny}'
        in text
    )
    assert "max_cert_lifetime: 86400s" in text and "cert_sha256:" in text
    assert f'- "{BATCH}"  # 1 request, 1 of them denied by the logged policy in audit mode' in text
    assert "# 1 of them were denied by the logged policy in audit mode" in text


def test_suggest_without_a_source_uses_the_logged_upstreams() -> None:
    result = suggest(observed(), stats())
    assert {r.upstream for r in result.policy.routes} == {"billing", "app"}


def test_suggest_orders_routes_so_the_first_match_allows_the_caller() -> None:
    # /a/b/c reaches an exact route, /a/x/c (x an identifier) the glob; a naive order
    # would send /a/b/c to /a/*/c whose caller differs.
    logged = [group(WEB, "/a/b/c")] + [group(DEV, f"/a/{i}/c") for i in range(4)]
    result = suggest(logged, stats())
    judge = Judge(result.policy)
    assert all(judge.judge(g).outcome == "allow" for g in logged)  # type: ignore[union-attr]
    values = [r.match.path.value for r in result.policy.routes if r.match.path]
    assert values.index("/a/b/c") < values.index("/a/*/c")


@pytest.mark.parametrize(
    "heads",
    [
        [group(DEV, "/healthz", method="HEAD")],  # a load balancer's HEAD, a web's GET
        [group(WEB, "/healthz", method="HEAD"), group(DEV, "/healthz", method="HEAD")],
    ],
    ids=["head_by_another", "head_by_both"],
)
def test_suggest_puts_a_head_route_before_the_get_route_that_would_take_it(
    heads: list[R.RequestGroup],
) -> None:
    """A route of GET also matches HEAD: a HEAD-only route after it is dead, and the
    policy would not load (a review found suggest stopping on it)."""
    logged = [group(WEB, "/healthz"), *heads]
    result = suggest(logged, stats())
    judge = Judge(result.policy)
    assert all(judge.judge(g).outcome == "allow" for g in logged)  # type: ignore[union-attr]
    methods = [tuple(sorted(r.match.methods or ())) for r in result.policy.routes]
    assert methods == [("HEAD",), ("GET", "HEAD")]


def test_suggest_reads_paths_logged_before_a_change_of_the_canonical_form() -> None:
    """/users/%40me was canonical once; requests are now matched as /users/@me, and the
    suggested route says so (it would not load otherwise)."""
    logged = [group(WEB, "/users/%40me"), group(WEB, "/q/a{b")]
    result = suggest(logged, stats())
    values = sorted(r.match.path.value for r in result.policy.routes if r.match.path)
    assert values == ["/q/a%7Bb", "/users/@me"]


def test_a_path_logged_before_a_change_of_the_canonical_form_is_judged_as_now() -> None:
    """replay and unused judge /users/%40me (logged when %40 was kept) as /users/@me, the
    request it is now: the route of /users/@me takes it."""
    policy = load_policy(
        b"routes:\n  - {name: me, match: {path: /users/@me}, upstream: app, allow: []}\n"
        b"  - {name: rest, match: {path_prefix: /}, upstream: app, allow: ['spiffe://e.org/*']}\n",
        "p.yaml",
        {"app"},
    )
    judged = Judge(policy).judge(group(WEB, "/users/%40me"))
    assert judged is not None and (judged.route, judged.outcome) == ("me", "deny")


def test_suggest_with_nothing_forwarded_says_so() -> None:
    with pytest.raises(ValueError, match="nothing to grant"):
        suggest([group(decision="deny")], stats())


# --- output -----------------------------------------------------------------------------


def test_text_tables_align_and_csv_quotes() -> None:
    t = report.Table("T", ("name", "n", "items"), [("a", 1000, ["x", "y"]), ("long name", 5, None)])
    text = report.text([t], ["note"])
    assert text.splitlines() == [
        "T",
        "  name           n  items",
        "  a          1,000  x, y",
        "  long name      5  -",
        "",
        "note",
    ]
    assert report.csv_text(t).splitlines() == ["name,n,items", "a,1000,x;y", "long name,5,"]
    assert json.loads(report.render("json", [t], {"a": 1})) == {"a": 1}
    assert report.text([report.Table("E", ("x",), empty="(nothing)")]) == "E\n  (nothing)\n"


def test_every_output_format_of_every_result_renders() -> None:
    p = policy()
    results: list[Any] = [
        replay(observed(), Judge(p), stats()),
        unused(observed(), Judge(p), stats(), "all"),
        inventory([usage()], stats()),
    ]
    for r in results:
        assert report.render("table", r.tables(), r.to_json(), r.notes()).strip()
        assert json.loads(report.render("json", r.tables(), r.to_json()))
        assert report.render("csv", r.tables(), r.to_json()).count("\n") >= 1
