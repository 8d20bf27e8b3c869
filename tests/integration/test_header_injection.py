"""Header injection: no value from any source (a certificate's subject or SANs through
every XFCC field and the RFC 9440 headers, a request id, the path, a trusted hop's XFCC
and X-Forwarded-For) can put CR, LF or NUL into what the upstream receives. Checked on
the raw bytes a recording upstream read, not on a parser's view of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from proxy import xfcc
from proxy.devcerts import Issued, issue_svid
from tests.conftest import Pki
from tests.integration.harness import (
    Proxy,
    RecordingUpstream,
    curl,
    raw,
    start_recording,
    statuses,
)

EVIL_ID = "spiffe://example.org/ns/prod/sa/evil"
MESH_ID = "spiffe://example.org/ns/mesh/sa/edge"
EXPECTED_NAMES = {
    b"host",
    b"user-agent",
    b"accept",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-request-id",
    b"x-forwarded-client-cert",
    b"x-client-spiffe-id",
    b"client-cert",
    b"client-cert-chain",
}


@pytest.fixture(scope="module")
def evil_certs(pki: Pki) -> Pki:
    issued = issue_svid(pki.intermediate, [EVIL_ID], dns=["a\r\nx-evil: dns\x00.example.org"])
    # Re-issued with a subject full of line breaks and NULs (a CA may sign anything).
    cert = x509.CertificateBuilder(
        issuer_name=issued.cert.issuer,
        subject_name=x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "evil\r\nX-Evil: subject\x00"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "line\nbreak\r\n\r\nbody"),
            ]
        ),
        public_key=issued.key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=issued.cert.not_valid_before_utc,
        not_valid_after=issued.cert.not_valid_after_utc,
        extensions=list(issued.cert.extensions),
    ).sign(pki.intermediate.key, hashes.SHA256())
    pki.write("evil", Issued(cert, issued.key, issued.parents))
    pki.svid("mesh", [MESH_ID])
    return pki


async def _start(nursery: trio.Nursery, tmp: Path, pki: Pki) -> tuple[Proxy, RecordingUpstream]:
    return await start_recording(
        nursery,
        tmp,
        pki,
        policy=(
            "routes:\n  - name: all\n    match: {path_prefix: /}\n    upstream: app\n"
            '    allow: ["spiffe://example.org/*"]\n'
        ),
        app_options="client_cert_headers: true, ",
        identity_headers=(
            "xfcc: append_forward\n"
            "xfcc_fields: [By, Hash, Cert, Chain, Subject, URI, DNS]\n"
            f'trusted_forwarders: ["{MESH_ID}"]'
        ),
    )


def assert_clean(upstream: RecordingUpstream) -> None:
    """Every head the upstream read: CRLF line ends only, no NUL, no injected header."""
    assert upstream.requests, "nothing reached the upstream"
    data = bytes(upstream.raw)
    assert b"\x00" not in data
    assert data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n")
    for head in data.split(b"\r\n\r\n")[:-1]:
        lines = head.split(b"\r\n")
        names = {line.split(b":", 1)[0].lower() for line in lines[1:]}
        assert names <= EXPECTED_NAMES, names - EXPECTED_NAMES
    for req in upstream.requests:
        for name, value in req.headers:
            assert not any(c < 0x20 and c != 0x09 for c in value), (name, value)


async def test_certificate_subject_and_sans_cannot_inject(
    nursery: trio.Nursery, tmp_path: Path, evil_certs: Pki
) -> None:
    proxy, upstream = await _start(nursery, tmp_path, evil_certs)
    r = await curl(proxy, "/x", cert="evil")
    assert r.status == 200, r.stderr
    assert_clean(upstream)
    (req,) = upstream.requests
    (value,) = [v for n, v in req.headers if n == b"x-forwarded-client-cert"]
    (element,) = xfcc.parse(value.decode("latin-1"))
    fields = dict(element)
    # Escaped, readable and inert (RFC 4514 itself writes the NUL as \\00).
    assert fields["Subject"] == "O=line%0Abreak%0D%0A%0D%0Abody,CN=evil%0D%0AX-Evil: subject\\00"
    assert fields["DNS"] == "a%0D%0Ax-evil: dns%00.example.org"


async def test_request_id_and_path_cannot_inject(
    nursery: trio.Nursery, tmp_path: Path, evil_certs: Pki
) -> None:
    proxy, upstream = await _start(nursery, tmp_path, evil_certs)
    r = await curl(
        proxy,
        "/a%0D%0AX-Evil:%20path/b?q=%0d%0aX-Evil:%201",
        "--path-as-is",
        "-H",
        "X-Request-Id: abc%0D%0AX-Evil: rid",
    )
    assert r.status == 200
    assert_clean(upstream)
    (req,) = upstream.requests
    assert req.target == b"/a%0D%0AX-Evil:%20path/b?q=%0d%0aX-Evil:%201"  # still escaped
    rid = dict(req.headers)[b"x-request-id"]
    assert rid.isalnum() and b"evil" not in rid.lower()  # replaced with a fresh one
    # Escapes that would decode to a NUL are refused outright.
    assert (await curl(proxy, "/a%00b", "--path-as-is")).status == 400


async def test_trusted_hop_headers_cannot_inject(
    nursery: trio.Nursery, tmp_path: Path, evil_certs: Pki
) -> None:
    proxy, upstream = await _start(nursery, tmp_path, evil_certs)
    forged = (
        'By=spiffe://example.org/ns/mesh/sa/edge;URI=spiffe://partner.org/ns/x;Subject="a%0D%0Ab"'
    )
    r = await curl(
        proxy,
        "/x",
        "-H",
        f"X-Forwarded-Client-Cert: {forged}",
        "-H",
        "X-Forwarded-For: 10.0.0.1",
        cert="mesh",
    )
    assert r.status == 200
    assert_clean(upstream)
    (req,) = upstream.requests
    h = dict(req.headers)
    assert h[b"x-forwarded-client-cert"].startswith(forged.encode())
    assert h[b"x-forwarded-for"] == b"10.0.0.1, 127.0.0.1"
    # Raw control bytes from the hop never get that far: the head is refused.
    for bad in (b"\x01", b"\x00", b"\r"):
        out = await raw(
            proxy,
            b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Client-Cert: URI=spiffe://e.org/"
            + bad
            + b"x\r\n\r\n",
            cert="mesh",
        )
        assert statuses(out) == [400]
    assert len(upstream.requests) == 1
