"""Identity/host/path matching, evaluation (default deny) and loader errors."""

from __future__ import annotations

import textwrap

import pytest

from proxy.errors import PolicyError, SpiffeIdError
from proxy.policy import Request, evaluate, load_policy
from proxy.policy.evaluate import NO_ROUTE, NOT_ALLOWED
from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch
from proxy.spiffe_id import SpiffeId
from tests.unit.policy_helpers import NOW, caller

PATTERN_ROWS = [
    # name, pattern, id, matches
    ("exact_hit", "spiffe://e.org/ns/prod/sa/web", "spiffe://e.org/ns/prod/sa/web", True),
    ("exact_miss_longer", "spiffe://e.org/ns/prod", "spiffe://e.org/ns/prod/sa/web", False),
    ("exact_case_sensitive", "spiffe://e.org/ns/Prod", "spiffe://e.org/ns/prod", False),
    ("domain_any", "spiffe://e.org/*", "spiffe://e.org/ns/prod/sa/web", True),
    ("domain_other_td", "spiffe://e.org/*", "spiffe://other.org/ns/prod", False),
    ("domain_suffix_confusion", "spiffe://e.org/*", "spiffe://e.org.evil.com/x", False),
    ("prefix_below", "spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/prod/sa/web", True),
    ("prefix_one_below", "spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/prod/x", True),
    ("prefix_not_itself", "spiffe://e.org/ns/prod/*", "spiffe://e.org/ns/prod", False),
    (
        "prefix_segment_boundary",
        "spiffe://e.org/ns/prod/*",
        "spiffe://e.org/ns/production/x",
        False,
    ),
    ("inner_wildcard", "spiffe://e.org/ns/*/sa/web", "spiffe://e.org/ns/dev/sa/web", True),
    (
        "inner_wildcard_one_segment",
        "spiffe://e.org/ns/*/sa/web",
        "spiffe://e.org/ns/a/b/sa/web",
        False,
    ),
    (
        "inner_wildcard_tail_differs",
        "spiffe://e.org/ns/*/sa/web",
        "spiffe://e.org/ns/dev/sa/api",
        False,
    ),
]


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [r[1:] for r in PATTERN_ROWS],
    ids=[r[0] for r in PATTERN_ROWS],
)
def test_identity_pattern(pattern: str, value: str, expected: bool) -> None:
    assert IdentityPattern.parse(pattern).matches(SpiffeId.parse(value)) is expected


BAD_PATTERNS = [
    ("no_scheme", "example.org/*"),
    ("no_path", "spiffe://e.org"),
    ("partial_star", "spiffe://e.org/ns/prod-*"),
    ("bad_td", "spiffe://E.org/*"),
    ("empty_segment", "spiffe://e.org//x"),
    ("dot_segment", "spiffe://e.org/../x"),
    ("trailing_slash", "spiffe://e.org/x/"),
    ("regex", "spiffe://e.org/ns/.+"),
]


@pytest.mark.parametrize("pattern", [r[1] for r in BAD_PATTERNS], ids=[r[0] for r in BAD_PATTERNS])
def test_bad_identity_patterns(pattern: str) -> None:
    with pytest.raises(SpiffeIdError):
        IdentityPattern.parse(pattern)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.e.com", "api.e.com", True),
        ("api.e.com", "x.api.e.com", False),
        ("*.e.com", "api.e.com", True),
        ("*.e.com", "a.b.e.com", True),
        ("*.e.com", "e.com", False),
        ("*.e.com", "evile.com", False),
        ("API.E.com", "api.e.com", True),
    ],
    ids=[
        "exact",
        "exact_no_sub",
        "wild",
        "wild_deep",
        "wild_not_apex",
        "wild_suffix_trick",
        "case",
    ],
)
def test_host_pattern(pattern: str, host: str, expected: bool) -> None:
    assert HostPattern.parse(pattern).matches(host) is expected


@pytest.mark.parametrize(
    ("kind", "value", "path", "expected"),
    [
        ("exact", "/a", "/a", True),
        ("exact", "/a", "/a/", True),
        ("exact", "/a", "/a//", False),
        ("prefix", "/api", "/api", True),
        ("prefix", "/api", "/api/x", True),
        ("prefix", "/api", "/apix", False),
        ("prefix", "/api/", "/api/x", True),
        ("prefix", "/", "/anything", True),
    ],
    ids=[
        "exact",
        "exact_matches_one_trailing_slash",
        "exact_not_two_slashes",
        "prefix_self",
        "prefix_below",
        "prefix_boundary",
        "prefix_slash",
        "prefix_root",
    ],
)
def test_path_match(kind: str, value: str, path: str, expected: bool) -> None:
    assert PathMatch(kind, value).matches(path) is expected


