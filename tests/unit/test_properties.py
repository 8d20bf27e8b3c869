"""Property-based tests (hypothesis) on the parsers a hostile peer or a careless admin can
reach: nothing escapes but the module's own error type, and what parses means what a
plain reference model says it means. Examples per property: the ``ci`` profile in
tests/conftest.py (thousands in all); ``HYPOTHESIS_PROFILE=fuzz`` runs far more.
"""

from __future__ import annotations

import re
import string
from typing import Any

import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy import headers, proxyproto, xfcc
from proxy.canonical import (
    Refusal,
    Refused,
    Rules,
    build,
    canonical_route_path,
    normalize_path,
)
from proxy.errors import ConfigError, PolicyError, SpiffeIdError
from proxy.policy.loader import load_policy
from proxy.policy.patterns import HostPattern, IdentityPattern, PathMatch
from proxy.spiffe_id import MAX_ID_LENGTH, SpiffeId, TrustDomain
from tests.conftest import examples

# --- SPIFFE IDs ---------------------------------------------------------------------

# The SPIFFE-ID spec as one regular expression (dot segments are excluded separately).
_REFERENCE_ID = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/[A-Za-z0-9._-]+)*")

# Mostly near-valid text, so both branches are exercised: the ID alphabet plus the
# characters the spec forbids (upper case in the trust domain, %, :, @, ?, #, space, NUL).
_ID_CHARS = "abcxyzABC019._-/%:@?#\\ \x00\r\né"
segment = st.text("abAB01._-", min_size=1, max_size=6)
trust_domain = st.text("ab01.-_", min_size=1, max_size=10)
valid_ids = st.builds(
    lambda td, segs: f"spiffe://{td}" + "".join("/" + s for s in segs),
    trust_domain,
    st.lists(segment.filter(lambda s: s not in (".", "..")), max_size=5),
)
id_like = st.one_of(
    valid_ids,
    st.builds(lambda t: "spiffe://" + t, st.text(_ID_CHARS, max_size=30)),
    st.text(max_size=40),
)


def reference_valid(text: str) -> bool:
    if len(text) > MAX_ID_LENGTH or not _REFERENCE_ID.fullmatch(text):
        return False
    path = text[len("spiffe://") :].partition("/")[2]
    return not any(s in (".", "..") for s in path.split("/")) if path else True


@given(id_like)
def test_spiffe_id_parser_agrees_with_the_spec_regex(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        assert not reference_valid(text), text
        assert exc.reason  # every refusal names the rule
        return
    assert reference_valid(text), text
    assert str(parsed) == text  # canonical form is the input: no case folding, no decoding
    assert SpiffeId.parse(str(parsed)) == parsed
    assert str(parsed.trust_domain.id) == "spiffe://" + parsed.trust_domain.name


@given(st.text(max_size=30))
def test_trust_domain_parser_raises_only_its_error(text: str) -> None:
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError:
        return
    assert TrustDomain.parse(td.name) == td


# --- identity patterns --------------------------------------------------------------

pattern_segment = st.sampled_from(["a", "b", "*"])
patterns = st.builds(
    lambda td, segs, tail: (
        f"spiffe://{td}" + "".join("/" + s for s in segs) + ("/*" if tail else "")
    ),
    st.sampled_from(["a.org", "b.org"]),
    st.lists(pattern_segment, max_size=4),
    st.booleans(),
)
small_ids = st.builds(
    lambda td, segs: SpiffeId.parse(f"spiffe://{td}" + "".join("/" + s for s in segs)),
    st.sampled_from(["a.org", "b.org"]),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6),
)


def reference_matches(pattern: str, spiffe_id: SpiffeId) -> bool:
    """The documented grammar as a regex: inner ``*`` is one segment, a final ``/*`` one
    or more."""
    td, _, path = pattern[len("spiffe://") :].partition("/")
    parts = path.split("/") if path else []
    tail = bool(parts) and parts[-1] == "*"
    if tail:
        parts = parts[:-1]
    rx = re.escape(f"spiffe://{td}") + "".join(
        "/[^/]+" if p == "*" else "/" + re.escape(p) for p in parts
    )
    rx += "(/[^/]+)+" if tail else ""
    return re.fullmatch(rx, str(spiffe_id)) is not None


@given(st.one_of(patterns, st.text(_ID_CHARS + "*", max_size=30)))
def test_identity_pattern_parser_raises_only_its_error(text: str) -> None:
    try:
        IdentityPattern.parse(text)
    except SpiffeIdError:
        return


@given(patterns, small_ids)
def test_identity_pattern_matches_like_the_reference(text: str, spiffe_id: SpiffeId) -> None:
    try:
        pattern = IdentityPattern.parse(text)
    except SpiffeIdError:
        assume(False)
        return
    assert pattern.matches(spiffe_id) == reference_matches(text, spiffe_id)


