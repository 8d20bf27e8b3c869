"""Identity patterns, host patterns and path matchers: one grammar everywhere.

Identity patterns:
- ``spiffe://example.org/ns/prod/sa/web``: exactly this ID;
- ``spiffe://example.org/*``: any workload ID in the trust domain;
- ``spiffe://example.org/ns/prod/*``: any ID below this path (one or more segments);
- ``spiffe://example.org/ns/*/sa/web``: ``*`` as a whole inner segment matches exactly one.
No other wildcards and no regex, so ``spiffe-pep check`` can validate every pattern.

Paths: ``path`` is exact, or a segment glob when a segment is ``*`` (``/api/*/items``:
``*`` matches exactly one segment); ``path_prefix`` matches on segment boundaries
(``/api`` matches ``/api`` and ``/api/x`` but not ``/apix``; a prefix ending in ``/``
matches anything below it). Hosts: exact, or ``*.example.com`` for any subdomain (one or
more labels); compared case-insensitively, without the port.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.canonical import Refused, canonical_route_path, parse_host
from proxy.errors import SpiffeIdError
from proxy.schema import Reader
from proxy.spiffe_id import SCHEME, SpiffeId, TrustDomain, check_path
from proxy.yamlsrc import Path

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
        if not td_text:
            raise SpiffeIdError(text, "trust domain is missing")
        td = TrustDomain.parse(td_text)
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
    def whole_trust_domain(self) -> bool:
        return self.tail and not self.segments

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        have = spiffe_id.segments
        n = len(self.segments)
        if (len(have) <= n) if self.tail else (len(have) != n):
            return False
        return all(p in (WILDCARD, h) for p, h in zip(self.segments, have, strict=False))

    def overlaps(self, other: IdentityPattern) -> bool:
        """Is there an ID that both patterns match?"""
        if self.trust_domain != other.trust_domain:
            return False
        a, b = self.segments, other.segments
        for x, y in zip(a, b, strict=False):
            if WILDCARD not in (x, y) and x != y:
                return False
        if len(a) == len(b):
            return True
        shorter = self if len(a) < len(b) else other
        return shorter.tail  # the shorter one must be able to extend

    def covers(self, other: IdentityPattern) -> bool:
        """Does every ID that ``other`` matches also match ``self``?"""
        if self.trust_domain != other.trust_domain:
            return False
        a, b = self.segments, other.segments
        if self.tail:
            if len(b) < len(a) or (len(b) == len(a) and not other.tail):
                return False
        elif other.tail or len(a) != len(b):
            return False
        return all(x in (WILDCARD, y) for x, y in zip(a, b, strict=False))

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
        # Requests' hosts are matched as ``canonical.parse_host`` gives them (lower-case,
        # no trailing dot) or refused: a pattern in another form never matches.
        try:
            matched = parse_host(body.encode("ascii"))[0]
        except UnicodeEncodeError:
            try:
                hint = f"; write it as clients send it: {host.encode('idna').decode()!r}"
            except UnicodeError:
                hint = ""
            raise ValueError(
                f"host pattern {text!r} can never match: a request's host holds only "
                f"a-z 0-9 - _ .{hint}"
            ) from None
        except Refused as exc:
            raise ValueError(
                f"host pattern {text!r} can never match: a request with such a host is "
                f"refused ({exc.refusal.detail})"
            ) from None
        if matched != body:
            written = host[: len(host) - len(body)] + matched  # "*." kept
            raise ValueError(
                f"host pattern {text!r} can never match as written: a request's host is "
                f"compared as {matched!r} (lower-case, no trailing dot); write {written!r}"
            )
        return cls(host)

    @property
    def wildcard(self) -> bool:
        return self.text.startswith("*.")

    def matches(self, host: str) -> bool:
        if self.wildcard:
            return host.endswith(self.text[1:]) and len(host) > len(self.text) - 1
        return host == self.text

    def covers(self, other: HostPattern) -> bool:
        if not self.wildcard:
            return other.text == self.text
        return self.matches(other.text[2:] if other.wildcard else other.text) or (
            other.text == self.text
        )


@dataclass(frozen=True, slots=True)
class PathMatch:
    """``kind`` is ``exact``, ``glob`` (``*`` = one segment) or ``prefix`` (segment-boundary).

    An exact or glob path also matches the same path with one trailing slash (``/secret``
    matches ``/secret/``: Django, Flask and Tomcat serve both, often by redirect), unless
    ``strict_slash`` (the route's ``trailing_slash: strict``)."""

    kind: str
    value: str
    strict_slash: bool = False

    @classmethod
    def parse(cls, kind: str, value: str, strict_slash: bool = False) -> PathMatch:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError(f"a path must start with '/' and hold no query: {value!r}")
        segments = value.split("/")[1:]
        if any(WILDCARD in s and s != WILDCARD for s in segments):
            raise ValueError(f"'*' must stand for a whole path segment: {value!r}")
        if WILDCARD in segments:
            if kind == "prefix":
                raise ValueError(f"path_prefix takes no '*'; use path: {value!r}")
            kind = "glob"
        # Requests are matched in their canonical form: a route written otherwise could
        # never match, and a deny route would silently deny nothing.
        if "%2a" in value.lower():
            raise ValueError(
                f"path {value!r}: a literal '*' cannot be matched (requests' '%2A' is '*', "
                "and '*' in a route stands for a whole segment); match the segment before "
                "it with path_prefix"
            )
        if ";" in value:
            raise ValueError(
                f"path {value!r} can never match: requests are matched with each segment's "
                "';parameters' removed (or refused); write the path without them"
            )
        try:
            canonical = canonical_route_path(value)
        except Refused as exc:
            raise ValueError(
                f"path {value!r} can never match: such requests are refused before the "
                f"policy ({exc.refusal.detail or exc.refusal.reason})"
            ) from None
        if canonical != value:
            raise ValueError(
                f"path {value!r} can never match as written: requests reach the policy "
                f"as {canonical!r}; write that"
            )
        return cls(kind, value, strict_slash)

    def folded(self) -> PathMatch:
        """The same match on a case-folded path (an upstream that ignores case)."""
        return PathMatch(self.kind, self.value.lower(), self.strict_slash)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.value.split("/")[1:])

    @property
    def literal_prefix(self) -> str:
        """The literal segments before the first ``*`` (the whole value if none)."""
        segs = self.segments
        if WILDCARD not in segs:
            return self.value
        return "/" + "/".join(segs[: segs.index(WILDCARD)])

    def matches(self, path: str) -> bool:
        slash = self.kind != "prefix" and not self.strict_slash and len(path) > 1
        if slash and path.endswith("/") and not self.value.endswith("/"):
            path = path[:-1]  # one trailing slash: the same resource
        if self.kind == "exact":
            return path == self.value
        if self.kind == "glob":
            have = path.split("/")[1:]
            segs = self.segments
            return len(have) == len(segs) and all(
                s in (WILDCARD, h) and (s != WILDCARD or h != "")
                for s, h in zip(segs, have, strict=True)
            )
        v = self.value
        if not path.startswith(v):
            return False
        return v.endswith("/") or len(path) == len(v) or path[len(v)] == "/"

    def covers(self, other: PathMatch) -> bool:
        """Does every path ``other`` matches also match ``self``? (No false positives.)"""
        if self.kind == "prefix":
            if other.kind == "glob":
                lit = other.literal_prefix
                return lit != "/" and self.matches(lit) and not self.value.endswith("/")
            return self.matches(other.value)
        if self.strict_slash and not other.strict_slash:
            return False  # other also matches its path with a trailing slash
        if other.kind == "exact":
            return self.matches(other.value)
        return self == other

    def __str__(self) -> str:
        return f"{'path_prefix' if self.kind == 'prefix' else 'path'} {self.value}"


def read_patterns(r: Reader, value: Any, path: Path) -> tuple[IdentityPattern, ...]:
    """A YAML list of identity patterns; errors name the item (``...allow[2]``)."""
    out = []
    for i, text in enumerate(r.string_list(value, path, allow_empty=True)):
        try:
            out.append(IdentityPattern.parse(text))
        except SpiffeIdError as exc:
            raise r.fail((*path, i), f"invalid identity pattern {text!r}: {exc.reason}") from None
    return tuple(out)
