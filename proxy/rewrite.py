"""The rewrite stage: from a canonical request and the verified caller to the request
head the upstream gets. Pure (no sockets, no trio, no clock: the caller passes ``now``).

The client's headers come from ``CanonicalRequest.headers`` (already stripped of every
spelling of every header the proxy owns); hop-by-hop headers go here, then the proxy
adds what it asserts: X-Forwarded-For/-Proto, X-Request-Id, XFCC, the SPIFFE ID header,
RFC 9440 Client-Cert(-Chain) and a signed identity assertion, per upstream.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import headers, svid, xfcc
from proxy.assertion import AssertionSigner
from proxy.canonical import CanonicalRequest, Refusal
from proxy.config import Config, Upstream
from proxy.errors import SpiffeIdError
from proxy.policy.model import Route
from proxy.spiffe_id import SpiffeId
from proxy.xfcc import XfccError


def _sf(cert: x509.Certificate) -> bytes:
    """A certificate as an RFC 8941 byte sequence (RFC 9440)."""
    return b":" + base64.b64encode(cert.public_bytes(Encoding.DER)) + b":"


# What ``PeerHeaders.dropped`` answers, shared by all connections (a frozenset of the
# headers never forwarded costs about 900 bytes: not one per idle connection).
_DROPPED: dict[tuple[bytes, frozenset[bytes]], frozenset[bytes]] = {}


class PeerHeaders:
    """What a connection's verified peer contributes to every request it sends: its XFCC
    element and RFC 9440 headers are built once per connection, on first use."""

    def __init__(self, config: Config, own_id: SpiffeId | None, peer: svid.PeerSvid) -> None:
        self.config = config
        self.own_id = own_id
        self.peer = peer
        ident = config.identity
        # Whether this peer's XFCC counts is decided once, from its verified SPIFFE ID.
        self.trusted_forwarder = any(p.matches(peer.spiffe_id) for p in ident.trusted_forwarders)
        self.id_header = ident.spiffe_id_header.lower().encode("ascii")
        self.spiffe_id = str(peer.spiffe_id)
        self._own_text: str | None = None
        self._client_cert: tuple[tuple[bytes, bytes], ...] | None = None
        # Per connection, computed once: the XFCC sent when the request brought none
        # that counts.
        self._plain_xfcc: tuple[bytes | None] | None = None

    def xfcc_value(self, inbound: str | None) -> bytes | None:
        """The XFCC header value sent upstream (None: none), given the request's own."""
        if inbound is not None and self.trusted_forwarder:
            mode = self.config.identity.xfcc
            value = xfcc.outbound(mode, inbound, True, self.own_text())
            return None if value is None else value.encode("latin-1")
        if self._plain_xfcc is None:
            value = xfcc.outbound(self.config.identity.xfcc, None, False, self.own_text())
            self._plain_xfcc = (None if value is None else value.encode("latin-1"),)
        return self._plain_xfcc[0]

    def dropped(self, strip: frozenset[bytes]) -> frozenset[bytes]:
        """The client's headers never forwarded: hop-by-hop ones, those the proxy sets
        itself, this config's SPIFFE ID header, and ``strip``."""
        key = (self.id_header, strip)
        drop = _DROPPED.get(key)
        if drop is None:
            if len(_DROPPED) >= 64:
                _DROPPED.clear()
            drop = _DROPPED[key] = headers.NOT_FORWARDED | {self.id_header} | strip
        return drop

    def own_element(self) -> xfcc.Element:
        """This hop's XFCC element for this peer."""
        leaf = self.peer.leaf
        chain = self.peer.chain or (leaf,)
        fields = self.config.identity.xfcc_fields
        # Only what the configured fields need: PEM-encoding a chain is not free.
        return xfcc.element_for(
            fields,
            by=str(self.own_id) if self.own_id else None,
            leaf_sha256=self.peer.fingerprint,
            cert_pem=leaf.public_bytes(Encoding.PEM).decode("ascii") if "Cert" in fields else "",
            chain_pem="".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in chain)
            if "Chain" in fields
            else "",
            subject=leaf.subject.rfc4514_string() if "Subject" in fields else "",
            uris=[str(self.peer.spiffe_id)] if "URI" in fields else [],
            dns=svid.dns_sans(leaf) if "DNS" in fields else [],
        )

    def own_text(self) -> str:
        if self._own_text is None:
            self._own_text = xfcc.format_element(self.own_element())
        return self._own_text

    def client_cert_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """RFC 9440: ``Client-Cert`` (the leaf) and ``Client-Cert-Chain`` (the rest of the
        chain), each certificate a structured-field byte sequence."""
        if self._client_cert is None:
            out = [(b"client-cert", _sf(self.peer.leaf))]
            rest = self.peer.chain[1:]
            if rest:
                out.append((b"client-cert-chain", b", ".join(_sf(c) for c in rest)))
            self._client_cert = tuple(out)
        return self._client_cert

    def inbound_origin(self, request: CanonicalRequest) -> Origin:
        """A trusted forwarder's XFCC, the origin it names (its first element's URI) and
        that element's ``Hash`` (the origin's leaf). From any other peer, XFCC never
        counts. An XFCC that cannot be read raises ``OriginRefused``."""
        if request.xfcc is None or not self.trusted_forwarder:
            return NO_ORIGIN
        try:
            elements = xfcc.parse(request.xfcc)
        except XfccError as exc:
            raise OriginRefused(Refusal(400, "malformed_xfcc", str(exc))) from exc
        first = elements[0]
        digest = next((v for k, v in first if k == "Hash"), None)
        sha256 = digest.lower().replace(":", "") if digest else None
        uri = xfcc.first_uri(first)
        if uri is None:
            return Origin(request.xfcc, None, sha256)
        try:
            return Origin(request.xfcc, SpiffeId.parse(uri), sha256)
        except SpiffeIdError as exc:
            raise OriginRefused(Refusal(400, "xfcc_origin_not_a_spiffe_id", str(exc))) from exc