@examples(500)
@given(patterns, patterns, st.lists(small_ids, min_size=1, max_size=8))
def test_covers_and_overlaps_are_sound(a_text: str, b_text: str, ids: list[SpiffeId]) -> None:
    try:
        a, b = IdentityPattern.parse(a_text), IdentityPattern.parse(b_text)
    except SpiffeIdError:
        assume(False)
        return
    for spiffe_id in ids:
        if a.covers(b) and b.matches(spiffe_id):
            assert a.matches(spiffe_id)  # no false "covers": the shadowing check relies on it
        if a.matches(spiffe_id) and b.matches(spiffe_id):
            assert a.overlaps(b) and b.overlaps(a)


# --- hosts and paths ----------------------------------------------------------------


@given(st.text("a.*-:/", max_size=12), st.text("a.b-", max_size=12))
def test_host_pattern_parse_and_match(text: str, host: str) -> None:
    try:
        pattern = HostPattern.parse(text)
    except ValueError:
        return
    suffix = pattern.text[1:]  # ".example.com" of "*.example.com"
    expected = (
        host.endswith(suffix) and host[: -len(suffix)] != ""  # at least one more label
        if pattern.wildcard
        else host == pattern.text
    )
    assert pattern.matches(host) == expected


raw_paths = st.text("/a.%2F5cC0x\\?#", max_size=20).map(lambda s: s.encode())
# Escapes of every ASCII byte, in both cases, and the raw sub-delimiters and unsafe
# characters: the spellings the canonical form unifies.
escapes = st.integers(1, 127).flatmap(lambda b: st.sampled_from([f"%{b:02X}", f"%{b:02x}"]))
spelled_paths = st.lists(
    st.one_of(escapes, st.sampled_from(list('/ab@:+!$&\'()*,=;~{}|^`<>[]""'))), max_size=12
).map(lambda parts: "".join(parts).encode())


@given(raw_paths)
def test_path_normalization_is_idempotent_and_safe(raw: bytes) -> None:
    try:
        path = normalize_path(b"/" + raw)
    except Refused as exc:
        assert exc.refusal.status == 400
        return
    except UnicodeDecodeError:
        return  # h11 only hands over ASCII targets
    assert normalize_path(path.encode()) == path
    assert "//" not in path and "\\" not in path and "%2F" not in path.upper()
    assert not any(s in (".", "..") for s in path.split("/"))


@given(spelled_paths)
def test_every_spelling_of_a_path_has_one_canonical_form(raw: bytes) -> None:
    """The canonical path is a fixed point, ``canonical_route_path`` leaves it as it is
    (the canonical-form check on route paths accepts it; the route grammar may still
    refuse a ';' or a '*' inside a segment), and another spelling canonicalises to it."""
    try:
        path = normalize_path(b"/" + raw)
    except Refused:
        return
    assert normalize_path(path.encode()) == path
    assert canonical_route_path(path) == path
    # Another spelling of it (every decodable character escaped) has the same form.
    other = "".join(f"%{ord(c):02X}" if c in "ab@:+!$&'()*,=~" else c for c in path)
    assert normalize_path(other.encode()) == path


@given(st.binary(max_size=40), st.sampled_from([b"GET", b"OPTIONS", b"CONNECT"]))
def test_request_target_parser_refuses_or_forwards_origin_form(raw: bytes, method: bytes) -> None:
    try:
        request = build(method, raw, [(b"host", b"a.example")], Rules())
    except UnicodeDecodeError:
        return  # h11 only hands over ASCII targets; nothing else reaches this
    if isinstance(request, Refusal):
        assert request.status in (400, 405)
        return
    assert request.target.startswith(b"/") or request.target == b"*"
    assert build(method, request.target, [(b"host", b"a.example")], Rules()) == request


@given(st.text("/a*b.", max_size=12), st.text("/ab.", max_size=12))
def test_path_match_prefix_is_on_segment_boundaries(value: str, path: str) -> None:
    try:
        m = PathMatch.parse("prefix", value)
    except ValueError:
        return
    if m.matches(path):
        assert path == value or path.startswith(value.rstrip("/") + "/") or value.endswith("/")


# --- XFCC ---------------------------------------------------------------------------