POLICY = textwrap.dedent("""\
    routes:
      - name: admin
        match: {path_prefix: /admin}
        upstream: app
        allow: ["spiffe://e.org/ns/ops/sa/admin"]
      - name: invoices-read
        match: {hosts: [billing.internal, "*.billing.internal"], path_prefix: /api/invoices,
                methods: [GET, HEAD]}
        upstream: app
        allow: ["spiffe://e.org/ns/prod/*", "spiffe://partner.org/ns/*/sa/api"]
      - name: health
        match: {path: /healthz}
        upstream: app
        allow: ["spiffe://e.org/*"]
      - name: blocked
        match: {path_prefix: /internal}
        upstream: app
        allow: []
""").encode()

EVAL_ROWS = [
    (
        "allowed_prefix",
        "spiffe://e.org/ns/prod/sa/web",
        "GET",
        "billing.internal",
        "/api/invoices/7",
        True,
        "invoices-read",
        "allow[0] spiffe://e.org/ns/prod/*",
    ),
    (
        "federated_inner_wildcard",
        "spiffe://partner.org/ns/pay/sa/api",
        "GET",
        "eu.billing.internal",
        "/api/invoices",
        True,
        "invoices-read",
        "allow[1] spiffe://partner.org/ns/*/sa/api",
    ),
    (
        "wrong_method_no_route",
        "spiffe://e.org/ns/prod/sa/web",
        "POST",
        "billing.internal",
        "/api/invoices",
        False,
        None,
        NO_ROUTE,
    ),
    (
        "wrong_host_no_route",
        "spiffe://e.org/ns/prod/sa/web",
        "GET",
        "other",
        "/api/invoices",
        False,
        None,
        NO_ROUTE,
    ),
    (
        "identity_not_allowed",
        "spiffe://e.org/ns/dev/sa/web",
        "GET",
        "billing.internal",
        "/api/invoices",
        False,
        "invoices-read",
        NOT_ALLOWED,
    ),
    (
        "first_match_decides",
        "spiffe://e.org/ns/prod/sa/web",
        "GET",
        "x",
        "/admin/users",
        False,
        "admin",
        NOT_ALLOWED,
    ),
    (
        "empty_allow_blocks",
        "spiffe://e.org/ns/ops/sa/admin",
        "GET",
        "x",
        "/internal/x",
        False,
        "blocked",
        NOT_ALLOWED,
    ),
    ("default_deny", "spiffe://e.org/ns/ops/sa/admin", "GET", "x", "/other", False, None, NO_ROUTE),
    (
        "exact_path",
        "spiffe://e.org/x",
        "GET",
        "x",
        "/healthz",
        True,
        "health",
        "allow[0] spiffe://e.org/*",
    ),
]


@pytest.mark.parametrize(
    ("peer", "method", "host", "path", "allowed", "route", "detail"),
    [r[1:] for r in EVAL_ROWS],
    ids=[r[0] for r in EVAL_ROWS],
)
def test_evaluate(
    peer: str, method: str, host: str, path: str, allowed: bool, route: str | None, detail: str
) -> None:
    policy = load_policy(POLICY, "p.yaml", {"app"})
    d = evaluate(policy, caller(peer), Request(method, host, path), NOW)
    assert d.allowed is allowed
    assert d.route_name == route
    assert (d.rule if allowed else d.reason) == detail


def test_policy_hash_and_locations() -> None:
    policy = load_policy(POLICY, "p.yaml", {"app"})
    assert len(policy.sha256) == 64
    assert policy.routes[1].location == "p.yaml:6:5"


