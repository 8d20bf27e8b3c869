"""``proxy.identity_map``: identities grouped by trust domain and path prefix, the edges
of policy and traffic (one row per kind of edge), and DOT text that shows hostile values
literally."""

from __future__ import annotations

import textwrap

import pytest

from proxy import identity_map as m
from proxy.policy import load_policy

POLICY = load_policy(
    textwrap.dedent("""\
    routes:
      - {name: orders, match: {path_prefix: /orders}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"], deny: ["spiffe://example.org/ns/prod/sa/batch"]}
      - {name: payments, match: {path_prefix: /payments}, upstream: app, allow: ["spiffe://partner.org/ns/pay/sa/api"]}
      - {name: reports, match: {path_prefix: /reports}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"]}
      - {name: closed, match: {path_prefix: /closed}, upstream: app, allow: ["spiffe://example.org/ns/prod/sa/batch"], deny: ["spiffe://example.org/ns/prod/*"]}
    """).encode(),
    "policy.yaml",
)
WEB = "spiffe://example.org/ns/prod/sa/web"
DEV = "spiffe://example.org/ns/dev/sa/tool"
API = "spiffe://partner.org/ns/pay/sa/api"
TRAFFIC = [
    m.Traffic(WEB, "orders", "allow", "allowed"),
    m.Traffic(WEB, "orders", "allow", "allowed"),
    m.Traffic(DEV, "orders", "deny", "identity_not_allowed"),
    m.Traffic(DEV, "orders", "deny", "identity_not_allowed"),
    m.Traffic(DEV, None, "deny", "no_matching_route"),
    m.Traffic(API, "old-route", "deny", "identity_not_allowed"),
]

GROUPS = [
    ("k8s_style_id", "spiffe://example.org/ns/prod/sa/web", ("example.org", "/ns/prod")),
    ("short_id", "spiffe://example.org/web", ("example.org",)),
    ("two_segments", "spiffe://example.org/team/web", ("example.org", "/team")),
    ("pattern_tail", "spiffe://example.org/ns/prod/*", ("example.org", "/ns/prod")),
    ("pattern_deep_tail", "spiffe://example.org/a/b/c/*", ("example.org", "/a/b")),
    ("whole_domain", "spiffe://example.org/*", ("example.org",)),
    ("wildcard_segment", "spiffe://example.org/ns/*/sa/web", ("example.org", "/ns")),
]


@pytest.mark.parametrize(("text", "group"), [g[1:] for g in GROUPS], ids=[g[0] for g in GROUPS])
def test_group_of(text: str, group: tuple[str, ...]) -> None:
    assert m.group_of(text) == group


def _edges(graph: m.Graph) -> dict[tuple[str, str, str], m.Edge]:
    return {(e.kind, e.source, e.target): e for e in graph.edges}


PATTERN = "pattern:spiffe://example.org/ns/prod/*"
EDGES = [
    ("granted_and_used", ("granted", PATTERN, "route:orders"), {"unused": False}),
    ("granted_unused_dashed", ("granted", PATTERN, "route:reports"), {"unused": True}),
    ("exact_id_is_an_identity", ("granted", f"id:{API}", "route:payments"), {"unused": True}),
    ("used_with_count", ("used", f"id:{WEB}", "route:orders"), {"count": 2}),
    (
        "denied_with_reasons",
        ("denied", f"id:{DEV}", "route:orders"),
        {"count": 2, "label": "2 identity_not_allowed"},
    ),
    ("denied_before_routes", ("denied", f"id:{DEV}", "route:(no route)"), {"count": 1}),
    ("route_of_an_older_policy", ("denied", f"id:{API}", "route:old-route"), {"count": 1}),
]


@pytest.mark.parametrize(("key", "want"), [e[1:] for e in EDGES], ids=[e[0] for e in EDGES])
def test_edges(key: tuple[str, str, str], want: dict[str, object]) -> None:
    edge = _edges(m.build(POLICY, TRAFFIC))[key]
    for name, value in want.items():
        assert getattr(edge, name) == value, name


def test_a_grant_a_deny_covers_is_not_drawn() -> None:
    edges = _edges(m.build(POLICY, TRAFFIC))
    assert not any(k[2] == "route:closed" for k in edges)  # deny ns/prod/* covers batch


def test_without_traffic_no_grant_is_called_unused() -> None:
    graph = m.build(POLICY, None)
    assert not graph.traffic_known
    assert all(e.kind == "granted" and not e.unused for e in graph.edges)


def test_identities_beyond_the_limit_are_counted_denied_first() -> None:
    graph = m.build(POLICY, TRAFFIC, max_identities=1)
    ids = [n.label for n in graph.nodes if n.kind == "identity"]
    assert DEV in ids and WEB not in ids  # the most denied first
    assert graph.omitted == 1  # WEB (API is drawn anyway: the policy names it)


def test_routes_keep_the_policy_order_after_identities() -> None:
    graph = m.build(POLICY, TRAFFIC)
    kinds = [n.kind for n in graph.nodes]
    assert kinds.index("route") > max(i for i, k in enumerate(kinds) if k != "route")


QUOTES = [
    ("plain", "orders", '"orders"'),
    ("double_quote", 'a"b', '"a\\"b"'),
    ("backslash_escape_of_graphviz", "\\N\\G", '"\\\\N\\\\G"'),
    ("entity_shown_not_decoded", "&lt;b&gt;", '"&amp;lt;b&amp;gt;"'),
    ("newline", "a\nb", '"a b"'),
    ("markup", "<script>", '"<script>"'),  # Graphviz escapes < in its SVG
]


@pytest.mark.parametrize(("text", "quoted"), [q[1:] for q in QUOTES], ids=[q[0] for q in QUOTES])
def test_quote(text: str, quoted: str) -> None:
    assert m.quote(text) == quoted


def test_dot_of_a_hostile_identity_keeps_it_in_its_string() -> None:
    hostile = 'spiffe://example.org/x"];evil[label="y'
    dot = m.to_dot(m.build(POLICY, [m.Traffic(hostile, None, "deny", "no_matching_route")]))
    assert 'evil[label="y' not in dot and 'x\\"];evil[label=\\"y' in dot
    assert dot.startswith("digraph identity_map {") and dot.rstrip().endswith("}")


def test_dot_styles_edges() -> None:
    dot = m.to_dot(m.build(POLICY, TRAFFIC), link=lambda n: f"?x={n.label}")
    assert 'class="granted unused", color="#6e7781", fontcolor="#6e7781", style=dashed' in dot
    assert 'class="denied", color="#cf222e"' in dot
    assert 'class="used", color="#1a7f37"' in dot
    assert 'URL="?x=orders"' in dot
    assert "subgraph cluster_td0 {" in dot and 'label="/ns/prod"' in dot
