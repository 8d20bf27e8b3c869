"""The requests of the differential tests, as data: each is sent verbatim (a raw TLS
socket) through the proxy to every real server. Ids use "-" only, so a pytest id reads
``<server>-<case>`` (``tomcat-dotdot-semicolon``).

The proxy's policy (``POLICY``) guards four resources; the client is an ordinary workload
that may reach only what the catch-all route covers. A case is a bypass when a server
serves a guarded resource although the proxy matched a route that does not cover it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.conftest import CLIENT_ID

ADMIN_ID = "spiffe://example.org/ns/ops/sa/admin"
FORGED_ID = "spiffe://example.org/forged"

POLICY = f"""\
routes:
  - name: admin-host
    match: {{hosts: [admin.internal]}}
    upstream: app
    allow: ["{ADMIN_ID}"]
  - name: admin
    match: {{path_prefix: /admin}}
    upstream: app
    allow: ["{ADMIN_ID}"]
  - name: secret
    match: {{path: /secret}}
    upstream: app
    allow: ["{ADMIN_ID}"]
  - name: plus-at
    match: {{path: /a+b@c}}
    upstream: app
    allow: ["{ADMIN_ID}"]
  - name: invoices-write
    match: {{path: /api/invoices, methods: [POST]}}
    upstream: app
    allow: ["{ADMIN_ID}"]
  - name: prod-apps
    match: {{path_prefix: /}}
    upstream: app
    allow: ["{CLIENT_ID}"]
"""

# What each resource a server names may be served under: the routes of the policy that
# cover it. "public" (the servers' catch-all) and "none" (the server served nothing: an
# error, a redirect) are covered by any route.
COVERED_BY: dict[str, frozenset[str] | None] = {
    "admin": frozenset({"admin"}),
    "secret": frozenset({"secret"}),
    "plus-at": frozenset({"plus-at"}),
    "invoices-post": frozenset({"invoices-write"}),
    "admin-vhost": frozenset({"admin-host"}),
    "public": None,
    "none": None,
}


@dataclass(frozen=True)
class Case:
    id: str
    target: bytes = b"/public"
    method: bytes = b"GET"
    host: bytes = b"localhost"
    headers: tuple[bytes, ...] = ()  # whole header lines, without CRLF
    body: bytes = b""
    chunked_body: bool = False  # the body is already framed by a Transfer-Encoding header
    prefix: bytes = b""  # bytes before the request line

    def request(self, request_id: str) -> bytes:
        """The request's bytes, closing the connection after the response."""
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Host: " + self.host]
        lines += self.headers
        lines += [b"X-Request-Id: " + request_id.encode(), b"Connection: close"]
        if self.body and not self.chunked_body:
            lines.append(b"Content-Length: %d" % len(self.body))
        return self.prefix + b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def _h(*lines: str) -> tuple[bytes, ...]:
    return tuple(line.encode() for line in lines)


FORGED_XFCC = f"By={FORGED_ID};Hash=00;URI={FORGED_ID}"
FORGED_CERT = ":MIIBszCCAVmgAwIBAgIUZm9yZ2VkZm9yZ2VkZm9yZ2Vk:"

