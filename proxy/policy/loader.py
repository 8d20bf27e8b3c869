"""Policy YAML -> :class:`Policy`. Errors name file:line:column, the data path and a
sentence; every error in the file is reported, not just the first.

Opens no files and logs nothing: the caller passes the file's bytes and name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Collection
from typing import Any

from proxy import drift
from proxy.errors import ConfigError, PolicyError, SpiffeIdError
from proxy.policy.model import AUDIT, ENFORCE, Policy, PolicyTest, Route, RouteMatch
from proxy.policy.patterns import HostPattern, PathMatch, read_patterns
from proxy.schema import Reader
from proxy.spiffe_id import SpiffeId
from proxy.yamlsrc import Path, load

_METHOD = re.compile(r"^[A-Z][A-Z0-9-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+$")
ROUTE_KEYS = [
    "match",
    "deny",
    "origin",
    "audiences",
    "jwt_subject",
    "keep_token",
    "mode",
    "max_cert_lifetime",
    "drift",
]


class PolicyErrors(PolicyError):
    """Several errors in one policy; ``errors`` lists each, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first.location, first.message + more)
        self.errors = errors


def load_policy(
    data: bytes,
    filename: str = "<policy>",
    upstreams: Collection[str] | None = None,
    case_insensitive: Collection[str] = (),
) -> Policy:
    """Parse and validate a policy. ``upstreams``, when given, are the names routes may use;
    routes to a ``case_insensitive`` upstream match case-folded paths, and two routes to
    one whose paths differ only by case are an error (which one serves is ambiguous)."""
    doc, source = load(data, filename, PolicyError)
    r = Reader(source)
    if doc is None:
        raise r.fail((), "the policy is empty: it needs a 'routes' list")
    top = r.mapping(
        doc,
        (),
        required=["routes"],
        optional=["revoked", "max_cert_lifetime", "mode", "jwt", "tests", "drift"],
    )
    errors: list[ConfigError] = []

    def collect(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PolicyError as exc:
            errors.append(exc)
            return None

    mode = _mode(r, top["mode"], ("mode",)) if "mode" in top else ENFORCE
    max_life = (
        r.duration(top["max_cert_lifetime"], ("max_cert_lifetime",))
        if "max_cert_lifetime" in top
        else None
    )
    revoked_ids, revoked_sha = collect(_revoked, r, top.get("revoked")) or (
        frozenset(),
        frozenset(),
    )
    jwt_header, leeway = collect(_jwt, r, top.get("jwt")) or ("authorization", 60.0)
    policy_drift = None
    prefixes = drift.Prefixes()
    if "drift" in top:
        policy_drift = collect(drift.read_config, r, top["drift"], ("drift",), None, top=True)
        prefixes = collect(drift.read_prefixes, r, top["drift"], ("drift",)) or prefixes

    if not isinstance(top["routes"], list):
        raise r.fail(("routes",), "expected a list of routes")
    routes: list[Route] = []
    names: dict[str, Route] = {}
    for i, raw in enumerate(top["routes"]):
        route = collect(
            _route, r, raw, ("routes", i), upstreams, mode, case_insensitive, policy_drift
        )
        if route is None:
            continue
        twin = _case_twin(route, routes)
        if twin is not None:
            errors.append(
                r.fail(
                    ("routes", i, "match"),
                    f"route {route.name!r} differs from route {twin.name!r} ({twin.location}) "
                    f"only by case, and upstream {route.upstream!r} ignores case",
                )
            )
            continue
        if route.fold_case and route.match.path is not None:
            m = route.match
            route = dataclasses.replace(
                route, match=RouteMatch(m.hosts, m.path.folded(), m.methods)
            )
        if route.name in names:
            errors.append(
                r.fail(
                    ("routes", i, "name"),
                    f"duplicate route name {route.name!r} (first at {names[route.name].location})",
                )
            )
            continue
        shadow = next((e for e in routes if e.match.covers(route.match)), None)
        if shadow is not None:
            hint = ""
            if "HEAD" in (route.match.methods or ()) and "GET" in (shadow.match.methods or ()):
                hint = " (a route of GET also matches HEAD: put a route for HEAD before it)"
            errors.append(
                r.fail(
                    ("routes", i),
                    f"route {route.name!r} can never match: route {shadow.name!r} "
                    f"({shadow.location}) comes first and matches every request it does{hint}",
                )
            )
        names[route.name] = route
        routes.append(route)
    # A test naming a route that is written but refused above is not a second error:
    # the route's own error says what is wrong.
    written = {
        raw["name"]
        for raw in top["routes"]
        if isinstance(raw, dict) and isinstance(raw.get("name"), str)
    }
    tests = collect(_tests, r, top.get("tests", []), set(names) | written) or ()
    if errors:
        errors.sort(key=lambda e: _position(e.location))
        raise PolicyErrors(errors)
    return Policy(
        tuple(routes),
        hashlib.sha256(data).hexdigest(),
        filename,
        revoked_ids,
        revoked_sha,
        max_life,
        mode,
        jwt_header,
        leeway,
        tuple(tests),
        policy_drift,
        prefixes,
    )


def _position(location: str) -> tuple[int, int]:
    parts = location.rsplit(":", 2)
    try:
        return int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return 0, 0


def _mode(r: Reader, value: Any, path: Path) -> str:
    if value not in (ENFORCE, AUDIT):
        raise r.fail(path, f"mode must be {ENFORCE!r} or {AUDIT!r}, got {value!r}")
    return str(value)


def _revoked(r: Reader, value: Any) -> tuple[frozenset[str], frozenset[str]]:
    if value is None:
        return frozenset(), frozenset()
    m = r.mapping(value, ("revoked",), optional=["ids", "cert_sha256"])
    ids = r.string_list(m.get("ids", []), ("revoked", "ids"), allow_empty=True)
    for j, text in enumerate(ids):
        try:
            SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise r.fail(("revoked", "ids", j), str(exc)) from None
    shas = [
        s.lower().replace(":", "")
        for s in r.string_list(
            m.get("cert_sha256", []), ("revoked", "cert_sha256"), allow_empty=True
        )
    ]
    for j, sha in enumerate(shas):
        if not _SHA256.match(sha):
            raise r.fail(
                ("revoked", "cert_sha256", j),
                f"expected 64 hex digits (a certificate's SHA-256), got {sha!r}",
            )
    return frozenset(ids), frozenset(shas)


def _jwt(r: Reader, value: Any) -> tuple[str, float]:
    if value is None:
        return "authorization", 60.0
    m = r.mapping(value, ("jwt",), optional=["header", "leeway"])
    header = "authorization"
    if "header" in m:
        header = r.string(m["header"], ("jwt", "header"))
        if not _HEADER.match(header):
            raise r.fail(("jwt", "header"), f"not a valid header name: {header!r}")
    leeway = r.duration(m["leeway"], ("jwt", "leeway")) if "leeway" in m else 60.0
    return header.lower(), leeway


def _case_twin(route: Route, earlier: list[Route]) -> Route | None:
    """An earlier route whose path differs from this one's only by case, where either
    goes to an upstream that ignores case."""
    p = route.match.path
    if p is None:
        return None
    for e in earlier:
        q = e.match.path
        if not (route.fold_case or e.fold_case) or q is None or q.kind != p.kind:
            continue
        if q.value != p.value and q.value.lower() == p.value.lower():
            return e
    return None


def _route(
    r: Reader,
    raw: Any,
    path: Path,
    upstreams: Collection[str] | None,
    default_mode: str,
    case_insensitive: Collection[str] = (),
    policy_drift: drift.DriftConfig | None = None,
) -> Route:
    m = r.mapping(raw, path, required=["name", "upstream", "allow"], optional=ROUTE_KEYS)
    name = r.string(m["name"], (*path, "name"))
    if not _NAME.match(name):
        raise r.fail(
            (*path, "name"), f"route name {name!r} may only use letters, digits, '.', '_' and '-'"
        )
    upstream = r.string(m["upstream"], (*path, "upstream"))
    if upstreams is not None and upstream not in upstreams:
        known = ", ".join(sorted(upstreams)) or "none"
        raise r.fail((*path, "upstream"), f"unknown upstream {upstream!r} (configured: {known})")
    allow = read_patterns(r, m["allow"], (*path, "allow"))
    deny = read_patterns(r, m.get("deny", []), (*path, "deny"))
    origin = read_patterns(r, m.get("origin", []), (*path, "origin"))
    audiences: tuple[str, ...] = ()
    if "audiences" in m:
        audiences = tuple(r.string_list(m["audiences"], (*path, "audiences")))
    jwt_subject = m.get("jwt_subject", "peer")
    if jwt_subject not in ("peer", "any"):
        raise r.fail(
            (*path, "jwt_subject"), f"jwt_subject must be 'peer' or 'any', got {jwt_subject!r}"
        )
    keep_token = r.boolean(m["keep_token"], (*path, "keep_token")) if "keep_token" in m else False
    if ("jwt_subject" in m or "keep_token" in m) and not audiences:
        raise r.fail(path, "jwt_subject and keep_token only apply to a route with audiences")
    mode = _mode(r, m["mode"], (*path, "mode")) if "mode" in m else default_mode
    life = (
        r.duration(m["max_cert_lifetime"], (*path, "max_cert_lifetime"))
        if "max_cert_lifetime" in m
        else None
    )
    return Route(
        name,
        _match(r, m.get("match"), (*path, "match")),
        upstream,
        allow,
        deny,
        audiences,
        str(jwt_subject),
        keep_token,
        mode,
        life,
        r.source.at(path),
        origin,
        upstream in case_insensitive,
        drift.read_config(r, m["drift"], (*path, "drift"), policy_drift)
        if "drift" in m
        else policy_drift,
    )


def _match(r: Reader, value: Any, mp: Path) -> RouteMatch:
    if value is None:
        return RouteMatch()
    match = r.mapping(
        value, mp, optional=["hosts", "path", "path_prefix", "methods", "trailing_slash"]
    )
    hosts = []
    for j, text in enumerate(
        r.string_list(match.get("hosts", []), (*mp, "hosts"), allow_empty=True)
    ):
        try:
            hosts.append(HostPattern.parse(text))
        except ValueError as exc:
            raise r.fail((*mp, "hosts", j), str(exc)) from None
    if "path" in match and "path_prefix" in match:
        raise r.fail(mp, "use either 'path' (exact or glob) or 'path_prefix', not both")
    strict = False
    if "trailing_slash" in match:
        slash = match["trailing_slash"]
        if slash not in ("strict", "optional") or "path" not in match:
            raise r.fail(
                (*mp, "trailing_slash"),
                "trailing_slash is 'optional' (the default: path /a also matches /a/) or "
                "'strict', and goes with 'path'",
            )
        strict = slash == "strict"
    path_match = None
    for kind, key in (("exact", "path"), ("prefix", "path_prefix")):
        if key in match:
            try:
                path_match = PathMatch.parse(kind, r.string(match[key], (*mp, key)), strict)
            except ValueError as exc:
                raise r.fail((*mp, key), str(exc)) from None
    methods = None
    if "methods" in match:
        listed = r.string_list(match["methods"], (*mp, "methods"))
        for j, method in enumerate(listed):
            if not _METHOD.match(method):
                raise r.fail(
                    (*mp, "methods", j),
                    f"invalid method {method!r}: write it in capitals, like GET",
                )
        methods = frozenset(listed)
        if "GET" in methods:
            # A HEAD runs the GET handler in every framework behind the proxy (Flask,
            # Django, Express, Tomcat's HttpServlet, Go's ServeMux): a route of GET that
            # did not match HEAD would let HEAD fall through to a broader route, and run
            # the GET view (its side effects, headers and body length) for whoever that
            # route allows.
            methods |= {"HEAD"}
    return RouteMatch(tuple(hosts), path_match, methods)


def _tests(r: Reader, value: Any, route_names: set[str]) -> list[PolicyTest]:
    if not isinstance(value, list):
        raise r.fail(("tests",), "expected a list of test cases")
    out = []
    for i, raw in enumerate(value):
        p: Path = ("tests", i)
        m = r.mapping(raw, p, required=["id", "request", "expect"], optional=["audience", "route"])
        ident = r.string(m["id"], (*p, "id"))
        try:
            SpiffeId.parse(ident)
        except SpiffeIdError as exc:
            raise r.fail((*p, "id"), str(exc)) from None
        parts = r.string(m["request"], (*p, "request")).split()
        if len(parts) != 3 or not _METHOD.match(parts[0]) or not parts[2].startswith("/"):
            raise r.fail(
                (*p, "request"),
                "write a request as 'METHOD host /path', like "
                "'GET billing.internal /api/invoices/7'",
            )
        expect = m["expect"]
        if expect not in ("allow", "deny"):
            raise r.fail((*p, "expect"), f"expect must be 'allow' or 'deny', got {expect!r}")
        route = r.string(m["route"], (*p, "route")) if "route" in m else None
        if route is not None and route not in route_names:
            raise r.fail((*p, "route"), f"no route named {route!r}")
        audience = r.string(m["audience"], (*p, "audience")) if "audience" in m else None
        out.append(
            PolicyTest(
                ident, parts[0], parts[1].lower(), parts[2], expect, audience, route, r.source.at(p)
            )
        )
    return out
