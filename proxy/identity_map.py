"""The identity map: identities (grouped by trust domain and path prefix) to routes, with
the edges the policy grants and the edges recent traffic used or was denied. Pure: a
graph model from a policy and decisions, and its Graphviz DOT text; ``ui_dot`` runs
``dot``.

Identities are the policy's allow patterns (a pattern naming one ID exactly is that ID)
and the SPIFFE IDs seen in traffic. Edges:

- ``granted``: an allow pattern of a route (one no deny pattern of the route covers);
  drawn dashed when traffic is known and no identity it matches was allowed on it;
- ``used``: an identity that was allowed on the route (with the count);
- ``denied``: an identity that was refused on the route, or before any route matched,
  drawn red with the count and reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from proxy.errors import SpiffeIdError
from proxy.policy.model import Policy
from proxy.policy.patterns import WILDCARD, IdentityPattern
from proxy.spiffe_id import SpiffeId

GRANTED, USED, DENIED = "granted", "used", "denied"
PATTERN, IDENTITY, ROUTE = "pattern", "identity", "route"
NO_ROUTE = "(no route)"  # denials before any route matched (no_matching_route, malformed)
UNKNOWN = "(no identity)"
PREFIX_SEGMENTS = 2  # identities are grouped by this many leading path segments at most
MAX_IDENTITIES = 40  # identities seen in traffic drawn at most (denied ones first)


@dataclass(frozen=True)
class Traffic:
    """What the map needs of one decision line."""

    spiffe_id: str | None
    route: str | None
    decision: str  # allow, deny, error
    reason: str = ""


@dataclass(frozen=True)
class Node:
    key: str  # unique: "pattern:...", "id:...", "route:..."
    label: str
    kind: str  # PATTERN, IDENTITY or ROUTE
    group: tuple[str, ...] = ()  # (trust domain, path prefix) of identities
    detail: str = ""  # a tooltip


@dataclass(frozen=True)
class Edge:
    source: str  # node keys
    target: str
    kind: str  # GRANTED, USED or DENIED
    count: int = 0
    unused: bool = False  # a grant that no recent traffic used
    reasons: tuple[tuple[str, int], ...] = ()  # denied: (reason, count), most first

    @property
    def label(self) -> str:
        if self.kind == USED:
            return str(self.count)
        if self.kind == DENIED:
            return ", ".join(f"{n} {r}" for r, n in self.reasons)
        return ""


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    traffic_known: bool = False  # False: no decisions were given, usage is unknown
    omitted: int = 0  # identities seen in traffic but not drawn (MAX_IDENTITIES)
    node_by_key: dict[str, Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_by_key", {n.key: n for n in self.nodes})


def group_of(spiffe_id: str) -> tuple[str, ...]:
    """(trust domain, path prefix) of an ID or pattern: its leading literal segments, at
    most ``PREFIX_SEGMENTS``, never an exact ID's last one (its name); (trust domain,)
    when there are none."""
    td, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    segments = path.split("/") if path else []
    literal: list[str] = []
    for seg in segments:
        if seg == WILDCARD:
            break
        literal.append(seg)
    if WILDCARD not in segments:
        literal = literal[:-1]
    prefix = literal[:PREFIX_SEGMENTS]
    return (td, "/" + "/".join(prefix)) if prefix else (td,)


def _exact(pattern: IdentityPattern) -> bool:
    return not pattern.tail and WILDCARD not in pattern.segments


def _identity_key(text: str) -> str:
    return "id:" + text


def build(
    policy: Policy,
    traffic: Iterable[Traffic] | None = None,
    max_identities: int = MAX_IDENTITIES,
) -> Graph:
    """The map of ``policy`` and, when given, the decisions ``traffic`` (None: usage is
    unknown and no grant is drawn as unused)."""
    nodes: dict[str, Node] = {}
    edges: list[Edge] = []
    patterns: dict[str, IdentityPattern] = {}

    def route_node(name: str, detail: str) -> str:
        key = "route:" + name
        nodes.setdefault(key, Node(key, name, ROUTE, (), detail))
        return key

    granted: list[tuple[str, str, IdentityPattern]] = []
    for route in policy.routes:
        rkey = route_node(route.name, f"{route.location} {route.match.describe()}".strip())
        for p in route.allow:
            if any(d.covers(p) for d in route.deny):
                continue
            if _exact(p):
                key = _identity_key(p.text)
                nodes.setdefault(key, Node(key, p.text, IDENTITY, group_of(p.text)))
            else:
                key = "pattern:" + p.text
                nodes.setdefault(key, Node(key, p.text, PATTERN, group_of(p.text)))
            patterns[key] = p
            granted.append((key, rkey, p))

    # Traffic, counted per (identity, route, allowed or not).
    counts: Counter[tuple[str, str | None, bool]] = Counter()
    reasons: dict[tuple[str, str | None], Counter[str]] = {}
    for t in traffic or ():
        ident = t.spiffe_id or UNKNOWN
        allowed = t.decision == "allow"
        counts[ident, t.route, allowed] += 1
        if not allowed:
            reasons.setdefault((ident, t.route), Counter())[t.reason or "?"] += 1

    # Identities seen: the denied ones first, then by traffic; at most ``max_identities``.
    per_identity: Counter[str] = Counter()
    denied_identity: Counter[str] = Counter()
    for (ident, _, allowed), n in counts.items():
        per_identity[ident] += n
        if not allowed:
            denied_identity[ident] += n
    ranked = sorted(per_identity, key=lambda i: (-denied_identity[i], -per_identity[i], i))
    shown = set(ranked[:max_identities])
    omitted = sum(1 for i in ranked[max_identities:] if _identity_key(i) not in nodes)

    used_routes: dict[str, set[str]] = {}  # route key -> identities allowed on it
    for (ident, name, allowed), n in sorted(counts.items(), key=lambda kv: str(kv[0])):
        if ident not in shown:
            continue
        ikey = _identity_key(ident)
        nodes.setdefault(ikey, Node(ikey, ident, IDENTITY, group_of(ident)))
        if name is None:
            rkey = route_node(NO_ROUTE, "refused before any route matched")
        else:  # a route of the policy, or of an older one
            rkey = route_node(name, "not in the policy in force")
        if allowed:
            edges.append(Edge(ikey, rkey, USED, n))
            used_routes.setdefault(rkey, set()).add(ident)
        else:
            why = reasons[ident, name].most_common()
            edges.append(Edge(ikey, rkey, DENIED, n, reasons=tuple(why)))

    known = traffic is not None
    grants = []
    for pkey, rkey, p in granted:
        users = used_routes.get(rkey, set())
        used = any(_matches(p, ident) for ident in users)
        grants.append(Edge(pkey, rkey, GRANTED, unused=known and not used))
    ordered = sorted(nodes.values(), key=_node_order)
    return Graph(tuple(ordered), tuple(grants + edges), known, omitted)


def _matches(pattern: IdentityPattern, text: str) -> bool:
    try:
        return pattern.matches(SpiffeId.parse(text))
    except SpiffeIdError:
        return False


def _node_order(n: Node) -> tuple[int, tuple[str, ...], str]:
    return ({PATTERN: 0, IDENTITY: 0, ROUTE: 1}[n.kind], n.group, n.label)


def traffic_of(records: Iterable[dict[str, object]]) -> Iterable[Traffic]:
    """The decision lines (``"event": "request"``) of parsed JSON-lines records."""
    for r in records:
        if r.get("event") == "request":
            route, sid = r.get("route"), r.get("spiffe_id")
            yield Traffic(
                sid if isinstance(sid, str) else None,
                route if isinstance(route, str) else None,
                str(r.get("decision") or ""),
                str(r.get("reason") or ""),
            )


# --- DOT ---------------------------------------------------------------------------------

FONT = "Helvetica,Arial,sans-serif"
COLORS = {"granted": "#6e7781", "used": "#1a7f37", "denied": "#cf222e"}
_NODE_STYLE = {
    PATTERN: 'shape=box, style="rounded,filled", fillcolor="#ddf4ff", color="#54aeff"',
    IDENTITY: 'shape=ellipse, style=filled, fillcolor="#ffffff", color="#57606a"',
    ROUTE: 'shape=box, style=filled, fillcolor="#fff8c5", color="#bf8700"',
}


def quote(text: str) -> str:
    """A DOT double-quoted string showing ``text`` literally: backslashes (Graphviz's
    escapes such as ``\\N``), quotes and line breaks escaped, and ``&`` written as
    ``&amp;`` so an entity in a label is shown, not decoded."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return '"' + text.replace("\r", " ").replace("\n", " ") + '"'


