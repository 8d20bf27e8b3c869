"""``proxy.tls``: what its verify callback relies on beyond pyOpenSSL's public API."""

from __future__ import annotations

from OpenSSL import SSL, crypto

from proxy import svid, tls


def test_verify_callback_pins_pyopenssl_internals() -> None:
    # pyOpenSSL's set_verify wrapper cannot set the verify error that picks the alert, so
    # tls registers its callback with SSL_CTX_set_verify on the Context's SSL_CTX, finds
    # the Connection by its SSL pointer, and wraps the chain's X509 pointers: re-check
    # these on a pyOpenSSL upgrade (the certificate corpus then fails on its alerts too).
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    assert SSL.Connection._reverse_mapping[conn._ssl] is conn
    assert ctx._context is not None
    assert callable(crypto.X509._from_raw_x509_ptr)


def test_each_refusal_reason_maps_to_its_alert() -> None:
    lib = tls._lib
    assert tls.alert_error(svid.EXPIRED) == lib.X509_V_ERR_CERT_HAS_EXPIRED
    assert tls.alert_error(svid.UNTRUSTED) == lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert tls.alert_error(svid.LEAF_IS_CA) == lib.X509_V_ERR_CERT_REJECTED


def _handshake_in_memory() -> tuple[SSL.Connection, SSL.Connection]:
    from loadtests.tls_idle_floor import handshake
    from proxy.devcerts import issue_ca, issue_svid

    root = issue_ca("example.org")
    server = issue_svid(root, ["spiffe://example.org/server"], dns=["localhost"])
    client = issue_svid(root, ["spiffe://example.org/client"])
    s = SSL.Connection(tls.server_context([server.cert], server.key, "server key"), None)
    s.set_accept_state()
    s.set_app_data(lambda chain: None)  # accept: only the BIOs are under test here
    c = SSL.Connection(tls.client_context([client.cert], client.key, "client key"), None)
    c.set_connect_state()
    handshake(c, s)
    return s, c


def test_renewed_bios_keep_the_connection_working() -> None:
    """``tls_stream.renew_bios`` swaps pyOpenSSL's private memory BIOs (``_ssl``,
    ``_into_ssl``, ``_from_ssl``) for empty ones: an idle connection gives back what the
    handshake's flights grew them to. Pin that the connection still works both ways, and
    that BIOs holding data are never swapped (the data would be lost)."""
    from loadtests.tls_idle_floor import _pump
    from proxy.tls_stream import renew_bios

    s, c = _handshake_in_memory()
    old = s._into_ssl  # type: ignore[attr-defined]
    assert renew_bios(s)
    assert s._into_ssl != old  # type: ignore[attr-defined]
    c.send(b"GET / HTTP/1.1\r\n\r\n")
    _pump(c, s)
    assert s.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    s.send(b"HTTP/1.1 200 OK\r\n\r\n")
    _pump(s, c)
    assert c.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    c.send(b"more")
    s.bio_write(c.bio_read(1000))  # ciphertext waiting in the server's incoming BIO
    assert not renew_bios(s)
    assert s.recv(100) == b"more"
    s.send(b"reply")  # ciphertext waiting in the outgoing BIO
    assert not renew_bios(s)
    c.bio_write(s.bio_read(1000))
    assert c.recv(100) == b"reply"
    assert renew_bios(s)
