"""``spiffe-pep suggest``: a least-privilege policy from observed traffic (Otterize's
network mapper, IAM Access Analyzer's policy generation), typically gathered in
``mode: audit``.

Evidence is every request that was forwarded: allowed, or denied on an audit-mode route.
Requests denied in enforce mode are not granted; the most frequent become ``expect:
deny`` tests.

Routes are grouped from observed paths, per host:

1. a path segment that is an identifier (digits, a UUID, hex, a long token, or holding
   ``*``) is a ``*`` segment;
2. where ``glob_min`` or more sibling segments have the same shape below them
   (``/users/alice/profile``, ``/users/bob/profile``, ...), they become one ``*``
   segment;
3. where a subtree holds ``prefix_min`` or more distinct shapes of different depths, all
   used by the same identities with the same methods, it becomes a ``path_prefix``;
4. everything else stays exact.

Each shape gets one route per set of methods used by the same identities (so the first
route matching a request is always one that allows its caller), ``allow`` lists the exact
identities observed, ``origin`` the origins when every request came through a trusted
hop, ``audiences`` when every request carried a JWT-SVID. Routes are ordered most
specific first (literal segments before ``*``, host routes before host-less ones). The
upstream of each route is the one the ``--from`` policy sends those requests to, else
the logged one.

The result is verified before it is returned: every observed request is judged under it
by the live proxy's decision function (``judge.py``) and must be allowed by the route
that was made for it, and every generated test must pass (``policy.tools.run_tests``).

Pure: returns YAML text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.canonical import UpstreamRules
from proxy.errors import ConfigError
from proxy.governance import records as R
from proxy.governance.judge import ALLOW, Judge
from proxy.policy import tools
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from proxy.policy.patterns import HostPattern

STAR = "*"
EXACT, GLOB, PREFIX = "exact", "glob", "prefix"

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^[0-9a-fA-F]{8,}$")
_NUMERIC = re.compile(r"^[0-9][0-9._:,-]*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,}$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9-]*$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def is_identifier(segment: str) -> bool:
    """A segment that names one resource among many (or that a route cannot name)."""
    if STAR in segment:
        return True
    if _NUMERIC.match(segment) or _UUID.match(segment):
        return True
    if _HEX.match(segment) and any(c.isdigit() for c in segment):
        return True
    return bool(
        _TOKEN.match(segment)
        and any(c.isdigit() for c in segment)
        and any(c.isalpha() for c in segment)
    )


def _segments(path: str) -> list[str]:
    return [] if path == "/" else path[1:].split("/")


def normalise(path: str) -> str:
    """One trailing slash removed: an exact or glob route matches both."""
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


# --- path shapes ----------------------------------------------------------------------


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    star: _Node | None = None
    ends: set[str] = field(default_factory=set)  # observed (normalised) paths ending here
    prefix: bool = False


def _merge(into: _Node, other: _Node) -> None:
    into.ends |= other.ends
    for name, child in other.children.items():
        if name in into.children:
            _merge(into.children[name], child)
        else:
            into.children[name] = child
    if other.star is not None:
        if into.star is None:
            into.star = other.star
        else:
            _merge(into.star, other.star)


def _signature(node: _Node) -> frozenset[str]:
    """The shapes below a node, relative to it ("" when a path ends at it)."""
    out = {""} if node.ends else set()
    for name, child in node.children.items():
        out.update(f"/{name}{s}" for s in _signature(child))
    if node.star is not None:
        out.update(f"/*{s}" for s in _signature(node.star))
    return frozenset(out)


def _collapse(node: _Node, glob_min: int) -> None:
    for child in node.children.values():
        _collapse(child, glob_min)
    if node.star is not None:
        _collapse(node.star, glob_min)
    by_shape: dict[frozenset[str], list[str]] = {}
    for name, child in node.children.items():
        by_shape.setdefault(_signature(child), []).append(name)
    merged = False
    for names in by_shape.values():
        if len(names) >= glob_min:
            target = node.star or _Node()
            for name in names:
                _merge(target, node.children.pop(name))
            node.star = target
            merged = True
    if merged and node.star is not None:
        _collapse(node.star, glob_min)


def _terminals(node: _Node, depth: int = 0) -> Iterable[tuple[_Node, int]]:
    if node.ends:
        yield node, depth
    for child in node.children.values():
        yield from _terminals(child, depth + 1)
    if node.star is not None:
        yield from _terminals(node.star, depth + 1)


def _mark_prefixes(
    node: _Node, depth: int, prefix_min: int, profiles: Mapping[str, frozenset[Any]]
) -> None:
    """Top-down: the highest literal node whose subtree qualifies becomes a prefix."""
    if depth >= 1:
        found = list(_terminals(node))
        if len(found) >= prefix_min and len({d for _, d in found}) >= 2:
            kinds = {profiles[p] for n, _ in found for p in n.ends}
            if len(kinds) == 1:
                node.prefix = True
                node.children, node.star = {}, None
                return
    for child in node.children.values():  # only literal paths can be a path_prefix
        _mark_prefixes(child, depth + 1, prefix_min, profiles)


def _shape(root: _Node, path: str) -> tuple[str, str]:
    node = root
    segs: list[str] = []
    for seg in _segments(path):
        if node.prefix:
            break
        child = None if is_identifier(seg) else node.children.get(seg)
        if child is not None:
            node, part = child, seg
        else:
            assert node.star is not None, path  # every observed path is in the trie
            node, part = node.star, STAR
        segs.append(part)
    value = "/" + "/".join(segs)
    if node.prefix:
        return PREFIX, value
    return (GLOB if STAR in segs else EXACT), value


def shapes(
    paths: Iterable[str],
    glob_min: int = 3,
    prefix_min: int = 8,
    profiles: Mapping[str, frozenset[Any]] | None = None,
) -> dict[str, tuple[str, str]]:
    """Each (normalised) path's shape: (``exact`` | ``glob`` | ``prefix``, value).
    ``profiles``: who uses each path how (a prefix needs one profile for all below it)."""
    root = _Node()
    distinct = {normalise(p) for p in paths}
    for path in distinct:
        node = root
        for seg in _segments(path):
            if is_identifier(seg):
                node.star = node.star or _Node()
                node = node.star
            else:
                node = node.children.setdefault(seg, _Node())
        node.ends.add(path)
    _collapse(root, glob_min)
    if profiles is not None:
        _mark_prefixes(root, 0, prefix_min, profiles)
    return {p: _shape(root, p) for p in distinct}


# --- routes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """Forwarded requests of one identity, as evidence."""

    spiffe_id: str
    origin: str | None
    method: str
    host: str
    path: str
    upstream: str
    jwt_sub: str | None
    jwt_aud: tuple[str, ...]
    count: int
    first: str
    last: str
    group: R.RequestGroup


@dataclass
class Draft:
    hosts: list[str]  # empty: any host
    kind: str
    value: str
    methods: tuple[str, ...]
    upstream: str
    ids: dict[str, int]
    seen: list[Seen]
    name: str = ""
    extra_ids: dict[str, str] = field(default_factory=dict)  # added by verification: why

    @property
    def requests(self) -> int:
        return sum(s.count for s in self.seen)

    @property
    def audiences(self) -> tuple[str, ...]:
        if not self.seen or not all(s.jwt_sub and s.jwt_aud for s in self.seen):
            return ()
        return tuple(sorted({a for s in self.seen for a in s.jwt_aud}))

    @property
    def jwt_subject_any(self) -> bool:
        return bool(self.audiences) and any(s.jwt_sub != s.spiffe_id for s in self.seen)

    @property
    def origins(self) -> tuple[str, ...]:
        if not self.seen or not all(s.origin for s in self.seen):
            return ()
        return tuple(sorted({s.origin for s in self.seen if s.origin}))

    def order(self) -> tuple[Any, ...]:
        segs = tuple(1 if s == STAR else 0 for s in _segments(self.value))
        # A route of GET also matches HEAD: one for HEAD without GET (a load balancer's
        # checks) goes before it, or it could never match.
        return (not self.hosts, segs, self.value, "GET" in self.methods, self.methods, self.hosts)


def _host_key(host: str) -> str | None:
    """A host a route can name, else None (an IPv6 literal, no Host)."""
    if not host or host.startswith("["):
        return None
    try:
        HostPattern.parse(host)
    except ValueError:
        return None
    return host


def _name(d: Draft) -> str:
    parts = [STAR if s == STAR else s for s in _segments(d.value)]
    base = "-".join("any" if s == STAR else s for s in parts) or "root"
    if d.kind == PREFIX:
        base += "-all"
    methods = "-".join(m.lower() for m in d.methods) if len(d.methods) <= 3 else "multi"
    name = _NAME_BAD.sub("-", f"{base}.{methods}").strip("-._")[:60].strip("-._")
    return name if name and name[0].isalnum() else f"route-{name}".rstrip("-")


def drafts(seen: Iterable[Seen], glob_min: int = 3, prefix_min: int = 8) -> list[Draft]:
    """Routes from observations: grouped per host by shape, split by method sets."""
    per_host: dict[str | None, list[Seen]] = {}
    for s in seen:
        per_host.setdefault(_host_key(s.host), []).append(s)
    out: list[Draft] = []
    for host, items in per_host.items():
        profiles: dict[str, set[Any]] = {}
        for s in items:
            profiles.setdefault(normalise(s.path), set()).add(
                (s.method, s.spiffe_id, s.origin, s.upstream)
            )
        shape_of = shapes(
            (s.path for s in items),
            glob_min,
            prefix_min,
            {p: frozenset(v) for p, v in profiles.items()},
        )
        buckets: dict[tuple[str, str], dict[str, list[Seen]]] = {}
        for s in items:
            kind, value = shape_of[normalise(s.path)]
            buckets.setdefault((kind, value), {}).setdefault(s.method, []).append(s)
        for (kind, value), by_method in buckets.items():
            # Methods used by the same identities, to the same upstream, share a route.
            routes: dict[tuple[frozenset[str], str], list[str]] = {}
            for method, group in by_method.items():
                ups = _counts(group, lambda s: s.upstream)
                upstream = max(sorted(ups), key=lambda u: ups[u])  # ties: by name
                ids = frozenset(s.spiffe_id for s in group)
                routes.setdefault((ids, upstream), []).append(method)
            for (_, upstream), methods in routes.items():
                group = [s for m in methods for s in by_method[m]]
                out.append(
                    Draft(
                        [host] if host else [],
                        kind,
                        value,
                        tuple(sorted(methods)),
                        upstream,
                        _counts(group, lambda s: s.spiffe_id),
                        group,
                    )
                )
    return _merge_hosts(out)


def _counts(seen: Iterable[Seen], key: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in seen:
        k = key(s)
        out[k] = out.get(k, 0) + s.count
    return out


def _merge_hosts(items: list[Draft]) -> list[Draft]:
    """Routes alike but for their host become one route with a list of hosts."""
    merged: dict[tuple[Any, ...], Draft] = {}
    for d in items:
        if not d.hosts:
            key: tuple[Any, ...] = (None, id(d))
        else:
            key = (
                d.kind,
                d.value,
                d.methods,
                d.upstream,
                frozenset(d.ids),
                d.audiences,
                d.jwt_subject_any,
                d.origins,
            )
        into = merged.get(key)
        if into is None:
            merged[key] = d
            continue
        into.hosts = sorted({*into.hosts, *d.hosts})
        into.seen += d.seen
        for k, n in d.ids.items():
            into.ids[k] = into.ids.get(k, 0) + n
    out = sorted(merged.values(), key=Draft.order)
    used: set[str] = set()
    for d in out:
        name, n = _name(d), 1
        while name in used:
            n += 1
            name = f"{_name(d)}-{n}"
        used.add(name)
        d.name = name
    return out


# --- YAML -----------------------------------------------------------------------------


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of YAML's)."""
    return json.dumps(text)


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def _seconds(value: float) -> str:
    return f"{int(value)}s" if value == int(value) else f"{int(value * 1000)}ms"


