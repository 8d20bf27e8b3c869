"""JWT-SVID validation (JWT-SVID spec; go-spiffe ``jwtsvid``; go-jose claim checks).

Pure: the token, the JWT authorities per trust domain, the audiences a route accepts,
``now`` and a leeway. PyJWT verifies the signature only; every other rule is checked
here so that the order and the reasons are explicit and ``now`` can be injected:

1. compact JWS (three parts); 2. ``alg`` in the asymmetric allowlist (``none``, HS*,
EdDSA refused: an HS256 token "signed" with a public key never gets near a key);
3. ``typ``, when present, is ``JWT`` or ``JOSE``; 4. ``kid`` present (go-spiffe requires
it); 5. ``sub`` present and a valid SPIFFE ID; ``exp`` present; 6. the key is looked up
ONLY in the bundle of ``sub``'s trust domain, by ``kid``; 7. the key type fits ``alg``;
8. signature; 9. ``exp``/``nbf``/``iat`` with leeway; 10. ``aud`` present and holding
one of the accepted audiences.

A token this module cannot read is ``jwt_malformed``, never an exception of another kind
(which would drop the client's connection unanswered): bad base64 or JSON, a header or
payload that is not an object, ``alg`` or ``kid`` that is not a string, any ``crit``
header (no JWS extension is understood here, so RFC 7515 section 4.1.11 says reject), a
time claim that is not a finite number between 1970 and 9999 (a NaN ``nbf`` would
otherwise pass every comparison), and anything else PyJWT or the JSON layer raises.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.bundle import PublicKey
from proxy.errors import ProxyError, SpiffeIdError
from proxy.spiffe_id import SpiffeId, TrustDomain

ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
_EC_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

MALFORMED = "jwt_malformed"
BAD_ALGORITHM = "jwt_algorithm_not_allowed"
BAD_TYPE = "jwt_bad_type"
MISSING_KID = "jwt_missing_kid"
MISSING_SUBJECT = "jwt_missing_subject"
INVALID_SUBJECT = "jwt_invalid_subject"
MISSING_EXP = "jwt_missing_exp"
NO_BUNDLE = "jwt_no_bundle_for_trust_domain"
UNKNOWN_KID = "jwt_unknown_kid"
KEY_MISMATCH = "jwt_key_does_not_fit_algorithm"
BAD_SIGNATURE = "jwt_bad_signature"
EXPIRED = "jwt_expired"
NOT_YET_VALID = "jwt_not_yet_valid"
ISSUED_IN_FUTURE = "jwt_issued_in_future"
MISSING_AUDIENCE = "jwt_missing_audience"
WRONG_AUDIENCE = "jwt_wrong_audience"


class JwtSvidError(ProxyError):
    status_hint = 403

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class JwtSvid:
    subject: SpiffeId
    audience: tuple[str, ...]
    expiry: dt.datetime
    kid: str
    algorithm: str


JwtAuthorities = Mapping[TrustDomain, Mapping[str, PublicKey]]


def _fits(alg: str, key: PublicKey) -> bool:
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVE_FOR_ALG[alg]


# The latest time a datetime can hold (9999-12-31T23:59:59Z): a NumericDate beyond it is
# no date at all.
_MAX_TIME = 253402300799.0


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtSvidError(MALFORMED, f"claim {name!r} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not (math.isfinite(number) and 0 <= number <= _MAX_TIME):
        raise JwtSvidError(MALFORMED, f"claim {name!r} is not a time between 1970 and 9999")
    return number


def validate(
    token: str,
    authorities: JwtAuthorities,
    audiences: Iterable[str],
    now: dt.datetime,
    leeway: float = 60.0,
) -> JwtSvid:
    """Validate a JWT-SVID; raise :class:`JwtSvidError` with the first broken rule, and
    ``jwt_malformed`` for anything that cannot be read (never another exception)."""
    try:
        return _validate(token, authorities, audiences, now, leeway)
    except JwtSvidError:
        raise
    except Exception as exc:  # PyJWT, json, base64, cryptography: hostile input, any error
        raise JwtSvidError(MALFORMED, f"{type(exc).__name__}: {exc}") from exc


def _validate(
    token: str,
    authorities: JwtAuthorities,
    audiences: Iterable[str],
    now: dt.datetime,
    leeway: float,
) -> JwtSvid:
    if token.count(".") != 2:
        raise JwtSvidError(MALFORMED, "not a compact JWS (three dot-separated parts)")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:  # bad base64 or JSON, not objects, a kid not a string
        raise JwtSvidError(MALFORMED, str(exc)) from exc
    if "crit" in header:
        raise JwtSvidError(MALFORMED, "critical header parameters are not supported")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JwtSvidError(MALFORMED, "header parameter 'alg' is not a string")
    if alg not in ALGORITHMS:
        raise JwtSvidError(BAD_ALGORITHM, f"algorithm {alg!r} is not allowed")
    if "typ" in header and header["typ"] not in ("JWT", "JOSE"):
        raise JwtSvidError(BAD_TYPE, "token header type not equal to either JWT or JOSE")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtSvidError(MALFORMED, "header parameter 'kid' is not a string")
    if not kid:
        raise JwtSvidError(MISSING_KID, "token header missing key id")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise JwtSvidError(MISSING_SUBJECT, "token missing subject claim")
    try:
        subject = SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtSvidError(INVALID_SUBJECT, f"token has an invalid subject claim: {exc}") from exc
    exp = _number(claims, "exp")
    if exp is None:
        raise JwtSvidError(MISSING_EXP, "token missing exp claim")
    keys = authorities.get(subject.trust_domain)
    if keys is None:
        raise JwtSvidError(NO_BUNDLE, f"no JWT bundle for trust domain {subject.trust_domain}")
    key = keys.get(kid)
    if key is None:
        raise JwtSvidError(UNKNOWN_KID, f"no JWT authority {kid!r} in {subject.trust_domain}")
    if not _fits(alg, key):
        raise JwtSvidError(KEY_MISMATCH, f"key {kid!r} cannot verify {alg}")
    try:
        verified = jwt.decode(
            token,
            key,
            algorithms=[alg],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise JwtSvidError(BAD_SIGNATURE, "signature does not verify") from exc
    except jwt.PyJWTError as exc:
        raise JwtSvidError(MALFORMED, str(exc)) from exc
    if verified.get("sub") != sub:  # pragma: no cover - same bytes, belt and braces
        raise JwtSvidError(INVALID_SUBJECT, "verified subject differs")
    t = now.timestamp()
    if t - leeway > exp:
        raise JwtSvidError(EXPIRED, "token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and t + leeway < nbf:
        raise JwtSvidError(NOT_YET_VALID, "token not valid yet")
    iat = _number(claims, "iat")
    if iat is not None and t + leeway < iat:
        raise JwtSvidError(ISSUED_IN_FUTURE, "token issued in the future")
    aud = claims.get("aud")
    aud_list = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not aud_list or not all(isinstance(a, str) for a in aud_list):
        raise JwtSvidError(MISSING_AUDIENCE, "token has no audience")
    wanted = tuple(audiences)
    if not wanted or not any(a in aud_list for a in wanted):
        raise JwtSvidError(
            WRONG_AUDIENCE, f"expected audience in {list(wanted)!r} (audience={list(aud_list)!r})"
        )
    return JwtSvid(subject, aud_list, dt.datetime.fromtimestamp(exp, dt.UTC), kid, alg)
