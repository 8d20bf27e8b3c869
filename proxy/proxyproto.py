"""PROXY protocol v1 (text) and v2 (binary) headers, as HAProxy's spec defines them, so
the real client address reaches the decision log and X-Forwarded-For when an L4 balancer
sits in front. Pure: feed bytes, get the addresses and how many bytes the header took.

Only the header is consumed; everything after it (normally the TLS ClientHello) belongs
to the connection. A ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header means "use the socket's
own addresses" (the balancer's health checks). TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.errors import ProxyError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's bound for a v1 line, CRLF included


class ProxyProtocolError(ProxyError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid PROXY protocol header: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``source`` is None for LOCAL/UNKNOWN: keep the socket's peer address."""

    length: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``, or None if more bytes are needed."""
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if b"PROXY "[: len(data)] == data[:6] and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        return _v1(data)
    raise ProxyProtocolError("the connection does not start with a PROXY protocol header")


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end == -1:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("v1 line longer than 107 bytes")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return ProxyHeader(end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("v1 needs 'PROXY TCP4|TCP6 src dst sport dport'")
    try:
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError as exc:
        raise ProxyProtocolError(f"v1 address: {exc}") from None
    if (src.version, dst.version) != ((4, 4) if parts[1] == "TCP4" else (6, 6)):
        raise ProxyProtocolError("v1 address family mismatch")
    if not (0 <= sport <= 65535 and 0 <= dport <= 65535) or parts[4] != str(sport):
        raise ProxyProtocolError("v1 port out of range")
    return ProxyHeader(end + 2, (str(src), sport), (str(dst), dport))


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    ver_cmd, fam = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    total = 16 + length
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("v2 version must be 2")
    if len(data) < total:
        return None
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL
        return ProxyHeader(total)
    if command != 0x1:
        raise ProxyProtocolError("v2 command must be LOCAL or PROXY")
    body = data[16:total]
    if fam == 0x11 and length >= 12:  # TCP over IPv4
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        ports = body[8:12]
    elif fam == 0x21 and length >= 36:  # TCP over IPv6
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        ports = body[32:36]
    elif fam == 0x00:  # UNSPEC
        return ProxyHeader(total)
    else:
        raise ProxyProtocolError(f"v2 family 0x{fam:02x} is not TCP over IPv4/IPv6")
    return ProxyHeader(
        total, (src, int.from_bytes(ports[0:2], "big")), (dst, int.from_bytes(ports[2:4], "big"))
    )


def v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """Build a v2 PROXY header (for tests and tools)."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