@dataclass(frozen=True)
class TestCase:
    spiffe_id: str
    method: str
    host: str
    path: str
    expect: str
    audience: str | None = None
    route: str | None = None
    count: int = 0

    def yaml(self) -> str:
        parts = [
            f"id: {_q(self.spiffe_id)}",
            f"request: {_q(f'{self.method} {self.host} {self.path}')}",
        ]
        parts.append(f"expect: {self.expect}")
        if self.audience:
            parts.append(f"audience: {_q(self.audience)}")
        if self.route:
            parts.append(f"route: {self.route}")
        return "  - {" + ", ".join(parts) + "}" + f"  # seen {_n(self.count, 'time')}"


def _route_yaml(d: Draft) -> list[str]:
    paths: Counter[str] = Counter()
    for s in d.seen:
        paths[s.path] += s.count
    first = min(s.first for s in d.seen)
    last = max(s.last for s in d.seen)
    examples = [p for p, _ in paths.most_common(3)]
    who = f"{len(d.ids)} identit{'y' if len(d.ids) == 1 else 'ies'}"
    lines = [
        f"  # {_n(d.requests, 'request')} from {who}, "
        f"{first[:19]}Z to {last[:19]}Z; {_n(len(paths), 'distinct path')}, e.g. "
        + ", ".join(examples),
        f"  - name: {d.name}",
    ]
    match = []
    if d.hosts:
        match.append(f"hosts: {_flow(d.hosts)}")
    match.append(f"{'path_prefix' if d.kind == PREFIX else 'path'}: {_q(d.value)}")
    match.append(f"methods: {_flow(d.methods)}")
    lines.append("    match: {" + ", ".join(match) + "}")
    lines.append(f"    upstream: {_q(d.upstream)}")
    lines.append("    allow:")
    for ident, n in sorted(d.ids.items(), key=lambda x: (-x[1], x[0])):
        why = d.extra_ids.get(ident)
        audited = sum(x.count for x in d.seen if x.spiffe_id == ident and x.group.decision != ALLOW)
        note = f"  # {_n(n, 'request')}" if why is None else f"  # {why}"
        if audited and why is None:
            note += f", {audited:,} of them denied by the logged policy in audit mode"
        lines.append(f"      - {_q(ident)}{note}")
    if d.origins:
        lines.append(f"    origin: {_flow(d.origins)}  # every request came through a trusted hop")
    if d.audiences:
        lines.append(f"    audiences: {_flow(d.audiences)}  # every request carried a JWT-SVID")
        if d.jwt_subject_any:
            lines.append("    jwt_subject: any  # some tokens named another subject than the peer")
    return lines


