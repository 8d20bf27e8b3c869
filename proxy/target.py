"""Request-target normalization: the policy must judge the path the app will serve.

A PEP that matches on the raw target while the app decodes it is bypassable:
``/%61dmin`` misses a route for ``/admin`` and falls through to a broader one, then the
app serves ``/admin``. So the path is normalized once, matched, and forwarded in the
normalized form:

- origin-form (``/p?q``) is the norm; absolute-form (``http://h/p``) is accepted, its
  authority becoming the host; ``*`` is only for OPTIONS; authority-form (CONNECT) is
  refused;
- percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded; other
  escapes are kept with upper-case hex; a broken escape is refused;
- an encoded slash or backslash (``%2F``, ``%5C``), a raw backslash, or a NUL is refused:
  servers disagree on what they mean;
- repeated slashes are merged; ``.`` and ``..`` segments are refused rather than
  resolved, since nothing legitimate sends them.
The query string is passed through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import HttpError

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_FORBIDDEN_ESCAPES = {b"2F", b"5C", b"00"}


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # normalized, as matched and as forwarded
    query: str  # without the "?", "" when absent
    authority: str | None  # from an absolute-form target

    @property
    def forward(self) -> bytes:
        """The origin-form target to send upstream."""
        return (self.path + ("?" + self.query if self.query else "")).encode("ascii")


def bad(detail: str) -> HttpError:
    return HttpError(400, "bad_request_target", detail)


def normalize_path(raw: bytes) -> str:
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # "%"
            esc = raw[i + 1 : i + 3]
            if len(esc) < 2 or not _HEX.issuperset(esc):
                raise bad("malformed percent-encoding in the path")
            esc = esc.upper()
            if esc in _FORBIDDEN_ESCAPES:
                raise bad("encoded slash, backslash or NUL in the path")
            value = int(esc, 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + esc
            i += 3
            continue
        if c == 0x5C:
            raise bad("backslash in the path")
        if c == 0x2F and out.endswith(b"/"):
            i += 1  # merge "//"
            continue
        out.append(c)
        i += 1
    path = out.decode("ascii")
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise bad("dot segment in the path")
    return path


def parse_target(method: bytes, target: bytes) -> Target:
    """Split and normalize a request-target (RFC 9112 section 3.2)."""
    if b"#" in target:
        raise bad("fragment in the request target")
    authority: str | None = None
    if target == b"*":
        if method != b"OPTIONS":
            raise bad("asterisk-form is only for OPTIONS")
        return Target("*", "", None)
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        qmark = rest.find(b"?")
        end = min(x for x in (slash, qmark, len(rest)) if x >= 0)
        authority = rest[:end].decode("ascii").lower()
        if not authority or "@" in authority:
            raise bad("absolute-form target without a valid authority")
        target = rest[end:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    elif not target.startswith(b"/"):
        raise bad("the request target must be an absolute path")
    raw_path, _, query = target.partition(b"?")
    return Target(normalize_path(raw_path), query.decode("ascii"), authority)


def host_for_matching(host: str) -> str:
    """``Host`` header value -> lower-case host without port (IPv6 brackets kept)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