_SHARED: svid.PerPeer[PeerHeaders] = svid.PerPeer()


def for_peer(config: Config, own_id: SpiffeId | None, peer: svid.PeerSvid) -> PeerHeaders:
    """The ``PeerHeaders`` of ``peer`` under ``config``, shared by its connections: the
    XFCC element and RFC 9440 headers are then built once per client certificate, not
    per connection."""
    found = _SHARED.get(peer)
    if found is None or found.config is not config or found.own_id != own_id:
        found = _SHARED.put(peer, PeerHeaders(config, own_id, peer))
    return found


@dataclass(frozen=True, slots=True)
class Origin:
    """What a trusted forwarder says of the request's origin."""

    xfcc: str | None = None
    spiffe_id: SpiffeId | None = None
    sha256: str | None = None


NO_ORIGIN = Origin()  # the usual case, one instance: a frozen dataclass is not free to build


class OriginRefused(Exception):
    """A trusted forwarder sent an XFCC that cannot be read."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(slots=True)
class Forwarding:
    """Per-request facts the rewrite needs beside the canonical request (built and
    consumed once per request: not frozen, whose ``__init__`` costs a call per field)."""

    request_id: str
    peer_ip: str
    origin: SpiffeId | None
    inbound_xfcc: str | None
    policy_sha256: str
    now: float


def upstream_head(
    request: CanonicalRequest,
    peer: PeerHeaders,
    route: Route,
    upstream: Upstream,
    fwd: Forwarding,
    signer: AssertionSigner | None,
    strip: frozenset[bytes] = frozenset(),
) -> headers.HeaderList:
    """The header list sent upstream for an allowed request: the client's headers
    without the hop-by-hop ones (and those its ``Connection`` names), those the proxy
    sets and ``strip`` (a consumed JWT-SVID); then the proxy's own."""
    caller = str(fwd.origin) if fwd.origin else peer.spiffe_id
    out = headers.without(request.headers, peer.dropped(strip), request.connection)
    if request.chunked:
        out.append((b"transfer-encoding", b"chunked"))
    forwarded_for = fwd.peer_ip
    if peer.trusted_forwarder and request.forwarded_for:
        # A trusted hop's X-Forwarded-For is extended, not reset.
        forwarded_for = f"{request.forwarded_for.decode('latin-1')}, {fwd.peer_ip}"
    out += [
        (b"x-forwarded-for", forwarded_for.encode("ascii")),
        (b"x-forwarded-proto", b"https"),
        (headers.REQUEST_ID, fwd.request_id.encode("ascii")),
    ]
    outbound = peer.xfcc_value(fwd.inbound_xfcc)
    if outbound is not None:
        out.append((headers.XFCC, outbound))
    out.append((peer.id_header, caller.encode("ascii")))
    if upstream.client_cert_headers:
        out += peer.client_cert_headers()
    if upstream.assertion_header and signer is not None:
        token = signer.sign(
            subject=caller,
            audience=upstream.name,
            request_id=fwd.request_id,
            route=route.name,
            policy_sha256=fwd.policy_sha256,
            now=fwd.now,
            ttl=upstream.assertion_ttl,
            method=request.method,
            path=request.target.decode("ascii"),
        )
        out.append((upstream.assertion_header.lower().encode("ascii"), token.encode()))
    if request.port is None and not request.host and not any(n == b"host" for n, _ in out):
        # HTTP/1.0 without Host: the upstream speaks HTTP/1.1 and needs one.
        out.insert(0, (b"host", f"{upstream.host}:{upstream.port}".encode("ascii")))
    return out
