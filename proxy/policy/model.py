"""The route policy as frozen values: an ordered list of routes, first match decides."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch


@dataclass(frozen=True, slots=True)
class Route:
    """One named route: what requests it matches, where they go, and who may send them.

    Empty ``hosts`` and ``path`` None mean "any"; ``methods`` None means any method.
    An empty ``allow`` is an explicit "nobody" (a block route).
    """

    name: str
    hosts: tuple[HostPattern, ...]
    path: PathMatch | None
    methods: frozenset[str] | None
    upstream: str
    allow: tuple[IdentityPattern, ...]
    location: str = ""

    def matches_request(self, method: str, host: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        return not self.hosts or any(h.matches(host) for h in self.hosts)


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy and the SHA-256 of the file it came from (its version)."""

    routes: tuple[Route, ...]
    sha256: str
    source: str = "<policy>"

    @property
    def version(self) -> str:
        """A short form of the SHA-256 for humans; logs carry the full hash."""
        return self.sha256[:12]