def _attrs(**kw: str | None) -> str:
    return ", ".join(f"{k}={quote(v)}" for k, v in kw.items() if v is not None)


def to_dot(graph: Graph, link: Callable[[Node], str | None] | None = None) -> str:
    """The graph as DOT text (left to right: identities, then routes). ``link``: the URL
    each node's shape leads to in the SVG (None: none)."""
    names = {n.key: f"n{i}" for i, n in enumerate(graph.nodes)}
    out = [
        "digraph identity_map {",
        f'  graph [rankdir=LR, fontname="{FONT}", fontsize=11, nodesep=0.2, ranksep=1.4, '
        'bgcolor="transparent"];',
        f'  node [fontname="{FONT}", fontsize=10, height=0.3];',
        f'  edge [fontname="{FONT}", fontsize=9, arrowsize=0.6];',
    ]
    if graph.omitted:
        more = f"{graph.omitted} more identities seen in traffic are not drawn"
        out.append(f"  label={quote(more)}; labelloc=b; fontsize=10;")

    def node_line(n: Node, indent: str) -> str:
        url = link(n) if link else None
        attrs = _attrs(
            id=n.key,
            label=n.label,
            tooltip=n.detail or n.label,
            URL=url,
            target="_top" if url else None,
        )
        return f'{indent}{names[n.key]} [{_NODE_STYLE[n.kind]}, class="{n.kind}", {attrs}];'

    # Identities by trust domain, then by path prefix within it.
    domains: dict[str, dict[str, list[Node]]] = {}
    for n in graph.nodes:
        if n.kind != ROUTE:
            td = n.group[0] if n.group else ""
            prefix = n.group[1] if len(n.group) > 1 else ""
            domains.setdefault(td, {}).setdefault(prefix, []).append(n)
    for i, (td, prefixes) in enumerate(sorted(domains.items())):
        out.append(f"  subgraph cluster_td{i} {{")
        out.append(
            f'    label={quote(td or UNKNOWN)}; style="rounded"; color="#8c959f"; '
            'fontcolor="#24292f"; class="trust-domain";'
        )
        for j, (prefix, members) in enumerate(sorted(prefixes.items())):
            if not prefix:
                out.extend(node_line(n, "    ") for n in members)
                continue
            out.append(f"    subgraph cluster_td{i}_{j} {{")
            out.append(
                f'      label={quote(prefix)}; style="rounded,dashed"; color="#afb8c1"; '
                'class="path-prefix";'
            )
            out.extend(node_line(n, "      ") for n in members)
            out.append("    }")
        out.append("  }")
    out.append("  subgraph cluster_routes {")
    out.append('    label="routes"; style="rounded"; color="#d4a72c"; class="routes";')
    out.extend(node_line(n, "    ") for n in graph.nodes if n.kind == ROUTE)
    out.append("  }")
    for e in graph.edges:
        color = COLORS[e.kind]
        style = "dashed" if e.unused else "solid"
        css = f"{e.kind} unused" if e.unused else e.kind
        width = "1" if e.kind == GRANTED else "1.6"
        source, target = graph.node_by_key[e.source], graph.node_by_key[e.target]
        what = {GRANTED: "granted", USED: "allowed", DENIED: "denied"}[e.kind]
        if e.unused:
            what = "granted, unused by recent traffic"
        tip = f"{source.label} -> {target.label}: {what}" + (f" ({e.label})" if e.label else "")
        attrs = _attrs(
            id=f"{e.kind}:{e.source}->{e.target}",
            label=e.label or None,
            tooltip=tip,
        )
        sep = ", " if attrs else ""
        out.append(
            f"  {names[e.source]} -> {names[e.target]} [class={quote(css)}, color={quote(color)},"
            f" fontcolor={quote(color)}, style={style}, penwidth={width}{sep}{attrs}];"
        )
    out.append("}")
    return "\n".join(out) + "\n"