LOADER_ERRORS = [
    ("yaml_syntax", "routes: [\n  - name: a\n", "p.yaml:2:3", "invalid YAML"),
    ("empty", "", "p.yaml", "policy is empty"),
    ("unknown_top_key", "routes: []\nroutez: []\n", "p.yaml:2:1", "unknown key 'routez'"),
    (
        "unknown_route_key",
        "routes:\n  - name: a\n    upstream: app\n    allow: []\n    alow: []\n",
        "p.yaml:5:5",
        "routes[0].alow: unknown key",
    ),
    (
        "missing_allow",
        "routes:\n  - name: a\n    upstream: app\n",
        "p.yaml:2:5",
        "missing required key 'allow'",
    ),
    (
        "bad_pattern",
        "routes:\n  - name: a\n    upstream: app\n    allow: ['spiffe://e.org/a*']\n",
        "p.yaml:4:13",
        "routes[0].allow[0]: invalid identity pattern",
    ),
    (
        "unknown_upstream",
        "routes:\n  - name: a\n    upstream: nope\n    allow: []\n",
        "p.yaml:3:15",
        "unknown upstream 'nope'",
    ),
    (
        "duplicate_name",
        "routes:\n  - {name: a, upstream: app, allow: []}\n"
        "  - {name: a, upstream: app, allow: []}\n",
        "p.yaml:3:12",
        "duplicate route name 'a' (first at p.yaml:2:5)",
    ),
    ("duplicate_key", "routes: []\nroutes: []\n", "p.yaml:2:1", "duplicate key 'routes'"),
    (
        "lowercase_method",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {methods: [get]}}\n",
        "p.yaml:2:59",
        "invalid method 'get'",
    ),
    (
        "path_and_prefix",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /a, path_prefix: /a}}\n",
        "p.yaml:2:48",
        "either 'path'",
    ),
    (
        "relative_path",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: a}}\n",
        "p.yaml:2:55",
        "must start with '/'",
    ),
    (
        "allow_not_list",
        "routes:\n  - {name: a, upstream: app, allow: spiffe://e.org/*}\n",
        "p.yaml:2:37",
        "expected a list of strings",
    ),
    (
        "bad_host",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {hosts: ['a:80']}}\n",
        "p.yaml:2:57",
        "invalid host pattern",
    ),
    # A route that can never match, written so a deny route would silently deny nothing
    # (found by an attack review: each passed `check`, then let the request through).
    (
        "deny_path_with_a_space",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path_prefix: '/f/top secret'}}\n",
        "p.yaml:2:62",
        "requests reach the policy as '/f/top%20secret'; write that",
    ),
    (
        "deny_path_with_lower_case_escapes",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /f/caf%c3%a9}}\n",
        "p.yaml:2:55",
        "as '/f/caf%C3%A9'",
    ),
    (
        "deny_path_in_raw_utf8",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /f/café}}\n",
        "p.yaml:2:55",
        "as '/f/caf%C3%A9'",
    ),
    (
        "deny_path_with_an_escaped_unreserved_character",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path_prefix: /%61dmin}}\n",
        "p.yaml:2:62",
        "as '/admin'",
    ),
    (
        "deny_path_with_a_dot_segment",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path_prefix: /a/../admin}}\n",
        "p.yaml:2:62",
        "refused before the policy (dot segment in the path)",
    ),
    (
        "deny_host_with_a_trailing_dot",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {hosts: [admin.internal.]}}\n",
        "p.yaml:2:57",
        "write 'admin.internal'",
    ),
    (
        "deny_host_not_in_ascii",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {hosts: [bücher.example]}}\n",
        "p.yaml:2:57",
        "'xn--bcher-kva.example'",
    ),
    (
        "literal_star_escape_in_a_route",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /files/%2A}}\n",
        "p.yaml:2:55",
        "a literal '*' cannot be matched",
    ),
    (
        "path_parameters_in_a_route",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /a;b}}\n",
        "p.yaml:2:55",
        "';parameters' removed",
    ),
    (
        "host_with_an_empty_label",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {hosts: [admin..internal]}}\n",
        "p.yaml:2:57",
        "empty label",
    ),
    (
        # GET implies HEAD: a HEAD route after the GET route of the same path is dead,
        # and the error says why and what to do.
        "head_route_after_a_get_route",
        "routes:\n  - {name: a, upstream: app, allow: [], match: {path: /h, methods: [GET]}}\n"
        "  - {name: b, upstream: app, allow: [], match: {path: /h, methods: [HEAD]}}\n",
        "p.yaml:3:5",
        "(a route of GET also matches HEAD: put a route for HEAD before it)",
    ),
    (
        # libyaml's offsets count bytes: placed right after a line of multi-byte letters
        "control_character_after_multibyte_text",
        "routes: []\n# \u00e9\u00e9\u00e9\u00e9\n# a\x07b\n",
        "p.yaml:3:4",
        "control characters are not allowed",
    ),
    # Found by fuzzing (tests/fuzz): both escaped as exceptions of another type.
    ("unknown_yaml_tag", "!:", "p.yaml:1:1", "invalid YAML"),
    (
        "test_route_not_a_string",
        "routes:\n  - {name: a, upstream: app, allow: []}\n"
        "tests:\n  - {id: 'spiffe://e.org/x', request: 'GET h /', expect: deny, route: []}\n",
        "p.yaml:4:71",
        "tests[0].route: expected a non-empty string, got a list",
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "message"), [r[1:] for r in LOADER_ERRORS], ids=[r[0] for r in LOADER_ERRORS]
)
def test_loader_errors(text: str, where: str, message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(text.encode(), "p.yaml", {"app"})
    assert exc.value.location == where, str(exc.value)
    assert message in exc.value.message


TWO_CASES = b"""\
routes:
  - {name: admin, match: {path_prefix: /admin}, upstream: iis, allow: []}
  - {name: admin-upper, match: {path_prefix: /Admin}, upstream: iis, allow: ["spiffe://example.org/*"]}
"""


def test_routes_differing_only_by_case_to_a_case_insensitive_upstream_are_an_error() -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(TWO_CASES, "p.yaml", {"iis"}, case_insensitive={"iis"})
    assert exc.value.location == "p.yaml:3:32"  # the match of the second route
    assert "only by case" in exc.value.message
    load_policy(TWO_CASES, "p.yaml", {"iis"})  # a case-sensitive upstream: two resources


def test_case_insensitive_upstream_routes_match_folded_paths() -> None:
    text = b"routes:\n  - {name: admin, match: {path: /Admin/Users}, upstream: iis, allow: []}\n"
    policy = load_policy(text, "p.yaml", {"iis"}, case_insensitive={"iis"})
    for path in ("/admin/users", "/ADMIN/USERS", "/Admin/Users/"):
        assert policy.route_for("GET", "h", path) is not None, path
    assert load_policy(text, "p.yaml", {"iis"}).route_for("GET", "h", "/admin/users") is None


@pytest.mark.parametrize(
    ("slash", "path", "matched"),
    [
        ("", "/secret/", True),
        ("optional", "/secret/", True),
        ("strict", "/secret/", False),
        ("strict", "/secret", True),
    ],
    ids=["default", "optional", "strict", "strict_exact"],
)
def test_trailing_slash_option(slash: str, path: str, matched: bool) -> None:
    opt = f", trailing_slash: {slash}" if slash else ""
    text = f"routes:\n  - {{name: s, match: {{path: /secret{opt}}}, upstream: app, allow: []}}\n"
    policy = load_policy(text.encode(), "p.yaml", {"app"})
    assert (policy.route_for("GET", "h", path) is not None) is matched


def test_trailing_slash_needs_a_path() -> None:
    text = b"routes:\n  - {name: s, match: {path_prefix: /a, trailing_slash: strict}, upstream: app, allow: []}\n"
    with pytest.raises(PolicyError, match="trailing_slash"):
        load_policy(text, "p.yaml", {"app"})


@pytest.mark.parametrize(
    ("data", "where", "message"),
    [
        # An editor's Latin-1 save: PyYAML said "incomplete UTF-8 octet sequence (byte 0x-1)".
        (b"routes: []\n# caf\xe9\n", "p.yaml:2:6", "not UTF-8 (byte 0xe9): save the file as UTF-8"),
        # A UTF-16 save: PyYAML read it as UTF-16 and complained about its content.
        (
            "routes: []\n".encode("utf-16"),
            "p.yaml:1:1",
            "the file is UTF-16 (it starts with a byte-order mark): save it as UTF-8",
        ),
    ],
    ids=["latin1_byte", "utf16_bom"],
)
def test_a_file_not_in_utf8_is_named_as_such(data: bytes, where: str, message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policy(data, "p.yaml", {"app"})
    assert (exc.value.location, exc.value.message) == (where, message)


def test_a_utf8_byte_order_mark_is_fine() -> None:
    assert load_policy(b"\xef\xbb\xbfroutes: []\n", "p.yaml", {"app"}).routes == ()
