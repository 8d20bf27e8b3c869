"""The route policy as frozen values: an ordered list of routes, first match decides."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.drift import DENY, DriftConfig, Prefixes
from proxy.policy.matcher import IdentityMatcher, RouteIndex
from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch

ENFORCE, AUDIT = "enforce", "audit"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What requests a route matches. Empty ``hosts``, ``path`` None and ``methods`` None
    mean "any"."""

    hosts: tuple[HostPattern, ...] = ()
    path: PathMatch | None = None
    methods: frozenset[str] | None = None

    def matches(self, method: str, host: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        return not self.hosts or any(h.matches(host) for h in self.hosts)

    def matches_target(self, host: str, path: str) -> bool:
        """``matches`` for every method: whether host and path match."""
        if self.path is not None and not self.path.matches(path):
            return False
        return not self.hosts or any(h.matches(host) for h in self.hosts)

    def covers(self, other: RouteMatch) -> bool:
        """Does this match catch every request ``other`` does? (No false positives.)"""
        if self.methods is not None and (
            other.methods is None or not other.methods <= self.methods
        ):
            return False
        if self.hosts and (
            not other.hosts or not all(any(a.covers(b) for a in self.hosts) for b in other.hosts)
        ):
            return False
        if self.path is None:
            return True
        return other.path is not None and self.path.covers(other.path)

    def describe(self) -> str:
        parts = []
        if self.hosts:
            parts.append("hosts " + ",".join(h.text for h in self.hosts))
        if self.path:
            parts.append(str(self.path))
        parts.append("methods " + (",".join(sorted(self.methods)) if self.methods else "any"))
        return "; ".join(parts)


@dataclass(frozen=True)
class Route:
    """One named route: what it matches, where it goes, and who may send it.

    ``deny`` wins over ``allow``; an empty ``allow`` is an explicit "nobody". With
    ``audiences`` a JWT-SVID for one of them is required as well, and its subject must be
    the mTLS peer unless ``jwt_subject`` is ``any``; the token is removed before
    forwarding unless ``keep_token``. ``mode`` ``audit`` logs the decision and forwards
    anyway. ``max_cert_lifetime`` (seconds) refuses longer-lived client certificates.
    ``origin``, when set, must match the origin identity: the caller a trusted forwarder
    names as the first element of its XFCC (``allow`` then applies to the forwarder).
    ``drift``: the subject-drift setting for requests of this route (the policy's unless
    the route sets its own; None: not judged).
    """

    name: str
    match: RouteMatch
    upstream: str
    allow: tuple[IdentityPattern, ...]
    deny: tuple[IdentityPattern, ...] = ()
    audiences: tuple[str, ...] = ()
    jwt_subject: str = "peer"
    keep_token: bool = False
    mode: str = ENFORCE
    max_cert_lifetime: float | None = None
    location: str = ""
    origin: tuple[IdentityPattern, ...] = ()
    fold_case: bool = False  # its upstream ignores case: match the case-folded path
    drift: DriftConfig | None = None
    allow_matcher: IdentityMatcher = field(init=False, repr=False, compare=False)
    deny_matcher: IdentityMatcher = field(init=False, repr=False, compare=False)
    origin_matcher: IdentityMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_matcher", IdentityMatcher(self.allow))
        object.__setattr__(self, "deny_matcher", IdentityMatcher(self.deny))
        object.__setattr__(self, "origin_matcher", IdentityMatcher(self.origin))

    def matches_request(self, method: str, host: str, path: str) -> bool:
        return self.match.matches(method, host, path)


@dataclass(frozen=True)
class PolicyTest:
    """A test case written beside the policy (``spiffe-pep test``)."""

    spiffe_id: str
    method: str
    host: str
    path: str
    expect: str  # "allow" or "deny"
    audience: str | None = None
    route: str | None = None
    location: str = ""


@dataclass(frozen=True)
class Policy:
    """A validated policy and the SHA-256 of the file it came from (its version)."""

    routes: tuple[Route, ...]
    sha256: str
    source: str = "<policy>"
    revoked_ids: frozenset[str] = frozenset()
    revoked_sha256: frozenset[str] = frozenset()
    max_cert_lifetime: float | None = None
    mode: str = ENFORCE
    jwt_header: str = "authorization"
    jwt_leeway: float = 60.0
    tests: tuple[PolicyTest, ...] = ()
    drift: DriftConfig | None = None  # the policy-wide ``drift:`` (routes carry their own)
    drift_prefixes: Prefixes = field(default_factory=Prefixes)
    index: RouteIndex = field(init=False, repr=False, compare=False)
    # Every distinct drift setting in force (the policy's and the routes'), and those
    # that refuse: learning skips what one of those refuses.
    drift_configs: tuple[DriftConfig, ...] = field(init=False, repr=False, compare=False)
    drift_deny: tuple[DriftConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        configs = {id(c): c for c in (self.drift, *(r.drift for r in self.routes)) if c}
        object.__setattr__(self, "drift_configs", tuple(configs.values()))
        deny = tuple(c for c in self.drift_configs if c.mode == DENY)
        object.__setattr__(self, "drift_deny", deny)
        paths = [
            (r.match.path.kind, r.match.path.value) if r.match.path and not r.fold_case else None
            for r in self.routes
        ]
        object.__setattr__(self, "index", RouteIndex(paths))

    def route_for(self, method: str, host: str, path: str) -> Route | None:
        """The first route matching the request, found through the index."""
        for i in self.index.candidates(path):
            route = self.routes[i]
            if route.match.matches(method, host, path.lower() if route.fold_case else path):
                return route
        return None
