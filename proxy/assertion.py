"""Signed identity assertions: a short-lived ES256 JWT telling an upstream who called.

For a legacy app that cannot trust the network between it and the proxy: it verifies the
header with any JWT library against the proxy's JWKS (served on the admin listener at
``/.well-known/jwks.json``). Claims: ``iss`` (the proxy's SPIFFE ID), ``sub`` (the
caller's SPIFFE ID), ``aud`` (the upstream's name), ``jti``, ``request_id``, ``iat``,
``nbf``, ``exp`` (at most 60 s later), ``route`` and ``policy_sha256``. Pure: no I/O.

Bound to the request: ``method`` and ``path`` (the canonical path and query the policy
judged), so an assertion one endpoint saw cannot be replayed to another path or with
another method within its lifetime; ``jti`` is 128 random bits, unique per assertion
(the client chooses ``X-Request-Id``, so that goes in ``request_id`` instead), so an app
can also refuse a replay of the same request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.bundle import jwk_members

MAX_TTL = 60.0


def thumbprint(public_jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), used as the ``kid``."""
    required = {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(required, separators=(",", ":"), sort_keys=True).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


class AssertionSigner:
    """Signs assertions with one EC P-256 key; publishes its public half as a JWKS."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, issuer: str) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the assertion key must be an EC P-256 key (ES256)")
        self._key = key
        self.issuer = issuer
        self._public = jwk_members(key.public_key())
        self.kid = thumbprint(self._public)

    @classmethod
    def from_pem(cls, pem: bytes, issuer: str) -> AssertionSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the assertion key must be an EC P-256 private key")
        return cls(key, issuer)

    @classmethod
    def generate(cls, issuer: str) -> AssertionSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()), issuer)

    def sign(
        self,
        *,
        subject: str,
        audience: str,
        request_id: str,
        route: str,
        policy_sha256: str,
        now: float,
        ttl: float,
        method: str = "",
        path: str = "",
    ) -> str:
        ttl = min(ttl, MAX_TTL)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "jti": secrets.token_urlsafe(16),
            "request_id": request_id,
            "method": method,
            "path": path,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "route": route,
            "policy_sha256": policy_sha256,
        }
        return jwt.encode(
            claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"}
        )

    def private_pem(self) -> bytes:
        """The key as PKCS#8 PEM, to hand one key to every worker process."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**self._public, "kid": self.kid, "use": "sig", "alg": "ES256"}]}
