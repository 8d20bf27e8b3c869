"""Policy YAML -> :class:`Policy`. Errors name file:line:column and the data path.

Opens no files and logs nothing: the caller passes the file's bytes and name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from typing import Any

from proxy.errors import PolicyError, SpiffeIdError
from proxy.policy.model import Policy, Route
from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch
from proxy.schema import Reader
from proxy.yamlsrc import load

_METHOD = re.compile(r"^[A-Z][A-Z0-9-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_policy(
    data: bytes, filename: str = "<policy>", upstreams: Collection[str] | None = None
) -> Policy:
    """Parse and validate a policy. ``upstreams``, when given, are the names routes may use."""
    doc, source = load(data, filename, PolicyError)
    r = Reader(source)
    if doc is None:
        raise r.fail((), "the policy is empty: it needs a 'routes' list")
    top = r.mapping(doc, (), required=["routes"])
    if not isinstance(top["routes"], list):
        raise r.fail(("routes",), "expected a list of routes")
    routes: list[Route] = []
    names: dict[str, str] = {}
    for i, raw in enumerate(top["routes"]):
        route = _route(r, raw, ("routes", i), upstreams)
        if route.name in names:
            raise r.fail(
                ("routes", i, "name"),
                f"duplicate route name {route.name!r} (first at {names[route.name]})",
            )
        names[route.name] = route.location
        routes.append(route)
    return Policy(tuple(routes), hashlib.sha256(data).hexdigest(), filename)


def _route(
    r: Reader, raw: Any, path: tuple[str | int, ...], upstreams: Collection[str] | None
) -> Route:
    m = r.mapping(raw, path, required=["name", "upstream", "allow"], optional=["match"])
    name = r.string(m["name"], (*path, "name"))
    if not _NAME.match(name):
        raise r.fail(
            (*path, "name"), f"route name {name!r} may only use letters, digits, '.', '_' and '-'"
        )
    upstream = r.string(m["upstream"], (*path, "upstream"))
    if upstreams is not None and upstream not in upstreams:
        known = ", ".join(sorted(upstreams)) or "none"
        raise r.fail((*path, "upstream"), f"unknown upstream {upstream!r} (configured: {known})")
    allow_raw = r.string_list(m["allow"], (*path, "allow"), allow_empty=True)
    allow = []
    for j, text in enumerate(allow_raw):
        try:
            allow.append(IdentityPattern.parse(text))
        except SpiffeIdError as exc:
            raise r.fail(
                (*path, "allow", j), f"invalid identity pattern {text!r}: {exc.reason}"
            ) from None
    hosts: list[HostPattern] = []
    path_match: PathMatch | None = None
    methods: frozenset[str] | None = None
    if "match" in m:
        mp = (*path, "match")
        match = r.mapping(m["match"], mp, optional=["hosts", "path", "path_prefix", "methods"])
        for j, text in enumerate(
            r.string_list(match.get("hosts", []), (*mp, "hosts"), allow_empty=True)
        ):
            try:
                hosts.append(HostPattern.parse(text))
            except ValueError as exc:
                raise r.fail((*mp, "hosts", j), str(exc)) from None
        if "path" in match and "path_prefix" in match:
            raise r.fail(mp, "use either 'path' (exact) or 'path_prefix', not both")
        for kind, key in (("exact", "path"), ("prefix", "path_prefix")):
            if key in match:
                value = r.string(match[key], (*mp, key))
                if not value.startswith("/") or "?" in value or "#" in value:
                    raise r.fail(
                        (*mp, key), f"a path must start with '/' and hold no query: {value!r}"
                    )
                path_match = PathMatch(kind, value)
        if "methods" in match:
            listed = r.string_list(match["methods"], (*mp, "methods"))
            for j, method in enumerate(listed):
                if not _METHOD.match(method):
                    raise r.fail(
                        (*mp, "methods", j),
                        f"invalid method {method!r}: write it in capitals, like GET",
                    )
            methods = frozenset(listed)
    return Route(name, tuple(hosts), path_match, methods, upstream, tuple(allow), r.source.at(path))
