"""Header rewriting between client, proxy and upstream. Pure, on h11's header lists
(names are lower-case bytes).

Towards the upstream: hop-by-hop headers (RFC 9110 section 7.6.1: Connection,
Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade, Trailer) and every header
the ``Connection`` header names are removed (except Host and Content-Length, which a
client must not be able to strip that way); client-supplied identity headers
(``X-Forwarded-Client-Cert`` and the plain SPIFFE ID header) are always removed, as are
``X-Forwarded-For``/``-Proto`` (the proxy sets them from what it saw) and ``Expect``
(the proxy answers ``100-continue`` itself). Then the proxy's own headers are added.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence, Set
from http import HTTPStatus

Headers = Sequence[tuple[bytes, bytes]]
HeaderList = list[tuple[bytes, bytes]]


def reason_phrase(status: int, given: bytes = b"") -> bytes:
    """The status line's reason phrase: ``given`` (an upstream's own) if any, else the
    standard one (``403 Forbidden``), so no status line ends in a bare code."""
    if given:
        return given
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)
NEVER_STRIPPED_BY_CONNECTION = frozenset({b"host", b"content-length"})
XFCC = b"x-forwarded-client-cert"
REQUEST_ID = b"x-request-id"
_REQUEST_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_REQUEST_ID = 128
# Set by the proxy itself: any copy from the client is dropped.
_PROXY_SET = frozenset({XFCC, b"x-forwarded-for", b"x-forwarded-proto", REQUEST_ID, b"expect"})


def connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def without(
    headers: Headers, drop: frozenset[bytes], tokens: Set[bytes] | None = None
) -> HeaderList:
    """``headers`` without the names in ``drop`` and those their ``Connection`` header
    names (``tokens``, when the caller has them already), but never Host or
    Content-Length. ``drop`` is used as it is when the tokens add nothing to it (the
    common case: a set built once, not per message)."""
    named = connection_tokens(headers) if tokens is None else tokens
    if named and not named <= drop:
        drop = drop | (named - NEVER_STRIPPED_BY_CONNECTION)
    return [(n, v) for n, v in headers if n not in drop]


def strip_hop_by_hop(
    headers: Headers, also: frozenset[bytes] = frozenset(), tokens: Set[bytes] | None = None
) -> HeaderList:
    """``headers`` without hop-by-hop ones, those ``Connection`` names (``tokens``, when
    the caller has them already) and ``also``."""
    return without(headers, HOP_BY_HOP | also if also else HOP_BY_HOP, tokens)


def request_id(headers: Headers) -> str:
    """The client's ``X-Request-Id`` when it is sane, else a fresh one."""
    for name, value in headers:
        if name == REQUEST_ID:
            if 0 < len(value) <= MAX_REQUEST_ID and _REQUEST_ID_CHARS.issuperset(value):
                return value.decode("ascii")
            break
    return new_request_id()


# A fresh request id: 64 random bits drawn once per process, then a counter; unique
# across workers and restarts, 32 hex digits like a UUID, without a uuid4() per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    # 8 bytes: the counter starts below 2**32, so it would take 2**64 - 2**32 requests to
    # overflow them (half a million years at a million a second).
    return _ID_PREFIX + next(_ID_COUNTER).to_bytes(8, "big").hex()


def is_chunked(headers: Headers) -> bool:
    return any(n == b"transfer-encoding" for n, _ in headers)


# Never forwarded from the client: hop-by-hop headers and those the proxy sets itself.
NOT_FORWARDED = HOP_BY_HOP | _PROXY_SET


_DOWNSTREAM_DROP = HOP_BY_HOP | {REQUEST_ID}


def downstream_response_headers(headers: Headers, request_id: str) -> HeaderList:
    """Upstream response headers for the client: hop-by-hop removed (and what the
    upstream's ``Connection`` names), request id echoed."""
    # Framing is h11's job on the way out: chunked for HTTP/1.1 clients when there is no
    # Content-Length, close-delimited for HTTP/1.0 ones.
    out = without(headers, _DOWNSTREAM_DROP)
    out.append((REQUEST_ID, request_id.encode("ascii")))
    return out


_ENCODED: dict[str, bytes] = {}


def bearer_token(hdrs: Headers, name: str) -> str | None:
    """The token from ``Authorization: Bearer <t>``, or the value of a custom header
    (where a ``Bearer`` prefix is optional)."""
    raw = _ENCODED.get(name)
    if raw is None:
        raw = _ENCODED[name] = name.encode("ascii")  # a policy's header name: few
    for n, v in hdrs:
        if n == raw:
            value = v.decode("ascii", "replace").strip()
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip() or None
            return None if raw == b"authorization" else value or None
    return None