@dataclass
class SuggestResult:
    text: str
    policy: Policy
    routes: list[Draft]
    tests: list[TestCase]
    stats: R.InputStats
    forwarded: int
    denied: int
    still_denied: dict[str, int]  # observed forwarded requests the suggestion denies, by reason
    notes: list[str]

    def summary(self) -> str:
        ids = len({i for d in self.routes for i in d.ids})
        return (
            f"{len(self.routes)} routes for {ids} identities from {self.forwarded:,} forwarded "
            f"requests; {len(self.tests)} tests"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.text,
            "routes": [
                {
                    "name": d.name,
                    "hosts": d.hosts,
                    "kind": d.kind,
                    "path": d.value,
                    "methods": list(d.methods),
                    "upstream": d.upstream,
                    "allow": d.ids,
                    "requests": d.requests,
                }
                for d in self.routes
            ],
            "tests": len(self.tests),
            "forwarded": self.forwarded,
            "denied_not_granted": self.denied,
            "still_denied": self.still_denied,
            "notes": self.notes,
            "input": self.stats.to_json(),
        }


def _header(forwarded: list[Seen], denied: int, n_routes: int, source: Policy | None) -> list[str]:
    ids = len({s.spiffe_id for s in forwarded})
    first = min(s.first for s in forwarded)[:19] + "Z"
    last = max(s.last for s in forwarded)[:19] + "Z"
    out = [
        "# A least-privilege policy suggested by `spiffe-pep suggest` from observed traffic:",
        f"# {sum(s.count for s in forwarded):,} forwarded requests from {ids} identities, "
        f"{first} to {last}, in {n_routes} routes.",
    ]
    audited = sum(s.count for s in forwarded if s.group.decision != ALLOW)
    if audited:
        out.append(
            f"# {audited:,} of them were denied by the logged policy in audit mode and "
            "forwarded anyway: their allow entries say so."
        )
    if denied:
        out.append(
            f"# {denied:,} requests denied in enforce mode were not granted "
            "(the deny tests below are some of them)."
        )
    if source is not None:
        out.append(f"# Upstreams, revocations and limits from {source.source}.")
    out.append("# Review it; `spiffe-pep check` and `spiffe-pep test` it before deploying.")
    return out


