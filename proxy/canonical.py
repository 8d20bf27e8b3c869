"""The canonical request: the one value the policy judges and the proxy forwards.

A PEP is worth the agreement between what it decides and what the app behind it
executes. Servers read the same bytes differently (Tomcat resolves ``/..;/`` to a parent
segment, nginx strips a trailing dot from ``Host``, CGI/WSGI map ``X_Client_Spiffe_Id``
and ``X-Client-Spiffe-Id`` to one variable, Django dispatches ``post`` as POST), so
``build`` turns a parsed request head into one frozen ``CanonicalRequest`` or refuses it
with a ``Refusal`` (status and reason code). The policy matches that value and the
request sent upstream is serialised from it, never from the raw head; ``explain``,
``test`` and ``check`` build it with the same function.

Rules, each with its reason code:

- method: an upper-case token, else 400 ``method_not_uppercase``; CONNECT gets 405;
- target (RFC 9112 section 3.2): origin-form, absolute-form (its authority must equal
  ``Host``, ``host_does_not_match_target``), ``*`` for OPTIONS only; else
  ``bad_request_target``;
- path: escapes of unreserved characters and of ``! $ & ' ( ) * + , = : @`` are decoded
  (every server behind decodes them before routing: ``/%40admin`` is ``/@admin`` and
  ``/c%2B%2B`` is ``/c++`` to Flask, Django, nginx and Tomcat), other escapes
  upper-cased (``;``, ``?``, ``#`` and ``%`` keep their escapes: decoding them would
  change the path's structure); the characters RFC 3986 does not allow raw in a path
  (``" < > [ ] ^ ` { | }``) are percent-encoded; so every spelling of one decoded path
  is one canonical path, and a route written in it matches them all
  (``policy.patterns`` refuses a route path that is not canonical). A broken escape, an
  encoded ``/``, ``\\`` or NUL, a raw backslash, a dot segment, or bytes that do not
  decode as UTF-8 are refused (``bad_request_target``); repeated slashes are merged.
  ``;`` (path parameters) is refused unless an upstream keeps them (``path_params:
  keep``); routes then match the path with each segment's parameters removed, and a
  segment that is empty, ``.`` or ``..`` before its ``;`` is refused
  (``dot_segment_with_parameters``). Whether the matched route's upstream keeps them is
  checked by ``fit_upstream`` (``path_parameters_refused``);
- host: lower-cased, one trailing dot removed, the port kept apart (routes match without
  it); empty labels, a second ``:`` outside brackets, a bad port or a character outside
  ``a-z 0-9 - _ .`` is refused (``malformed_host``); so is a second ``Host``
  (``duplicate_host``);
- header names holding ``_`` are dropped (nginx's default), passed, or refused
  (``underscore_in_header_name``) by ``Rules.underscores``; every header the proxy owns
  (identity header, XFCC, Client-Cert(-Chain), assertion headers, X-Forwarded-For/-Proto,
  X-Request-Id, Expect) is removed in every spelling: names are compared lower-cased
  with ``_`` and ``.`` read as ``-``; so are method-override, request-rewriting and
  forwarding headers the proxy does not set itself (``Rules.remove``, configurable);
- a query parameter that names another method (``?_method=DELETE``, ``proxy.override``):
  400 ``method_override_refused``;
- ``Connection: upgrade``: only to a protocol in ``Rules.upgrades`` (``websocket`` by
  default; ``h2c`` and unknown tokens get ``upgrade_not_allowed``);
- framing: Content-Length with Transfer-Encoding is refused
  (``content_length_with_transfer_encoding``); a head larger than the limit gets 431, a
  declared body larger than the limit 413.

Pure: no I/O, no clock, no trio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple
from urllib.parse import quote

from proxy.override import override_param

Headers = Sequence[tuple[bytes, bytes]]

# BYTES_IN: on the request path a byte string is searched with ``find``, not ``in``.
# CPython 3.11's ``bytes.__contains__`` first tries the needle as an integer (``65 in
# b"A"`` is true), which for a bytes needle raises a TypeError, formats its message and
# clears it: several thousand instructions per test, six times per request.

# Headers that make an app execute another method or path than the one on the request
# line (Symfony, Laravel, Rails, Spring, IIS URL Rewrite honour some of them), and
# forwarding headers only a proxy may set. The proxy sets X-Forwarded-For/-Proto itself.
METHOD_OVERRIDE_HEADERS = (
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Method",
)
FORWARDING_HEADERS = (
    "Forwarded",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Real-IP",
    "True-Client-IP",
)
DEFAULT_REMOVE = METHOD_OVERRIDE_HEADERS + FORWARDING_HEADERS
# Set by the proxy on every forwarded request: a client's copy never passes.
PROXY_SET = (
    "X-Forwarded-Client-Cert",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Request-Id",
    "Client-Cert",
    "Client-Cert-Chain",
    "Expect",
)
UNDERSCORES = ("drop", "pass", "refuse")

_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"})
XFCC = b"x-forwarded-client-cert"
XFF = b"x-forwarded-for"

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Escapes decoded in a canonical path: unreserved, and the sub-delimiters and ':' '@' that
# nginx, Tomcat, Flask and node read alike escaped or not (';' is a servlet's parameter
# delimiter: it keeps its escape).
_DECODED = _UNRESERVED | frozenset(b"!$&'()*+,=:@")
# Printable bytes h11 lets through raw that RFC 3986 does not allow raw in a path: written
# percent-encoded in a canonical path (servers decode both spellings alike).
_ENCODED = frozenset(b'"<>[]^`{|}')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_FORBIDDEN_ESCAPES = {b"2F", b"5C", b"00"}
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")
_IPV6_CHARS = frozenset(b"0123456789abcdef:.")


def spelling(name: str | bytes) -> bytes:
    """A header name as compared: lower-case, ``_`` and ``.`` read as ``-`` (CGI and
    WSGI map ``-`` to ``_``, and PHP also ``.``: ``X.Client.Spiffe.Id`` arrives as
    ``HTTP_X_CLIENT_SPIFFE_ID`` behind Caddy and php-fpm)."""
    raw = name.encode("ascii") if isinstance(name, str) else name
    return raw.lower().replace(b"_", b"-").replace(b".", b"-")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused before the policy judged it: answered with ``status``."""

    status: int
    reason: str
    detail: str = ""


