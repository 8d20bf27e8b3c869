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