def _settings(source: Policy | None) -> list[str]:
    if source is None:
        return []
    out = []
    if source.max_cert_lifetime is not None:
        out.append(f"max_cert_lifetime: {_seconds(source.max_cert_lifetime)}")
    if source.revoked_ids or source.revoked_sha256:
        out.append("revoked:")
        if source.revoked_ids:
            out.append(f"  ids: {_flow(sorted(source.revoked_ids))}")
        if source.revoked_sha256:
            out.append(f"  cert_sha256: {_flow(sorted(source.revoked_sha256))}")
    if source.jwt_header != "authorization" or source.jwt_leeway != 60.0:
        out.append(
            f"jwt: {{header: {_q(source.jwt_header)}, leeway: {_seconds(source.jwt_leeway)}}}"
        )
    return out


def render(
    header: list[str], settings: list[str], routes: list[Draft], tests: list[TestCase]
) -> str:
    lines = [*header, *settings, "routes:"]
    for d in routes:
        lines += _route_yaml(d)
    if tests:
        lines.append("tests:  # real requests from the logs")
        lines += [t.yaml() for t in tests]
    return "\n".join(lines) + "\n"


def _allow_tests(routes: list[Draft], per_route: int) -> list[TestCase]:
    out = []
    for d in routes:
        if d.origins:
            continue  # a test case cannot name an origin
        for ident in sorted(d.ids, key=lambda i: (-d.ids[i], i))[:per_route]:
            mine = [s for s in d.seen if s.spiffe_id == ident and s.host and " " not in s.path]
            if not mine:
                continue
            best = max(mine, key=lambda s: (s.count, s.path))
            audience = None
            if d.audiences:  # every request of the route carried one of them
                audience = next(a for a in best.jwt_aud if a in d.audiences)
            out.append(
                TestCase(
                    ident, best.method, best.host, best.path, "allow", audience, d.name, best.count
                )
            )
    return out