CORPUS: list[Case] = [
    # Controls: what the policy allows and denies in plain requests.
    Case("plain-public", b"/public"),
    Case("plain-admin", b"/admin/users"),
    Case("plain-secret", b"/secret"),
    Case("plain-post-invoices", b"/api/invoices", b"POST", body=b"{}"),
    Case("plain-get-invoices", b"/api/invoices"),
    Case("plain-admin-host", b"/", host=b"admin.internal"),
    Case("admin-host-upper-port", b"/", host=b"ADMIN.INTERNAL:8443"),
    # Path parameters and "..;": Tomcat strips ";params" then resolves "..".
    Case("dotdot-semicolon", b"/public/..;/admin/users"),
    Case("encoded-dotdot-semicolon", b"/x/%2e%2e;/admin/users"),
    Case("dotdot-semicolon-secret", b"/public/..;/secret"),
    Case("jsessionid-in-admin", b"/admin;jsessionid=x/users"),
    Case("admin-params", b"/admin;x=1"),
    Case("empty-segment-params", b"/;x/admin/users"),
    Case("secret-semicolon", b"/secret;x"),
    Case("invoices-semicolon-post", b"/api/invoices;x", b"POST", body=b"{}"),
    # Exact paths and trailing slashes.
    Case("secret-trailing-slash", b"/secret/"),
    Case("admin-no-slash", b"/admin"),
    # Methods.
    Case("lowercase-post", b"/api/invoices", b"post", body=b"{}"),
    Case("method-override", b"/api/invoices", headers=_h("X-HTTP-Method-Override: POST")),
    # Hosts.
    Case("host-trailing-dot", b"/", host=b"admin.internal."),
    Case("host-upper-trailing-dot-port", b"/", host=b"ADMIN.internal.:8443"),
    Case("x-forwarded-host", b"/", headers=_h("X-Forwarded-Host: admin.internal")),
    Case("forwarded-host", b"/", headers=_h("Forwarded: host=admin.internal")),
    # Identity and forwarding headers the client must not set.
    Case("spoofed-spiffe-id", headers=_h(f"X-Client-Spiffe-Id: {FORGED_ID}")),
    Case("spoofed-xfcc", headers=_h(f"X-Forwarded-Client-Cert: {FORGED_XFCC}")),
    Case("underscore-spiffe-id", headers=_h(f"X_Client_Spiffe_Id: {FORGED_ID}")),
    Case("underscore-xfcc", headers=_h(f"X_Forwarded_Client_Cert: {FORGED_XFCC}")),
    Case("underscore-client-cert", headers=_h(f"Client_Cert: {FORGED_CERT}")),
    Case("underscore-xff", headers=_h("X_Forwarded_For: 1.2.3.4")),
    Case("x-real-ip", headers=_h("X-Real-IP: 1.2.3.4")),
    Case("x-original-url", b"/public", headers=_h("X-Original-URL: /admin/users")),
    Case("x-rewrite-url", b"/public", headers=_h("X-Rewrite-URL: /admin/users")),
    # Percent-encodings.
    Case("encoded-a", b"/%61dmin/users"),
    Case("encoded-dot", b"/public/%2e/admin"),
    Case("encoded-dotdot-upper", b"/public/%2E%2E/admin/users"),
    Case("double-encoded-slash", b"/admin%252fusers"),
    Case("double-encoded-dotdot", b"/public/%252e%252e/admin/users"),
    Case("encoded-backslash", b"/public/..%5cadmin/users"),
    Case("overlong-dotdot", b"/public/%c0%ae%c0%ae/admin/users"),
    # Sub-delimiters escaped or not: every server reads /a%2Bb%40c as /a+b@c.
    Case("plain-plus-at", b"/a+b@c"),
    Case("encoded-plus-at", b"/a%2Bb%40c"),
    Case("encoded-plus-lower", b"/a%2bb@c"),
    Case("encoded-at-only", b"/a+b%40c"),
    Case("encoded-unreserved-plus-at", b"/%61+b@%63"),
    Case("overlong-slash", b"/public/..%c0%afadmin/users"),
    Case("encoded-nul", b"/admin/users%00"),
    Case("raw-backslash", b"/admin\\users"),
    Case("raw-backslash-dotdot", b"/public\\..\\admin"),
    # Case, slashes and dot segments.
    Case("upper-admin", b"/ADMIN/users"),
    Case("capital-admin", b"/Admin"),
    Case("double-slash", b"//admin/users"),
    Case("double-slash-dotdot", b"/public//..//admin"),
    Case("dotdot", b"/public/../admin"),
    Case("dot", b"/public/./admin"),
    # Framing.
    Case(
        "te-gzip",
        b"/public",
        b"POST",
        headers=_h("Transfer-Encoding: gzip"),
        body=b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        chunked_body=True,
    ),
    Case(
        "te-chunked-gzip",
        b"/public",
        b"POST",
        headers=_h("Transfer-Encoding: chunked, gzip"),
        body=b"0\r\n\r\n",
        chunked_body=True,
    ),
    Case("blank-lines-before-request", b"/admin/users", prefix=b"\r\n\r\n"),
]

assert len({c.id for c in CORPUS}) == len(CORPUS)
assert all("_" not in c.id for c in CORPUS)
