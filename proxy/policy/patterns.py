"""Identity patterns, host patterns and path matchers: one grammar everywhere.

Identity patterns:
- ``spiffe://example.org/ns/prod/sa/web``: exactly this ID;
- ``spiffe://example.org/*``: any workload ID in the trust domain;
- ``spiffe://example.org/ns/prod/*``: any ID below this path (one or more segments);
- ``spiffe://example.org/ns/*/sa/web``: ``*`` as a whole inner segment matches exactly one.
No other wildcards and no regex, so ``spiffe-pep check`` can validate every pattern.

Paths: ``path`` is exact; ``path_prefix`` matches on segment boundaries (``/api``
matches ``/api`` and ``/api/x`` but not ``/apix``; a prefix ending in ``/`` matches
anything below it). Hosts: exact, or ``*.example.com`` for any subdomain (one or more
labels); compared case-insensitively, without the port.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import SpiffeIdError
from proxy.spiffe_id import SCHEME, SpiffeId, TrustDomain, check_path

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class IdentityPattern:
    """A parsed identity pattern. ``tail`` means "one or more further segments"."""

    text: str
    trust_domain: TrustDomain
    segments: tuple[str, ...]
    tail: bool

    @classmethod
    def parse(cls, text: str) -> IdentityPattern:
        if not text.startswith(SCHEME):
            raise SpiffeIdError(text, "an identity pattern must start with spiffe://")
        rest = text[len(SCHEME) :]
        td_text, slash, path = rest.partition("/")
        td = TrustDomain.parse(td_text) if td_text else None
        if td is None:
            raise SpiffeIdError(text, "trust domain is missing")
        if not slash:
            raise SpiffeIdError(
                text, "a pattern needs a path: use spiffe://td/* for every workload of a domain"
            )
        segments = path.split("/")
        tail = segments[-1] == WILDCARD
        if tail:
            segments = segments[:-1]
        for seg in segments:
            if WILDCARD in seg and seg != WILDCARD:
                raise SpiffeIdError(text, "'*' must stand for a whole path segment")
        # Validate the literal parts by the SPIFFE ID path rules ("*" stands in as "x").
        concrete = "/" + "/".join("x" if s == WILDCARD else s for s in segments) if segments else ""
        try:
            check_path(text, concrete)
        except SpiffeIdError as exc:
            raise SpiffeIdError(text, exc.reason) from None
        return cls(text, td, tuple(segments), tail)

    @property
    def exact(self) -> bool:
        return not self.tail and WILDCARD not in self.segments

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        if self.exact:
            return spiffe_id.path == "/" + "/".join(self.segments)
        have = spiffe_id.segments
        n = len(self.segments)
        if self.tail:
            if len(have) <= n:
                return False
        elif len(have) != n:
            return False
        return all(p in (WILDCARD, h) for p, h in zip(self.segments, have, strict=False))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class HostPattern:
    """``example.com`` exactly, or ``*.example.com`` for any name below it."""

    text: str

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        host = text.lower()
        body = host[2:] if host.startswith("*.") else host
        if not body or "*" in body or ":" in body or "/" in body or body.startswith("."):
            raise ValueError(
                f"invalid host pattern {text!r}: use a host name, or *.domain for its subdomains"
            )
        return cls(host)

    def matches(self, host: str) -> bool:
        if self.text.startswith("*."):
            return host.endswith(self.text[1:]) and len(host) > len(self.text) - 1
        return host == self.text


@dataclass(frozen=True, slots=True)
class PathMatch:
    """``kind`` is ``exact`` or ``prefix`` (segment-boundary prefix)."""

    kind: str
    value: str

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        v = self.value
        if not path.startswith(v):
            return False
        return v.endswith("/") or len(path) == len(v) or path[len(v)] == "/"

    def __str__(self) -> str:
        return f"{'path' if self.kind == 'exact' else 'path_prefix'} {self.value}"