def _deny_tests(denied: list[R.RequestGroup], limit: int) -> list[TestCase]:
    counts: dict[tuple[str, str, str, str], int] = {}
    for g in denied:
        if g.spiffe_id and g.method and g.host and g.path and " " not in g.path:
            key = (g.spiffe_id, g.method, g.host, g.path)
            counts[key] = counts.get(key, 0) + g.count
    ranked = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:limit]
    return [TestCase(i, m, h, p, "deny", count=n) for (i, m, h, p), n in ranked]


def suggest(
    groups: Iterable[R.RequestGroup],
    stats: R.InputStats,
    source: Policy | None = None,
    upstreams: Mapping[str, UpstreamRules] | None = None,
    glob_min: int = 3,
    prefix_min: int = 8,
    tests_per_route: int = 2,
    deny_tests: int = 10,
) -> SuggestResult:
    """The suggested policy, verified. Raises ``ValueError`` when no request was
    forwarded (there is nothing to grant)."""
    from_judge = Judge(source, upstreams) if source is not None else None
    forwarded: list[Seen] = []
    denied: list[R.RequestGroup] = []
    for g in groups:
        if g.decision not in ("allow", "deny"):
            stats.skip(R.SKIP_REFUSED, g.count)
            continue
        if not g.complete or not g.path or not g.path.startswith("/"):
            stats.skip(R.SKIP_INCOMPLETE, g.count)
            continue
        assert g.spiffe_id and g.method
        if not (g.decision == "allow" or (g.mode == "audit" and g.route)):
            stats.skip(R.SKIP_NOT_FORWARDED, g.count)
            denied.append(g)
            continue
        if not _METHOD.match(g.method):
            stats.skip(R.SKIP_INCOMPLETE, g.count)
            continue
        upstream = g.upstream
        if from_judge is not None and source is not None:
            judged = from_judge.judge(g)
            route = next((r for r in source.routes if judged and r.name == judged.route), None)
            upstream = route.upstream if route else upstream
        path = R.canonical_path(g.path)  # routes that load, from an older log too
        if not upstream or path is None:
            stats.skip(R.SKIP_INCOMPLETE, g.count)
            continue
        forwarded.append(
            Seen(
                g.spiffe_id,
                g.origin,
                g.method,
                g.host,
                path,
                upstream,
                g.jwt_sub,
                g.jwt_aud,
                g.count,
                g.first,
                g.last,
                g,
            )
        )
    if not forwarded:
        raise ValueError("no forwarded request in the logs: nothing to grant")
    routes = drafts(forwarded, glob_min, prefix_min)
    header = _header(forwarded, sum(g.count for g in denied), len(routes), source)
    settings = _settings(source)
    notes: list[str] = []
    still: dict[str, int] = {}
    for _ in range(5):
        text = render(header, settings, routes, [])
        policy = _load(text)
        still, fixes = _verify(policy, routes, forwarded, upstreams)
        if not fixes:
            break
        by_name = {d.name: d for d in routes}
        for route_name, s in fixes:
            d = by_name[route_name]
            d.ids[s.spiffe_id] = d.ids.get(s.spiffe_id, 0) + s.count
            d.extra_ids.setdefault(s.spiffe_id, f"its {s.method} {s.path} reaches this route first")
    tests = _allow_tests(routes, tests_per_route) + _deny_tests(denied, deny_tests)
    text = render(header, settings, routes, tests)
    policy = _load(text)
    failed = {
        (r.case.spiffe_id, r.case.method, r.case.host, r.case.path)
        for r in tools.run_tests(policy, upstreams=upstreams)
        if not r.passed
    }
    if failed:
        kept = [t for t in tests if (t.spiffe_id, t.method, t.host, t.path) not in failed]
        notes.append(f"{len(tests) - len(kept)} generated tests did not hold and were left out")
        tests = kept
        text = render(header, settings, routes, tests)
        policy = _load(text)
    for reason, n in sorted(still.items()):
        notes.append(f"{n:,} observed requests stay denied under the suggestion: {reason}")
    return SuggestResult(
        text,
        policy,
        routes,
        tests,
        stats,
        sum(s.count for s in forwarded),
        sum(g.count for g in denied),
        still,
        notes,
    )


def _load(text: str) -> Policy:
    try:
        return load_policy(text.encode(), "<suggested>")
    except ConfigError as exc:  # a bug here, not the user's: say so plainly
        errors = getattr(exc, "errors", [exc])
        raise AssertionError(f"suggest produced an invalid policy: {errors}\n{text}") from exc


def _verify(
    policy: Policy,
    routes: list[Draft],
    forwarded: list[Seen],
    upstreams: Mapping[str, UpstreamRules] | None,
) -> tuple[dict[str, int], list[tuple[str, Seen]]]:
    """Observed requests the suggestion denies: by reason, and those an earlier route
    catches without allowing the caller (fixed by allowing it there)."""
    judge = Judge(policy, upstreams)
    still: dict[str, int] = {}
    fixes: list[tuple[str, Seen]] = []
    for s in forwarded:
        judged = judge.judge(s.group)
        if judged is None or judged.outcome == ALLOW:
            continue
        if judged.reason == "identity_not_allowed" and judged.route is not None:
            fixes.append((judged.route, s))
        else:
            still[judged.reason] = still.get(judged.reason, 0) + s.count
    return still, fixes
