"""Deny/revoked/lifetime/audit/audience rules, compiled matchers, shadowing, all errors."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import textwrap
from typing import Any

import pytest

from proxy.errors import PolicyError
from proxy.policy import Request, evaluate, load_policy
from proxy.policy.matcher import IdentityMatcher
from proxy.policy.model import Policy, Route, RouteMatch
from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch
from proxy.spiffe_id import SpiffeId, TrustDomain
from tests.jwt_helpers import EC_KEY, claims, mint
from tests.unit.policy_helpers import NOW, caller

ev = evaluate
AUTH = {TrustDomain("e.org"): {"k1": EC_KEY.public_key()}}

POLICY = textwrap.dedent("""\
    max_cert_lifetime: 24h
    revoked:
      ids: ["spiffe://e.org/ns/prod/sa/old-batch"]
      cert_sha256: ["9F:86:D0:81:88:4C:7D:65:9A:2F:EA:A0:C5:5A:D0:15:A3:BF:4F:1B:2B:0B:82:2C:D1:5D:6C:15:B0:F0:0A:08"]
    jwt: {header: Authorization, leeway: 30s}
    routes:
      - name: invoices-read
        match: {hosts: ["billing.internal"], path_prefix: /api/invoices, methods: [GET]}
        upstream: app
        allow: ["spiffe://e.org/ns/prod/*"]
        deny: ["spiffe://e.org/ns/prod/sa/batch"]
      - name: invoices-write
        match: {path_prefix: /api/invoices, methods: [POST]}
        upstream: app
        allow: ["spiffe://e.org/ns/prod/sa/checkout", "spiffe://e.org/ns/prod/sa/relay"]
        audiences: ["spiffe://e.org/billing"]
      - name: relay-write
        match: {path_prefix: /relay, methods: [POST]}
        upstream: app
        allow: ["spiffe://e.org/ns/prod/sa/relay"]
        audiences: ["spiffe://e.org/billing"]
        jwt_subject: any
        keep_token: true
      - name: reports-rollout
        match: {path: /reports/*/pdf}
        upstream: app
        allow: ["spiffe://e.org/ns/*/sa/reporting"]
        mode: audit
      - name: short-lived-only
        match: {path_prefix: /secrets}
        upstream: app
        allow: ["spiffe://e.org/*"]
        max_cert_lifetime: 1h
    tests:
      - {id: "spiffe://e.org/ns/prod/sa/web", request: "GET billing.internal /api/invoices/7", expect: allow}
      - {id: "spiffe://e.org/ns/prod/sa/batch", request: "GET billing.internal /api/invoices/7", expect: deny}
""").encode()

WEB = "spiffe://e.org/ns/prod/sa/web"
CHECKOUT = "spiffe://e.org/ns/prod/sa/checkout"
REVOKED_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def tok(sub: str, **kw: Any) -> str:
    return mint(claims(sub, aud="spiffe://e.org/billing", **kw))


ROWS: list[tuple[str, Any, tuple[str, str, str], str | None, bool, str, str | None]] = [
    # name, caller, (method, host, path), token, allowed, reason, route
    (
        "allowed",
        caller(WEB),
        ("GET", "billing.internal", "/api/invoices/7"),
        None,
        True,
        "allowed",
        "invoices-read",
    ),
    (
        # Every framework runs the GET view for HEAD: the GET route judges it, so HEAD
        # cannot fall through to a broader route.
        "head_is_judged_by_the_get_route",
        caller(WEB),
        ("HEAD", "billing.internal", "/api/invoices/7"),
        None,
        True,
        "allowed",
        "invoices-read",
    ),
    (
        "head_denied_where_get_is",
        caller("spiffe://e.org/ns/prod/sa/batch"),
        ("HEAD", "billing.internal", "/api/invoices"),
        None,
        False,
        "identity_denied",
        "invoices-read",
    ),
    (
        "deny_wins_over_allow",
        caller("spiffe://e.org/ns/prod/sa/batch"),
        ("GET", "billing.internal", "/api/invoices"),
        None,
        False,
        "identity_denied",
        "invoices-read",
    ),
    (
        "revoked_id_everywhere",
        caller("spiffe://e.org/ns/prod/sa/old-batch"),
        ("GET", "billing.internal", "/api/invoices"),
        None,
        False,
        "spiffe_id_revoked",
        None,
    ),
    (
        "revoked_cert",
        caller(WEB, sha=REVOKED_SHA),
        ("GET", "billing.internal", "/api/invoices"),
        None,
        False,
        "certificate_revoked",
        None,
    ),
    (
        "expired_cert",
        caller(WEB, age=dt.timedelta(hours=2)),
        ("GET", "billing.internal", "/api/invoices"),
        None,
        False,
        "certificate_expired",
        None,
    ),
    (
        "global_lifetime_limit",
        caller(WEB, lifetime=dt.timedelta(days=30)),
        ("GET", "billing.internal", "/api/invoices"),
        None,
        False,
        "certificate_lifetime_too_long",
        "invoices-read",
    ),
    (
        "route_lifetime_limit",
        caller(WEB, lifetime=dt.timedelta(hours=2)),
        ("GET", "x", "/secrets/a"),
        None,
        False,
        "certificate_lifetime_too_long",
        "short-lived-only",
    ),
    (
        "route_lifetime_ok",
        caller(WEB, lifetime=dt.timedelta(minutes=30)),
        ("GET", "x", "/secrets/a"),
        None,
        True,
        "allowed",
        "short-lived-only",
    ),
    (
        "jwt_required_missing",
        caller(CHECKOUT),
        ("POST", "x", "/api/invoices"),
        None,
        False,
        "jwt_missing",
        "invoices-write",
    ),
    (
        "jwt_ok",
        caller(CHECKOUT),
        ("POST", "x", "/api/invoices"),
        "CHECKOUT",
        True,
        "allowed",
        "invoices-write",
    ),
    (
        "jwt_replayed_by_other_workload",
        caller("spiffe://e.org/ns/prod/sa/relay"),
        ("POST", "x", "/api/invoices"),
        "CHECKOUT",
        False,
        "jwt_subject_mismatch",
        "invoices-write",
    ),
    (
        "jwt_subject_any",
        caller("spiffe://e.org/ns/prod/sa/relay"),
        ("POST", "x", "/relay/1"),
        "CHECKOUT",
        True,
        "allowed",
        "relay-write",
    ),
    (
        "jwt_wrong_audience",
        caller(CHECKOUT),
        ("POST", "x", "/api/invoices"),
        "WRONG_AUD",
        False,
        "jwt_wrong_audience",
        "invoices-write",
    ),
    (
        "jwt_expired",
        caller(CHECKOUT),
        ("POST", "x", "/api/invoices"),
        "EXPIRED",
        False,
        "jwt_expired",
        "invoices-write",
    ),
    (
        "glob_path",
        caller("spiffe://e.org/ns/dev/sa/reporting"),
        ("GET", "x", "/reports/q3/pdf"),
        None,
        True,
        "allowed",
        "reports-rollout",
    ),
    (
        "glob_one_segment_only",
        caller("spiffe://e.org/ns/dev/sa/reporting"),
        ("GET", "x", "/reports/a/b/pdf"),
        None,
        False,
        "no_matching_route",
        None,
    ),
]


def _token(which: str | None) -> str | None:
    if which == "CHECKOUT":
        return tok(CHECKOUT)
    if which == "WRONG_AUD":
        return mint(claims(CHECKOUT, aud="spiffe://e.org/other"))
    if which == "EXPIRED":
        return tok(CHECKOUT, ttl=-3600)
    return which


@pytest.mark.parametrize(
    ("who", "req", "token", "allowed", "reason", "route"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_rules(
    who: Any,
    req: tuple[str, str, str],
    token: str | None,
    allowed: bool,
    reason: str,
    route: str | None,
) -> None:
    policy = load_policy(POLICY, "p.yaml", {"app"})
    now = dt.datetime.now(dt.UTC) if token else NOW
    if token:  # JWTs carry real times: move the certificate window with them
        who = type(who)(
            who.spiffe_id,
            who.fingerprint,
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(minutes=55),
        )
    d = ev(policy, who, Request(*req, token=_token(token)), now, AUTH)
    assert (d.allowed, d.reason, d.route_name) == (allowed, reason, route)


ORIGIN_POLICY = textwrap.dedent("""\
    revoked: {ids: ["spiffe://e.org/ns/prod/sa/fired"]}
    routes:
      - name: via-edge
        match: {path_prefix: /}
        upstream: app
        allow: ["spiffe://e.org/ns/edge/sa/pep"]
        origin: ["spiffe://e.org/ns/prod/*"]
        deny: ["spiffe://e.org/ns/prod/sa/batch"]
""").encode()
EDGE = "spiffe://e.org/ns/edge/sa/pep"


@pytest.mark.parametrize(
    ("peer", "origin", "allowed", "reason"),
    [
        (EDGE, "spiffe://e.org/ns/prod/sa/web", True, "allowed"),
        (EDGE, None, False, "origin_missing"),
        (EDGE, "spiffe://e.org/ns/dev/sa/web", False, "origin_not_allowed"),
        (EDGE, "spiffe://e.org/ns/prod/sa/batch", False, "origin_denied"),
        (EDGE, "spiffe://e.org/ns/prod/sa/fired", False, "spiffe_id_revoked"),
        (
            "spiffe://e.org/ns/prod/sa/web",
            "spiffe://e.org/ns/prod/sa/web",
            False,
            "identity_not_allowed",
        ),
    ],
    ids=[
        "origin_allowed",
        "origin_missing",
        "origin_not_allowed",
        "deny_applies_to_origin",
        "revoked_origin",
        "peer_must_still_be_allowed",
    ],
)
def test_origin_rules(peer: str, origin: str | None, allowed: bool, reason: str) -> None:
    policy = load_policy(ORIGIN_POLICY, "p.yaml", {"app"})
    d = ev(
        policy,
        caller(peer),
        Request("GET", "h", "/x", None, SpiffeId.parse(origin) if origin else None),
        NOW,
    )
    assert (d.allowed, d.reason) == (allowed, reason)
    if allowed:
        assert d.rule == f"allow[0] {EDGE}; origin[0] spiffe://e.org/ns/prod/*"


def test_audit_mode_forwards_a_denial_and_reports_it() -> None:
    policy = load_policy(POLICY, "p.yaml", {"app"})
    d = ev(policy, caller(WEB), Request("GET", "x", "/reports/q3/pdf"), NOW)
    assert not d.allowed and d.reason == "identity_not_allowed"
    assert d.audit and d.forward
    d = ev(policy, caller(WEB), Request("GET", "x", "/nowhere"), NOW)
    assert not d.forward  # no route: nowhere to forward, even in audit mode


def test_global_audit_mode_applies_to_routes_without_their_own() -> None:
    text = (
        b"mode: audit\nroutes:\n"
        b"  - {name: b, upstream: app, allow: [], mode: enforce, match: {path: /b}}\n"
        b"  - {name: a, upstream: app, allow: []}\n"
    )
    policy = load_policy(text, "p.yaml")
    assert [r.mode for r in policy.routes] == ["enforce", "audit"]


def test_policy_tests_section_parsed() -> None:
    policy = load_policy(POLICY, "p.yaml", {"app"})
    assert [(t.spiffe_id, t.method, t.host, t.path, t.expect) for t in policy.tests][1] == (
        "spiffe://e.org/ns/prod/sa/batch",
        "GET",
        "billing.internal",
        "/api/invoices/7",
        "deny",
    )


# --- compiled matchers agree with the plain pattern semantics ---------------------------

SEGS = ["a", "b", "c", "*"]


def _random_patterns(rng: random.Random, n: int) -> list[IdentityPattern]:
    out = []
    for _ in range(n):
        segs = [rng.choice(SEGS) for _ in range(rng.randint(0, 3))]
        tail = rng.random() < 0.4 or not segs
        td = rng.choice(["e.org", "f.org"])
        out.append(
            IdentityPattern.parse(f"spiffe://{td}/" + "/".join(segs + (["*"] if tail else [])))
        )
    return out


@pytest.mark.parametrize("seed", range(20))
def test_identity_matcher_agrees_with_linear_scan(seed: int) -> None:
    rng = random.Random(seed)
    patterns = _random_patterns(rng, 12)
    matcher = IdentityMatcher(patterns)
    for td in ("e.org", "f.org"):
        for depth in range(1, 5):
            for segs in itertools.product("abcd", repeat=depth):
                sid = SpiffeId.parse(f"spiffe://{td}/" + "/".join(segs))
                expected = next((i for i, p in enumerate(patterns) if p.matches(sid)), -1)
                assert matcher.first(sid) == expected, (patterns, sid)


def test_route_index_agrees_with_linear_scan() -> None:
    # Built directly: the loader would (rightly) refuse the shadowed routes this makes.
    rng = random.Random(7)
    paths = ["/a", "/a/b", "/a/", "/b", "/", "/a/*/c", "/c/d"]
    routes = []
    for i in range(60):
        kind = rng.choice(["exact", "prefix", None])
        value = rng.choice(paths)
        if kind == "prefix" and "*" in value:
            kind = "exact"
        match = RouteMatch(
            hosts=(HostPattern.parse(rng.choice(["h", "*.h", "x"])),) if rng.random() < 0.3 else (),
            path=PathMatch.parse(kind, value) if kind else None,
            methods=frozenset([rng.choice(["GET", "POST"])]),
        )
        routes.append(Route(f"r{i}", match, "app", ()))
    policy = Policy(tuple(routes), "0" * 64)
    for path in ["/a", "/a/b", "/a/b/c", "/a/x/c", "/b", "/", "/c/d", "/c", "/a/", "/ab", "/a//c"]:
        for method in ("GET", "POST"):
            for host in ("h", "a.h", "x"):
                want = next((r for r in routes if r.matches_request(method, host, path)), None)
                assert policy.route_for(method, host, path) is want, (method, host, path)


# --- shadowing and error collection ---------------------------------------------------

SHADOW = [
    ("same_match", "{path_prefix: /api}", "{path_prefix: /api}", True),
    ("prefix_covers_longer", "{path_prefix: /api}", "{path_prefix: /api/v1, methods: [GET]}", True),
    ("prefix_covers_exact", "{path_prefix: /api}", "{path: /api/x}", True),
    ("prefix_covers_glob", "{path_prefix: /api}", "{path: /api/*/x}", True),
    ("any_covers_all", "{}", "{path: /x, hosts: [a.b]}", True),
    ("methods_subset", "{methods: [GET, POST]}", "{methods: [GET]}", True),
    ("wild_host_covers", "{hosts: ['*.e.com']}", "{hosts: [a.e.com, '*.x.e.com']}", True),
    ("narrower_methods_first", "{methods: [GET]}", "{methods: [GET, POST]}", False),
    ("boundary", "{path_prefix: /api}", "{path_prefix: /apix}", False),
    ("different_host", "{hosts: [a.e.com]}", "{hosts: [b.e.com]}", False),
    ("exact_then_prefix", "{path: /api}", "{path_prefix: /api}", False),
    ("host_then_any_host", "{hosts: [a.e.com]}", "{path: /x}", False),
]


@pytest.mark.parametrize(
    ("first", "second", "shadowed"), [r[1:] for r in SHADOW], ids=[r[0] for r in SHADOW]
)
def test_shadowed_route_is_an_error(first: str, second: str, shadowed: bool) -> None:
    text = (
        f"routes:\n  - {{name: a, upstream: app, allow: [], match: {first}}}\n"
        f"  - {{name: b, upstream: app, allow: [], match: {second}}}\n"
    ).encode()
    if shadowed:
        with pytest.raises(PolicyError) as exc:
            load_policy(text, "p.yaml")
        assert exc.value.location == "p.yaml:3:5"
        assert "route 'b' can never match: route 'a' (p.yaml:2:5)" in exc.value.message
    else:
        load_policy(text, "p.yaml")


def test_every_error_is_reported() -> None:
    text = textwrap.dedent("""\
        routes:
          - {name: a, upstream: app, allow: ["spiffe://e.org/x*"]}
          - {name: b, upstream: nope, allow: []}
          - {name: c, upstream: app, allow: [], mode: sometimes}
    """).encode()
    with pytest.raises(PolicyError) as exc:
        load_policy(text, "p.yaml", {"app"})
    errors = exc.value.errors  # type: ignore[attr-defined]
    assert [e.location for e in errors] == ["p.yaml:2:38", "p.yaml:3:25", "p.yaml:4:47"]


def test_a_test_of_a_refused_route_is_not_a_second_error() -> None:
    """The route's own error says what is wrong; 'no route named' beside it would send
    the admin looking for a typo in the test."""
    text = textwrap.dedent("""\
        routes:
          - {name: a, upstream: app, allow: [], match: {method: GET}}
        tests:
          - {id: 'spiffe://e.org/x', request: 'GET h /x', expect: deny, route: a}
          - {id: 'spiffe://e.org/x', request: 'GET h /x', expect: deny, route: b}
    """).encode()
    with pytest.raises(PolicyError) as exc:
        load_policy(text, "p.yaml", {"app"})
    errors = exc.value.errors  # type: ignore[attr-defined]
    assert [(e.location, "unknown key 'method'" in e.message) for e in errors[:1]] == [
        ("p.yaml:2:49", True)
    ]
    assert [e.message for e in errors[1:]] == ["tests[1].route: no route named 'b'"]  # nowhere


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("revoked: {ids: [nope]}\nroutes: []\n", "invalid SPIFFE ID"),
        ("revoked: {cert_sha256: [abc]}\nroutes: []\n", "64 hex digits"),
        ("jwt: {leeway: 60}\nroutes: []\n", "duration with a unit"),
        ("routes:\n  - {name: a, upstream: app, allow: [], keep_token: true}\n", "only apply"),
        (
            "routes:\n  - {name: a, upstream: app, allow: [], match: {path_prefix: /a/*}}\n",
            "path_prefix takes no",
        ),
        (
            "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /a*}}\n",
            "whole path segment",
        ),
        (
            "routes: []\ntests:\n  - {id: 'spiffe://e.org/x', request: 'GET /x', expect: allow}\n",
            "METHOD host /path",
        ),
        (
            "routes: []\ntests:\n  - {id: 'spiffe://e.org/x', request: 'GET h /x', expect: maybe}\n",
            "expect must be",
        ),
    ],
    ids=[
        "bad_revoked_id",
        "bad_sha",
        "leeway_without_unit",
        "keep_token_without_audiences",
        "prefix_glob",
        "partial_glob",
        "bad_test_request",
        "bad_expect",
    ],
)
def test_more_validation(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(text.encode(), "p.yaml")
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("a", "b", "overlaps", "covers"),
    [
        ("spiffe://e.org/*", "spiffe://e.org/ns/x", True, True),
        ("spiffe://e.org/ns/*", "spiffe://e.org/*", True, False),
        ("spiffe://e.org/ns/*/sa/web", "spiffe://e.org/ns/prod/*", True, False),
        ("spiffe://e.org/a", "spiffe://f.org/a", False, False),
        ("spiffe://e.org/a/*", "spiffe://e.org/b/*", False, False),
        ("spiffe://e.org/*/x", "spiffe://e.org/a/x", True, True),
    ],
)
def test_pattern_relations(a: str, b: str, overlaps: bool, covers: bool) -> None:
    pa, pb = IdentityPattern.parse(a), IdentityPattern.parse(b)
    assert pa.overlaps(pb) is overlaps and pb.overlaps(pa) is overlaps
    assert pa.covers(pb) is covers


def test_path_glob() -> None:
    g = PathMatch.parse("exact", "/api/*/items")
    assert g.kind == "glob" and g.matches("/api/7/items")
    assert not g.matches("/api//items") and not g.matches("/api/7/items/x")