xfcc_values = st.text(max_size=20)  # anything a certificate may carry, control chars too
elements = st.lists(
    st.lists(st.tuples(st.sampled_from(xfcc.FIELDS), xfcc_values), min_size=1, max_size=5),
    min_size=1,
    max_size=4,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _neutralized(element: xfcc.Element) -> xfcc.Element:
    return [(k, xfcc._neutralize(v)) for k, v in element]


@examples(500)
@given(elements)
def test_xfcc_format_then_parse_round_trips(els: list[xfcc.Element]) -> None:
    text = xfcc.format_header(els)
    assert not _CONTROL.search(text)  # nothing can break out of the header line
    assert xfcc.parse(text) == [_neutralized(e) for e in els]


@given(st.one_of(st.text(max_size=60), st.text('By=URI;,"\\ a%\r\n', max_size=60)))
def test_xfcc_parser_raises_only_its_error_and_reformats_stably(text: str) -> None:
    try:
        parsed = xfcc.parse(text)
    except xfcc.XfccError as exc:
        assert 0 <= exc.position <= len(text)
        return
    again = xfcc.format_header(parsed)
    assert not _CONTROL.search(again)
    if text.isascii():  # non-ASCII comes back %-escaped by design
        assert xfcc.parse(again) == parsed


# --- request ids and PROXY protocol -------------------------------------------------


@given(st.binary(max_size=200))
def test_request_id_is_always_a_safe_token(value: bytes) -> None:
    rid = headers.request_id([(b"x-request-id", value)])
    assert rid and len(rid) <= headers.MAX_REQUEST_ID
    assert set(rid) <= set(string.ascii_letters + string.digits + "._:-")


@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(lambda b: b"PROXY " + b, st.binary(max_size=60)),
        st.builds(lambda b: proxyproto.V2_SIGNATURE + b, st.binary(max_size=60)),
    )
)
def test_proxy_protocol_parser_raises_only_its_error(data: bytes) -> None:
    try:
        header = proxyproto.parse(data)
    except proxyproto.ProxyProtocolError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)


# --- the policy loader --------------------------------------------------------------

_POLICY_KEYS = [
    "routes", "name", "match", "host", "path", "path_prefix", "methods", "upstream", "allow",
    "deny", "audiences", "mode", "revoked", "ids", "cert_sha256", "max_cert_lifetime", "jwt",
    "tests", "origin", "jwt_subject", "keep_token", "header", "leeway", "expect", "id",
    "request", "route", "audience", "hosts",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.sampled_from(["/", "/a", "*.x.org", "spiffe://example.org/*", "GET", "app", "1h", "audit"]),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_POLICY_KEYS), inner, max_size=5),
    ),
    max_leaves=25,
)


def _check_policy_error(exc: ConfigError) -> None:
    assert isinstance(exc, PolicyError)
    assert exc.location.startswith("p.yaml"), exc.location  # always names the file


@examples(400)
@given(st.dictionaries(st.sampled_from(_POLICY_KEYS), documents, max_size=6))
def test_policy_loader_on_random_structures_raises_only_policy_errors(doc: dict[str, Any]) -> None:
    try:
        load_policy(yaml.safe_dump(doc).encode(), "p.yaml", upstreams={"app"})
    except ConfigError as exc:
        _check_policy_error(exc)


@given(st.one_of(st.binary(max_size=200), st.text(":-[]{}&*!|>'\"%@`#,? \n\tab", max_size=120)))
def test_policy_loader_on_random_text_raises_only_policy_errors(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    try:
        load_policy(raw, "p.yaml", upstreams={"app"})
    except ConfigError as exc:
        _check_policy_error(exc)


_VALID_POLICY: dict[str, Any] = {
    "mode": "enforce",
    "revoked": {"ids": ["spiffe://example.org/ns/x/sa/y"], "cert_sha256": ["ab" * 32]},
    "max_cert_lifetime": "24h",
    "jwt": {"header": "authorization", "leeway": "30s"},
    "routes": [
        {
            "name": "api",
            "match": {"hosts": ["*.example.org"], "path_prefix": "/api", "methods": ["GET"]},
            "upstream": "app",
            "allow": ["spiffe://example.org/ns/prod/*"],
            "deny": ["spiffe://example.org/ns/prod/sa/bad"],
            "audiences": ["api"],
            "origin": ["spiffe://example.org/*"],
        },
        {"name": "rest", "match": {"path": "/x/*/y"}, "upstream": "app", "allow": []},
    ],
    "tests": [
        {
            "id": "spiffe://example.org/ns/prod/sa/a",
            "request": "GET a.example.org /api/1",
            "expect": "allow",
            "route": "api",
            "audience": "api",
        }
    ],
}


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*at, i))
    return out


def test_the_mutation_base_policy_is_valid() -> None:
    load_policy(yaml.safe_dump(_VALID_POLICY).encode(), "p.yaml", upstreams={"app"})


@examples(600)
@given(st.sampled_from(_paths(_VALID_POLICY)[1:]), documents, st.booleans())
def test_policy_loader_on_one_mutation_of_a_valid_policy(
    where: tuple[Any, ...], value: Any, delete: bool
) -> None:
    """One field of a valid policy replaced or removed: an error names file, line, column."""
    import copy

    doc = copy.deepcopy(_VALID_POLICY)
    parent = doc
    for part in where[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    try:
        load_policy(yaml.safe_dump(doc).encode(), "p.yaml", upstreams={"app"})
    except ConfigError as exc:
        _check_policy_error(exc)
        assert re.match(r"p\.yaml:\d+:\d+$", exc.location), exc.location
