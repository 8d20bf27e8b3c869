"""One row per JWT-SVID rule (../shared/SPIFFE.md section 3), with real signatures."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable

import pytest

from proxy import jwtsvid
from proxy.jwtsvid import JwtSvidError, validate
from proxy.spiffe_id import TrustDomain
from tests.jwt_helpers import EC_KEY, OTHER_EC_KEY, RSA_KEY, claims, forge, mint, public_pem

SUB = "spiffe://example.org/ns/prod/sa/web"
AUD = ["spiffe://example.org/billing"]
AUTHORITIES = {
    TrustDomain("example.org"): {"k1": EC_KEY.public_key(), "r1": RSA_KEY.public_key()},
    TrustDomain("partner.org"): {"p1": OTHER_EC_KEY.public_key()},
}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


ACCEPT: list[tuple[str, Callable[[], str]]] = [
    ("es256", lambda: mint(claims(SUB))),
    ("rs256", lambda: mint(claims(SUB), RSA_KEY, "RS256", "r1")),
    ("ps256", lambda: mint(claims(SUB), RSA_KEY, "PS256", "r1")),
    ("aud_list_any_match", lambda: mint(claims(SUB, aud=["other", AUD[0]]))),
    ("typ_jose", lambda: mint(claims(SUB), typ="JOSE")),
    ("expired_within_leeway", lambda: mint(claims(SUB, ttl=-30))),
    ("federated_own_key", lambda: mint(claims("spiffe://partner.org/x"), OTHER_EC_KEY, kid="p1")),
]

REJECT: list[tuple[str, Callable[[], str], str]] = [
    (
        "alg_none",
        lambda: forge(claims(SUB), {"alg": "none", "kid": "k1"}, None),
        jwtsvid.BAD_ALGORITHM,
    ),
    (
        "hs256_keyed_with_public_key",
        lambda: forge(claims(SUB), {"alg": "HS256", "kid": "k1", "typ": "JWT"}, public_pem(EC_KEY)),
        jwtsvid.BAD_ALGORITHM,
    ),
    (
        "wrong_audience",
        lambda: mint(claims(SUB, aud="spiffe://example.org/other")),
        jwtsvid.WRONG_AUDIENCE,
    ),
    ("missing_audience", lambda: mint(claims(SUB, aud=None)), jwtsvid.MISSING_AUDIENCE),
    ("empty_audience_list", lambda: mint(claims(SUB, aud=[])), jwtsvid.MISSING_AUDIENCE),
    ("expired", lambda: mint(claims(SUB, ttl=-120)), jwtsvid.EXPIRED),
    (
        "not_yet_valid",
        lambda: mint(claims(SUB, nbf=int(now().timestamp()) + 600)),
        jwtsvid.NOT_YET_VALID,
    ),
    (
        "issued_in_future",
        lambda: mint(claims(SUB, iat=int(now().timestamp()) + 600)),
        jwtsvid.ISSUED_IN_FUTURE,
    ),
    ("unknown_kid", lambda: mint(claims(SUB), kid="nope"), jwtsvid.UNKNOWN_KID),
    ("missing_kid", lambda: mint(claims(SUB), kid=None), jwtsvid.MISSING_KID),
    ("bad_typ", lambda: mint(claims(SUB), typ="at+jwt"), jwtsvid.BAD_TYPE),
    (
        "missing_sub",
        lambda: mint({"aud": AUD, "exp": int(now().timestamp()) + 60}),
        jwtsvid.MISSING_SUBJECT,
    ),
    ("invalid_sub", lambda: mint(claims("spiffe://Example.org/x")), jwtsvid.INVALID_SUBJECT),
    ("missing_exp", lambda: mint({"sub": SUB, "aud": AUD}), jwtsvid.MISSING_EXP),
    ("unknown_trust_domain", lambda: mint(claims("spiffe://other.org/x")), jwtsvid.NO_BUNDLE),
    # partner.org's key signs a token for example.org: only example.org's keys may verify it.
    ("other_domains_key", lambda: mint(claims(SUB), OTHER_EC_KEY, kid="p1"), jwtsvid.UNKNOWN_KID),
    (
        "signed_by_other_key",
        lambda: mint(claims(SUB), OTHER_EC_KEY, kid="k1"),
        jwtsvid.BAD_SIGNATURE,
    ),
    ("rsa_kid_with_es256", lambda: mint(claims(SUB), EC_KEY, "ES256", "r1"), jwtsvid.KEY_MISMATCH),
    ("tampered_payload", lambda: _tamper(mint(claims(SUB))), jwtsvid.BAD_SIGNATURE),
    ("not_a_jws", lambda: "abc.def", jwtsvid.MALFORMED),
    ("garbage_parts", lambda: "a.b.c", jwtsvid.MALFORMED),
]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: bytes, payload: bytes = b"", signature: str = "AAAA") -> str:
    """A token from raw JSON segments, with a signature that never gets checked."""
    body = payload or json.dumps(claims(SUB, aud=AUD)).encode()
    return f"{_b64(header)}.{_b64(body)}.{signature}"


def _minted(**payload: object) -> str:
    """A correctly signed token whose claims are overridden (NaN and Infinity included)."""
    return mint({**claims(SUB, aud=AUD), **payload})


# Tokens the validator cannot read: each is jwt_malformed, never another exception (one
# would drop the client's connection unanswered instead of denying the request).
MALFORMED: list[tuple[str, Callable[[], str]]] = [
    ("crit_header", lambda: mint(claims(SUB, aud=AUD), crit=["exp"])),
    ("crit_header_b64", lambda: mint(claims(SUB, aud=AUD), crit=["b64"], b64=True)),
    ("kid_not_a_string", lambda: _raw(b'{"alg":"ES256","kid":5}')),
    ("kid_a_list", lambda: _raw(b'{"alg":"ES256","kid":["k1"]}')),
    ("alg_a_list", lambda: _raw(b'{"alg":["ES256"],"kid":"k1"}')),
    ("alg_an_object", lambda: _raw(b'{"alg":{"x":1},"kid":"k1"}')),
    ("exp_nan", lambda: _minted(exp=float("nan"))),
    ("exp_infinity", lambda: _minted(exp=float("inf"))),
    ("exp_huge_int", lambda: _minted(exp=10**400)),
    ("exp_past_year_9999", lambda: _minted(exp=1e308)),
    ("exp_negative", lambda: _minted(exp=-1)),
    ("nbf_nan", lambda: _minted(nbf=float("nan"))),
    ("nbf_huge", lambda: _minted(nbf=10**30)),
    ("iat_minus_infinity", lambda: _minted(iat=float("-inf"))),
    ("iat_nan", lambda: _minted(iat=float("nan"))),
    ("header_bad_base64", lambda: "!!!." + _b64(b"{}") + ".AAAA"),
    ("payload_bad_base64", lambda: _b64(b'{"alg":"ES256","kid":"k1"}') + ".@@@.AAAA"),
    ("signature_bad_base64", lambda: mint(claims(SUB, aud=AUD)).rsplit(".", 1)[0] + ".!!"),
    ("header_not_json", lambda: _raw(b"alg=ES256")),
    ("header_not_an_object", lambda: _raw(b'["ES256"]')),
    ("header_not_utf8", lambda: _raw(b"\xff\xfe")),
    ("payload_not_an_object", lambda: _raw(b'{"alg":"ES256","kid":"k1"}', b"[1]")),
    ("payload_not_utf8", lambda: _raw(b'{"alg":"ES256","kid":"k1"}', b"\xff")),
    ("payload_nested_too_deep", lambda: _raw(b'{"alg":"ES256","kid":"k1"}', b"[" * 100_000)),
    (
        "unencoded_payload_b64_false",
        lambda: _raw(b'{"alg":"ES256","kid":"k1","b64":false}'),
    ),
]


@pytest.mark.parametrize("make", [r[1] for r in MALFORMED], ids=[r[0] for r in MALFORMED])
def test_malformed_is_an_answer_not_an_exception(make: Callable[[], str]) -> None:
    with pytest.raises(JwtSvidError) as exc:
        validate(make(), AUTHORITIES, AUD, now())
    assert exc.value.reason == jwtsvid.MALFORMED


def _tamper(token: str) -> str:
    header, _, sig = token.split(".")
    body = mint(claims("spiffe://example.org/ns/prod/sa/admin")).split(".")[1]
    return f"{header}.{body}.{sig}"


@pytest.mark.parametrize("make", [r[1] for r in ACCEPT], ids=[r[0] for r in ACCEPT])
def test_accept(make: Callable[[], str]) -> None:
    svid = validate(make(), AUTHORITIES, AUD, now())
    assert str(svid.subject).startswith("spiffe://")


@pytest.mark.parametrize(("make", "reason"), [r[1:] for r in REJECT], ids=[r[0] for r in REJECT])
def test_reject(make: Callable[[], str], reason: str) -> None:
    with pytest.raises(JwtSvidError) as exc:
        validate(make(), AUTHORITIES, AUD, now())
    assert exc.value.reason == reason


def test_no_configured_audience_accepts_nothing() -> None:
    with pytest.raises(JwtSvidError) as exc:
        validate(mint(claims(SUB)), AUTHORITIES, [], now())
    assert exc.value.reason == jwtsvid.WRONG_AUDIENCE


def test_leeway_is_configurable() -> None:
    token = mint(claims(SUB, ttl=-30))
    with pytest.raises(JwtSvidError):
        validate(token, AUTHORITIES, AUD, now(), leeway=0)
