"""PROXY protocol v1/v2 headers (HAProxy's spec): one row per case."""

from __future__ import annotations

import pytest

from proxy.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyProtocolError, parse, v2_header

TLS = b"\x16\x03\x01\x02\x00"  # what follows: a ClientHello

ROWS = [
    (
        "v1_tcp4",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8443\r\n" + TLS,
        ProxyHeader(44, ("203.0.113.7", 51234), ("10.0.0.1", 8443)),
    ),
    (
        "v1_tcp6",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
        ProxyHeader(40, ("2001:db8::1", 1), ("2001:db8::2", 2)),
    ),
    ("v1_unknown", b"PROXY UNKNOWN\r\n" + TLS, ProxyHeader(15)),
    (
        "v2_tcp4",
        v2_header(("198.51.100.9", 40000), ("10.0.0.1", 8443)) + TLS,
        ProxyHeader(28, ("198.51.100.9", 40000), ("10.0.0.1", 8443)),
    ),
    (
        "v2_tcp6",
        v2_header(("2001:db8::9", 7), ("2001:db8::1", 8443)),
        ProxyHeader(52, ("2001:db8::9", 7), ("2001:db8::1", 8443)),
    ),
    ("v2_local", V2_SIGNATURE + b"\x20\x00\x00\x00" + TLS, ProxyHeader(16)),
    (
        "v2_with_tlv",
        V2_SIGNATURE
        + b"\x21\x11\x00\x10"
        + bytes([192, 0, 2, 1, 10, 0, 0, 1, 0, 80, 1, 187])
        + b"\x04\x00\x01x",
        ProxyHeader(32, ("192.0.2.1", 80), ("10.0.0.1", 443)),
    ),
]


@pytest.mark.parametrize(("data", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_parse(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"PRO",
        b"PROXY TCP4 1.2.3.4",
        V2_SIGNATURE[:5],
        V2_SIGNATURE + b"\x21\x11\x00\x0c" + b"\x01\x02",
    ],
    ids=["v1_prefix", "v1_no_crlf_yet", "v2_prefix", "v2_partial_body"],
)
def test_incomplete_needs_more(data: bytes) -> None:
    assert parse(data) is None


BAD = [
    ("plain_tls", TLS + b"x" * 20),
    ("plain_http", b"GET / HTTP/1.1\r\n"),
    ("v1_too_long", b"PROXY TCP4 " + b"1" * 120),
    ("v1_bad_family", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1_bad_ip", b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n"),
    ("v1_family_mismatch", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
    ("v1_port_range", b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n"),
    ("v1_port_leading_zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
    ("v2_bad_version", V2_SIGNATURE + b"\x11\x11\x00\x00"),
    ("v2_bad_command", V2_SIGNATURE + b"\x22\x11\x00\x00"),
    ("v2_udp", V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12)),
]


@pytest.mark.parametrize("data", [r[1] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_headers(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)
