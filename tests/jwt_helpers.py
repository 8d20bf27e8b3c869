"""Minting JWT-SVIDs for tests, including forged ones."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(
    sub: str, aud: Any = "spiffe://example.org/billing", ttl: float = 300, **extra: Any
) -> dict[str, Any]:
    now = time.time()
    out = {"sub": sub, "aud": aud, "exp": int(now + ttl), "iat": int(now)}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def mint(
    payload: dict[str, Any],
    key: Any = EC_KEY,
    alg: str = "ES256",
    kid: str | None = "k1",
    **header: Any,
) -> str:
    headers = {"kid": kid, **header} if kid else dict(header)
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: dict[str, Any], header: dict[str, Any], secret: bytes | None) -> str:
    """An unsigned (``alg: none``) or HMAC token built by hand, as an attacker would."""
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    sig = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + _b64(sig)


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