class Refused(Exception):
    """Raised inside this module; ``build`` turns it into a ``Refusal``."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.refusal = Refusal(status, reason, detail)


@dataclass(frozen=True, slots=True)
class Rules:
    """How requests are canonicalised (the ``http:`` configuration and the upstreams)."""

    owned: frozenset[bytes] = frozenset()  # extra proxy-owned names (identity, assertion)
    remove: frozenset[bytes] = frozenset(spelling(h) for h in DEFAULT_REMOVE)
    underscores: str = "drop"
    path_params: bool = False  # some upstream keeps ;parameters
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int | None = None
    upgrades: frozenset[bytes] = frozenset({b"websocket"})  # protocols an Upgrade may name
    # Query parameters that make a framework execute another method (method spoofing)
    override_params: frozenset[str] = frozenset({"_method"})
    always: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {spelling(h) for h in PROXY_SET} | self.owned | self.remove
        object.__setattr__(self, "always", frozenset(names))


class CanonicalRequest(NamedTuple):
    """What the policy judges and what goes upstream (before the proxy's own headers).
    Immutable: a NamedTuple, not a frozen dataclass, whose ``__init__`` sets each of the
    15 fields through ``object.__setattr__`` on every request."""

    method: str
    host: str  # lower-case, no trailing dot, no port: what routes match
    port: int | None
    path: str  # normalised, path parameters removed: what routes match
    query: str  # without the "?"
    target: bytes  # the origin-form target forwarded (parameters kept where allowed)
    headers: tuple[tuple[bytes, bytes], ...]  # kept client headers, canonical Host first
    http_version: bytes = b"1.1"
    path_params: bool = False  # the path carried ;parameters
    dropped: tuple[bytes, ...] = ()  # names removed by the underscore rule
    xfcc: str | None = None  # inbound XFCC (counts only from a trusted forwarder)
    forwarded_for: bytes = b""  # inbound X-Forwarded-For (likewise)
    has_body: bool = False
    connection: frozenset[bytes] = frozenset()  # Connection tokens, lower-case
    chunked: bool = False

    @property
    def authority(self) -> str:
        if self.port is None:
            return self.host
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamRules:
    """Per-upstream reading of paths."""

    path_params: bool = False  # forward ;parameters (else a path holding them is refused)
    case_insensitive: bool = False  # routes to it match case-folded paths


def fit_upstream(request: CanonicalRequest, rules: UpstreamRules) -> Refusal | None:
    """Whether the upstream the decision picked may be sent this request."""
    if request.path_params and not rules.path_params:
        return Refusal(400, "path_parameters_refused", "';' in the path")
    return None


def build(
    method: bytes,
    target: bytes,
    headers: Headers,
    rules: Rules,
    http_version: bytes = b"1.1",
) -> CanonicalRequest | Refusal:
    """The canonical form of a request head, or why it is refused."""
    try:
        return _build(method, target, headers, rules, http_version)
    except Refused as exc:
        return exc.refusal


def _build(
    method: bytes, target: bytes, headers: Headers, rules: Rules, http_version: bytes
) -> CanonicalRequest:
    if method == b"CONNECT":
        raise Refused(405, "connect_not_supported")
    if http_version not in (b"1.1", b"1.0"):
        raise Refused(505, "http_version_not_supported")
    if method.upper() != method:
        raise Refused(400, "method_not_uppercase", method.decode("ascii", "replace"))
    # in C (no generator frame per header): each header counts its name, value and 4
    size = len(target) + 4 * len(headers) + sum(map(len, chain.from_iterable(headers)))
    if size > rules.max_header_bytes:
        # h11 bounds only the bytes it buffers while a head is incomplete; a head that
        # arrives whole in one read is measured here.
        raise Refused(431, "request_head_too_large")
    kept: list[tuple[bytes, bytes]] = []
    dropped: list[bytes] = []
    hosts: list[bytes] = []
    xfcc: list[bytes] = []
    xff: list[bytes] = []
    length: bytes | None = None
    chunked = False
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    always = rules.always
    for name, value in headers:
        if name in _FRAMING:  # one set lookup for the ordinary header
            if name == b"host":
                hosts.append(value)
                continue
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection":
                connection += [t.strip().lower() for t in value.split(b",")]
            else:
                upgrade += [t.strip().lower() for t in value.split(b",")]
        if name.find(b"_") >= 0:  # not `in`: see BYTES_IN above
            if rules.underscores == "refuse":
                raise Refused(400, "underscore_in_header_name", name.decode("ascii", "replace"))
            if rules.underscores == "drop":
                dropped.append(name)
                continue
            if spelling(name) in always:
                continue
        elif name in always:
            if name == XFCC:
                xfcc.append(value)
            elif name == XFF:
                xff.append(value)
            continue
        elif name.find(b".") >= 0 and spelling(name) in always:
            continue  # a spelling PHP reads as a header the proxy owns
        kept.append((name, value))
    if chunked and length is not None:
        # RFC 9112 section 6.1 lets a server refuse this; a proxy must, or it smuggles.
        raise Refused(400, "content_length_with_transfer_encoding")
    limit = rules.max_body_bytes
    if length is not None and limit is not None and int(length) > limit:
        raise Refused(413, "request_body_too_large")
    if len(hosts) > 1:
        raise Refused(400, "duplicate_host")
    if b"upgrade" in connection and not (upgrade and rules.upgrades.issuperset(upgrade)):
        # h2c would take the connection past the HTTP/1.1 parser that judges requests.
        raise Refused(400, "upgrade_not_allowed", b",".join(upgrade).decode("latin-1"))
    host, port = parse_host(hosts[0]) if hosts else ("", None)
    path, forward, query, authority, params = parse_target(method, target, rules.path_params)
    # Absolute-form: the target's authority wins (RFC 9112 section 3.2.2), but the
    # upstream gets origin-form and routes on Host, so the two must agree.
    if authority is not None and (host, port) != parse_host(authority):
        raise Refused(400, "host_does_not_match_target")
    if query and rules.override_params:
        spoofed = override_param(query, rules.override_params)
        if spoofed is not None:
            raise Refused(400, "method_override_refused", spoofed)
    if hosts:
        text = host if port is None else f"{host}:{port}"
        kept.insert(0, (b"host", text.encode("ascii")))
    return CanonicalRequest(
        method=method.decode("ascii"),
        host=host,
        port=port,
        path=path,
        query=query,
        target=(forward + ("?" + query if query else "")).encode("ascii"),
        headers=tuple(kept),
        http_version=http_version,
        path_params=params,
        dropped=tuple(dropped),
        xfcc=b",".join(xfcc).decode("latin-1") if xfcc else None,
        forwarded_for=b", ".join(xff),
        has_body=chunked or (length is not None and length.strip() not in (b"0", b"")),
        connection=frozenset(t for t in connection if t),
        chunked=chunked,
    )


# Results of parse_host and parse_target by their whole input: clients repeat their Host
# and most of their targets, and both functions are pure. Bounded (emptied when full);
# a refusal raises and is never remembered.
_MEMO_SIZE = 1024
# Longer inputs are parsed every time: the memo's memory stays small (1,024 entries of
# at most these sizes) whatever a client sends.
_MEMO_TARGET = 256
_MEMO_HOST = 256
_hosts: dict[bytes, tuple[str, int | None]] = {}
_targets: dict[tuple[bytes, bytes, bool], tuple[str, str, str, bytes | None, bool]] = {}


def parse_host(raw: bytes) -> tuple[str, int | None]:
    """``Host`` (or an absolute-form authority) -> (host for matching, port or None)."""
    if len(raw) > _MEMO_HOST:
        return _parse_host(raw)
    hit = _hosts.get(raw)
    if hit is None:
        hit = _parse_host(raw)
        if len(_hosts) >= _MEMO_SIZE:
            _hosts.clear()
        _hosts[raw] = hit
    return hit


def _parse_host(raw: bytes) -> tuple[str, int | None]:
    value = raw.strip().lower()
    if not value:
        return "", None
    port_text = b""
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 3 or not _IPV6_CHARS.issuperset(value[1:end]) or b":" not in value[1:end]:
            raise Refused(400, "malformed_host", "bad IPv6 literal")
        host, rest = value[: end + 1], value[end + 1 :]
        if rest:
            if not rest.startswith(b":"):
                raise Refused(400, "malformed_host", "junk after the IPv6 literal")
            port_text = rest[1:]
    else:
        host, colon, port_text = value.partition(b":")
        if port_text.find(b":") >= 0:
            raise Refused(400, "malformed_host", "a second ':' outside brackets")
        if host.endswith(b"."):
            host = host[:-1]  # one trailing dot: the same name, as nginx and DNS read it
        if not host or not _HOST_CHARS.issuperset(host):
            raise Refused(400, "malformed_host", "a character outside a-z 0-9 - _ .")
        if b"" in host.split(b"."):
            raise Refused(400, "malformed_host", "an empty label")
        if colon and not port_text:
            port_text = b""  # "host:" has an empty port (RFC 3986): no port
    port = None
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
            raise Refused(400, "malformed_host", "a bad port")
        port = int(port_text)
    return host.decode("ascii"), port


def parse_target(
    method: bytes, target: bytes, keep_params: bool = False
) -> tuple[str, str, str, bytes | None, bool]:
    """Split and normalise a request-target (RFC 9112 section 3.2): (path for matching,
    path to forward, query, authority of an absolute-form target, had parameters)."""
    if len(target) > _MEMO_TARGET:
        return _parse_target(method, target, keep_params)
    key = (method, target, keep_params)
    hit = _targets.get(key)
    if hit is None:
        hit = _parse_target(method, target, keep_params)
        if len(_targets) >= _MEMO_SIZE:
            _targets.clear()
        _targets[key] = hit
    return hit


def _parse_target(
    method: bytes, target: bytes, keep_params: bool
) -> tuple[str, str, str, bytes | None, bool]:
    if target.find(b"#") >= 0:
        raise _bad("fragment in the request target")
    authority: bytes | None = None
    if target == b"*":
        if method != b"OPTIONS":
            raise _bad("asterisk-form is only for OPTIONS")
        return "*", "*", "", None, False
    if target[:8].lower().startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        end = min(x for x in (rest.find(b"/"), rest.find(b"?"), len(rest)) if x >= 0)
        authority = rest[:end]
        if not authority or authority.find(b"@") >= 0:
            raise _bad("absolute-form target without a valid authority")
        target = rest[end:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    elif not target.startswith(b"/"):
        raise _bad("the request target must be an absolute path")
    raw_path, _, query = target.partition(b"?")
    forward = normalize_path(raw_path)
    path, params = forward, False
    if ";" in forward:
        if not keep_params:
            raise Refused(400, "path_parameters_refused", "';' in the path")
        path, params = strip_params(forward), True
    return path, forward, query.decode("ascii"), authority, params


def _bad(detail: str) -> Refused:
    return Refused(400, "bad_request_target", detail)


# What makes normalize_path work: an escape, a backslash, a byte to encode, an empty or
# dot segment.
_NEEDS_NORMALISING = re.compile(rb'[%\\"<>\[\]^`{|}]|//|/\.')


def normalize_path(raw: bytes) -> str:
    """Decode the escapes of ``_DECODED``, upper-case the others, encode ``_ENCODED``,
    merge ``//``; refuse what servers disagree on (see the module docstring)."""
    if _NEEDS_NORMALISING.search(raw) is None:
        return raw.decode("ascii")  # the common case: nothing to normalise
    out = bytearray()
    decoded = bytearray()  # every escape decoded: must be UTF-8
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # "%"
            esc = raw[i + 1 : i + 3]
            if len(esc) < 2 or not _HEX.issuperset(esc):
                raise _bad("malformed percent-encoding in the path")
            esc = esc.upper()
            if esc in _FORBIDDEN_ESCAPES:
                raise _bad("encoded slash, backslash or NUL in the path")
            value = int(esc, 16)
            if value in _DECODED:
                out.append(value)
            else:
                out += b"%" + esc
            decoded.append(value)
            i += 3
            continue
        if c == 0x5C:
            raise _bad("backslash in the path")
        decoded.append(c)
        if c in _ENCODED:
            out += b"%%%02X" % c
            i += 1
            continue
        if c == 0x2F and out.endswith(b"/"):
            i += 1  # merge "//"
            continue
        out.append(c)
        i += 1
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the decoded path is not UTF-8 (overlong or broken sequence)") from None
    path = out.decode("ascii")
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise _bad("dot segment in the path")
    return path


def canonical_route_path(value: str) -> str:
    """The canonical form of a path written in a route: characters a request target
    cannot carry raw (a space, non-ASCII as UTF-8, ...) percent-encoded, then
    ``normalize_path``. Raise ``Refused`` when a request with that path never reaches the
    policy (a dot segment, an encoded slash, ...)."""
    return normalize_path(quote(value, safe="/%*;+!$&'()=:@,~-._").encode("ascii"))


def strip_params(path: str) -> str:
    """The path with each segment's ``;parameters`` removed (as servlet containers read
    it); a segment that is empty, ``.`` or ``..`` before its ``;`` is refused."""
    out = []
    for segment in path.split("/"):
        name, semi, _ = segment.partition(";")
        if semi and name in ("", ".", ".."):
            raise Refused(400, "dot_segment_with_parameters", segment)
        out.append(name)
    return "/".join(out)
