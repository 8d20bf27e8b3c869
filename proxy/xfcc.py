"""Envoy's ``X-Forwarded-Client-Cert`` (XFCC): format, parse, and what each mode does.

Format (Envoy's HTTP header manipulation docs): elements separated by ``,``, one per
proxy hop; each element is ``Key=value`` pairs separated by ``;``. Keys are
case-insensitive: By, Hash, Cert, Chain, Subject, URI, DNS (URI and DNS may repeat). A
value holding ``,``, ``;``, ``=`` or ``"`` is double-quoted with ``"`` (and ``\\``)
escaped by a backslash; Subject is always quoted. Cert and Chain are URL-encoded PEM.

Modes, with Envoy's names and meanings (every connection here is mTLS), gated by trust:
XFCC arriving from a peer that is not a configured trusted forwarder is ALWAYS dropped.

- ``sanitize``: send no XFCC;
- ``sanitize_set`` (default): send only this hop's element;
- ``forward_only``, ``always_forward_only``: forward a trusted peer's XFCC unchanged, add
  nothing;
- ``append_forward``: a trusted peer's XFCC, then this hop's element.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote as url_quote

from proxy.errors import ProxyError

MODES = ("sanitize", "sanitize_set", "forward_only", "append_forward", "always_forward_only")
FIELDS = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")
_CANONICAL = {f.lower(): f for f in FIELDS}
_SPECIAL = frozenset(',;="\\')

Element = list[tuple[str, str]]


class XfccError(ProxyError, ValueError):
    status_hint = 400

    def __init__(self, header: str, position: int, reason: str) -> None:
        super().__init__(f"malformed X-Forwarded-Client-Cert at byte {position}: {reason}")
        self.position = position
        self.reason = reason


def _neutralize(value: str) -> str:
    """Control characters (a certificate's DN may hold anything) become %XX escapes, so
    no value can ever break out of its header line."""
    if all(" " <= c < "\x7f" for c in value):
        return value
    return "".join(
        c if " " <= c < "\x7f" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in value
    )


def quote(value: str, force: bool = False) -> str:
    value = _neutralize(value)
    # Unquoted values are read back stripped: quote any that starts or ends with a space.
    if not force and not _SPECIAL.intersection(value) and value.strip() == value:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_element(pairs: Iterable[tuple[str, str]]) -> str:
    """One XFCC element: ``By=...;Hash=...;URI=...`` (Subject always quoted)."""
    return ";".join(f"{key}={quote(value, force=key == 'Subject')}" for key, value in pairs)


def format_header(elements: Sequence[Element]) -> str:
    return ",".join(format_element(e) for e in elements)


def element_for(
    fields: Sequence[str],
    *,
    by: str | None,
    leaf_sha256: str,
    cert_pem: str,
    chain_pem: str,
    subject: str,
    uris: Sequence[str],
    dns: Sequence[str],
) -> Element:
    """This hop's element, with the configured ``fields`` in Envoy's key order."""
    wanted = set(fields)
    out: Element = []
    if "By" in wanted and by:
        out.append(("By", by))
    if "Hash" in wanted:
        out.append(("Hash", leaf_sha256))
    if "Cert" in wanted:
        out.append(("Cert", url_quote(cert_pem, safe="")))
    if "Chain" in wanted:
        out.append(("Chain", url_quote(chain_pem, safe="")))
    if "Subject" in wanted:
        out.append(("Subject", subject))
    if "URI" in wanted:
        out += [("URI", u) for u in uris]
    if "DNS" in wanted:
        out += [("DNS", d) for d in dns]
    return out


def parse(header: str) -> list[Element]:
    """Parse an XFCC value strictly; raise :class:`XfccError` on anything malformed."""
    elements: list[Element] = []
    current: Element = []
    i, n = 0, len(header)
    if not header.strip():
        raise XfccError(header, 0, "empty value")
    while True:
        eq = header.find("=", i)
        if eq == -1:
            raise XfccError(header, i, "expected Key=value")
        key = header[i:eq].strip()
        canonical = _CANONICAL.get(key.lower())
        if canonical is None:
            raise XfccError(header, i, f"unknown key {key!r}")
        i = eq + 1
        if i < n and header[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    raise XfccError(header, i, "unterminated quoted value")
                c = header[i]
                if c == "\\":
                    if i + 1 >= n:
                        raise XfccError(header, i, "dangling backslash")
                    chars.append(header[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
            value = "".join(chars)
        else:
            end = i
            while end < n and header[end] not in ";,":
                if header[end] in '="\\':
                    raise XfccError(header, end, f"{header[end]!r} in an unquoted value")
                end += 1
            value = header[i:end].strip()
            i = end
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise XfccError(header, i, "control character in a value")
        current.append((canonical, value))
        if i >= n:
            elements.append(current)
            return elements
        sep = header[i]
        if sep not in ";,":
            raise XfccError(header, i, f"expected ';' or ',' after a value, got {sep!r}")
        if sep == ",":
            elements.append(current)
            current = []
        i += 1
        while i < n and header[i] == " ":
            i += 1
        if i >= n:
            raise XfccError(header, i, "trailing separator")


def first_uri(element: Element) -> str | None:
    return next((v for k, v in element if k == "URI"), None)


def outbound(mode: str, inbound: str | None, trusted: bool, own: Element | str) -> str | None:
    """The XFCC value to send upstream, or None to send none.

    ``inbound`` is what the peer sent (already combined into one value); it only counts
    when the peer is a ``trusted`` forwarder. ``own`` is this hop's element, or its text.
    """
    kept = inbound if trusted and inbound else None
    own_text = own if isinstance(own, str) else format_element(own)
    if mode == "sanitize":
        return None
    if mode == "sanitize_set":
        return own_text
    if mode in ("forward_only", "always_forward_only"):
        return kept
    if mode == "append_forward":
        return f"{kept},{own_text}" if kept else own_text
    raise ValueError(f"unknown XFCC mode {mode!r}")
