"""Fuzz targets: one function per parser, taking raw bytes. A target returns normally
for input the parser accepts or refuses with its own error type; anything else (another
exception, a broken round trip) propagates, and the fuzzer reports a crash.

Run them with atheris (``python -m tests.fuzz TARGET``, see README.md); the suite runs
each on its seeds (tests/unit/test_fuzz_targets.py) so the harness cannot rot.
"""

from __future__ import annotations

from collections.abc import Callable

import h11

from proxy import proxyproto, xfcc
from proxy.canonical import Refusal, Rules, build
from proxy.errors import ConfigError, SpiffeIdError
from proxy.http1 import new_server_connection
from proxy.policy.loader import load_policy
from proxy.policy.patterns import IdentityPattern
from proxy.spiffe_id import SpiffeId


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def spiffe_id(data: bytes) -> None:
    text = _text(data)
    try:
        parsed = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    if str(parsed) != text:
        raise AssertionError(f"{text!r} parsed into a different ID {parsed}")


def identity_pattern(data: bytes) -> None:
    pattern_text, _, id_text = _text(data).partition("\n")
    try:
        pattern = IdentityPattern.parse(pattern_text)
        candidate = SpiffeId.parse(id_text)
    except SpiffeIdError:
        return
    if pattern.matches(candidate) and candidate.trust_domain != pattern.trust_domain:
        raise AssertionError("a pattern matched an ID of another trust domain")
    if pattern.covers(pattern) is not True:
        raise AssertionError("a pattern must cover itself")


def xfcc_header(data: bytes) -> None:
    text = data.decode("latin-1")  # as the proxy reads an inbound header
    try:
        parsed = xfcc.parse(text)
    except xfcc.XfccError:
        return
    again = xfcc.format_header(parsed)
    # Non-ASCII values come back %-escaped (formatting neutralizes them); ASCII is stable.
    if text.isascii() and xfcc.parse(again) != parsed:
        raise AssertionError(f"XFCC round trip changed {text!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in again):
        raise AssertionError("a control character in a formatted XFCC value")


def policy(data: bytes) -> None:
    try:
        load_policy(data, "fuzz.yaml", upstreams={"app"})
    except ConfigError as exc:
        if not exc.location.startswith("fuzz.yaml"):
            raise AssertionError(f"an error without the file name: {exc}") from exc


def request_target(data: bytes) -> None:
    try:
        request = build(b"GET", data, [(b"host", b"a.example")], Rules())
    except UnicodeDecodeError:
        return  # h11 only hands over ASCII targets
    if isinstance(request, Refusal):
        return
    if not request.target.startswith(b"/"):
        raise AssertionError(f"forwarding a target that is not origin-form: {request.target!r}")


def proxy_protocol(data: bytes) -> None:
    try:
        header = proxyproto.parse(data)
    except proxyproto.ProxyProtocolError:
        return
    if header is not None and not 0 < header.length <= len(data):
        raise AssertionError(f"header length {header.length} outside the input")


def http_request_head(data: bytes) -> None:
    """The proxy's HTTP/1.1 server parser (h11 with the strict head rules): a request
    it accepts has no control character in any header value and no obs-fold or bare LF
    in its head."""
    conn = new_server_connection(64 * 1024)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    if isinstance(event, h11.Request):
        for name, value in event.headers:
            if any((b < 0x20 and b != 0x09) or b == 0x7F for b in name + value):
                raise AssertionError(f"control character in header {name!r}: {value!r}")
        head = data[: data.find(b"\r\n\r\n")]
        if b"\n " in head or b"\n\t" in head or head.count(b"\n") != head.count(b"\r\n"):
            raise AssertionError("a head with obs-fold or a bare LF was accepted")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "spiffe_id": spiffe_id,
    "identity_pattern": identity_pattern,
    "xfcc": xfcc_header,
    "policy": policy,
    "request_target": request_target,
    "proxy_protocol": proxy_protocol,
    "http_request_head": http_request_head,
}

# A few valid and nearly valid inputs per target: the fuzzer's starting corpus.
SEEDS: dict[str, list[bytes]] = {
    "spiffe_id": [
        b"spiffe://example.org/ns/prod/sa/web",
        b"spiffe://Example.org/x",
        b"spiffe://a/%41",
    ],
    "identity_pattern": [
        b"spiffe://example.org/ns/*/sa/web\nspiffe://example.org/ns/prod/sa/web",
        b"spiffe://example.org/*\nspiffe://other.org/x",
    ],
    "xfcc": [
        b'By=spiffe://a/b;Hash=abc;Subject="CN=x,O=y";URI=spiffe://a/c',
        b"By=x;URI=y,By=z;DNS=q",
        b'Subject="\\"quoted\\""',
    ],
    "policy": [
        b"routes:\n  - name: a\n    match: {path_prefix: /}\n    upstream: app\n"
        b"    allow: ['spiffe://example.org/*']\n",
        b"routes: [{name: a, upstream: app, allow: [], match: {path: /x/*/y}}]\nmode: audit\n",
    ],
    "request_target": [b"/a/b?c=d", b"http://h/x", b"/%61dmin", b"/a/../b", b"*"],
    "proxy_protocol": [
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 443\r\n",
        proxyproto.V2_SIGNATURE
        + b"\x21\x11\x00\x0c\x0a\x00\x00\x01\x0a\x00\x00\x02\x04\xd2\x01\xbb",
    ],
    "http_request_head": [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
    ],
}
