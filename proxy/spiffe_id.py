"""SPIFFE IDs and trust domains: strict parsing with go-spiffe's rules.

The parser is hand-written, not a URL library (a URL parser accepts ports, userinfo,
percent-encoding and case folding, all of which the SPIFFE ID spec forbids). Rules, in
the order they are checked (SPIFFE-ID spec section 2, go-spiffe ``spiffeid``):

1. not empty; 2. begins with the exact lowercase scheme ``spiffe://``;
3. a non-empty trust domain; 4. trust domain bytes in ``[a-z0-9._-]``;
5. an empty path, or one that starts with ``/``; 6. path segment bytes in
``[A-Za-z0-9._-]``; 7. no empty segment; 8. no ``.`` or ``..`` segment;
9. no trailing slash. IDs are compared as plain strings. Lengths beyond the spec's
interoperability minimums (2048 bytes for an ID, 255 for a trust domain) are refused
as policy, since nothing legitimate produces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import SpiffeIdError

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

ERR_EMPTY = "cannot be empty"
ERR_SCHEME = "scheme is missing or invalid"
ERR_TD_MISSING = "trust domain is missing"
ERR_TD_CHARS = (
    "trust domain characters are limited to lowercase letters, numbers, dots, dashes, "
    "and underscores"
)
ERR_PATH_CHARS = (
    "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
)
ERR_EMPTY_SEGMENT = "path cannot contain empty segments"
ERR_DOT_SEGMENT = "path cannot contain dot segments"
ERR_TRAILING_SLASH = "path cannot have a trailing slash"
ERR_TOO_LONG = f"longer than {MAX_ID_LENGTH} bytes"
ERR_TD_TOO_LONG = f"trust domain longer than {MAX_TRUST_DOMAIN_LENGTH} bytes"
ERR_ROOT_PATH = "path is empty (a workload ID needs a path)"

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_trust_domain(value: str, td: str) -> None:
    if not td:
        raise _error(value, ERR_TD_MISSING)
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise _error(value, ERR_TD_TOO_LONG)
    if not _TD_CHARS.issuperset(td):
        raise _error(value, ERR_TD_CHARS)


def check_path(value: str, path: str) -> None:
    """Validate the path part of a SPIFFE ID (``""`` or ``/seg/...``)."""
    if not path:
        return
    if not path.startswith("/"):
        # Only reachable from callers that pass a bare path; an ID's path always
        # starts at the first "/" after the trust domain.
        raise _error(value, ERR_PATH_CHARS)
    if path.endswith("/"):
        raise _error(value, ERR_TRAILING_SLASH)
    for segment in path[1:].split("/"):
        if not segment:
            raise _error(value, ERR_EMPTY_SEGMENT)
        if segment in (".", ".."):
            raise _error(value, ERR_DOT_SEGMENT)
        if not _SEGMENT_CHARS.issuperset(segment):
            raise _error(value, ERR_PATH_CHARS)


def _error(value: str, reason: str) -> SpiffeIdError:
    return SpiffeIdError(value, reason)


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name, such as ``example.org``."""

    name: str

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Parse a bare trust domain name or a ``spiffe://`` ID (its trust domain)."""
        if value.startswith(SCHEME):
            return SpiffeId.parse(value).trust_domain
        if not value:
            raise _error(value, ERR_TD_MISSING)
        _check_trust_domain(value, value)
        return cls(value)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed, valid SPIFFE ID. ``str(id)`` is its canonical form."""

    trust_domain: TrustDomain
    path: str

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``value`` strictly; raise :class:`SpiffeIdError` naming the broken rule."""
        if not value:
            raise _error(value, ERR_EMPTY)
        if not value.startswith(SCHEME):
            raise _error(value, ERR_SCHEME)
        if len(value) > MAX_ID_LENGTH:
            raise _error(value, ERR_TOO_LONG)
        rest = value[len(SCHEME) :]
        slash = rest.find("/")
        if slash == -1:
            td, path = rest, ""
        else:
            td, path = rest[:slash], rest[slash:]
        _check_trust_domain(value, td)
        check_path(value, path)
        return cls(TrustDomain(td), path)

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments: ``spiffe://td/a/b`` gives ``("a", "b")``."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def member_of(self, td: TrustDomain) -> bool:
        return self.trust_domain == td

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain.name}{self.path}"
