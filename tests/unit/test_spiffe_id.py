"""One row per SPIFFE ID rule (../shared/SPIFFE.md section 1), go-spiffe style."""

import pytest

from proxy import spiffe_id as sid
from proxy.errors import SpiffeIdError
from proxy.spiffe_id import SpiffeId, TrustDomain

VALID = [
    ("td_only", "spiffe://example.org", "example.org", ""),
    ("workload", "spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
    ("ipv4_td_mixed_case_path", "spiffe://1.2.3.4/A.b_c-d", "1.2.3.4", "/A.b_c-d"),
    ("dot_prefixed_segment", "spiffe://example.org/.a", "example.org", "/.a"),
    ("double_dot_inside_segment", "spiffe://example.org/a..b", "example.org", "/a..b"),
    ("underscore_dash_td", "spiffe://my_td-1.org/x", "my_td-1.org", "/x"),
]

INVALID = [
    ("empty", "", sid.ERR_EMPTY),
    ("wrong_scheme", "http://e.org/x", sid.ERR_SCHEME),
    ("uppercase_scheme", "SPIFFE://e.org/x", sid.ERR_SCHEME),
    ("no_slashes", "spiffe:e.org/x", sid.ERR_SCHEME),
    ("td_missing", "spiffe://", sid.ERR_TD_MISSING),
    ("td_missing_with_path", "spiffe:///a", sid.ERR_TD_MISSING),
    ("uppercase_td", "spiffe://E.org/x", sid.ERR_TD_CHARS),
    ("port_not_allowed", "spiffe://e.org:443/x", sid.ERR_TD_CHARS),
    ("userinfo_not_allowed", "spiffe://u@e.org/x", sid.ERR_TD_CHARS),
    ("percent_in_td", "spiffe://e%41.org/x", sid.ERR_TD_CHARS),
    ("ipv6_td", "spiffe://[::1]/x", sid.ERR_TD_CHARS),
    ("non_ascii_td", "spiffe://exämple.org/x", sid.ERR_TD_CHARS),
    ("trailing_slash_root", "spiffe://e.org/", sid.ERR_TRAILING_SLASH),
    ("trailing_slash", "spiffe://e.org/a/", sid.ERR_TRAILING_SLASH),
    ("empty_segment", "spiffe://e.org//x", sid.ERR_EMPTY_SEGMENT),
    ("dot_segment", "spiffe://e.org/./x", sid.ERR_DOT_SEGMENT),
    ("dotdot_segment", "spiffe://e.org/a/..", sid.ERR_DOT_SEGMENT),
    ("percent_encoding", "spiffe://e.org/a%20b", sid.ERR_PATH_CHARS),
    ("query", "spiffe://e.org/x?q", sid.ERR_PATH_CHARS),
    ("fragment", "spiffe://e.org/x#f", sid.ERR_PATH_CHARS),
    ("non_ascii_path", "spiffe://e.org/café", sid.ERR_PATH_CHARS),
    ("space_in_path", "spiffe://e.org/a b", sid.ERR_PATH_CHARS),
    ("too_long", "spiffe://e.org/" + "a" * 2040, sid.ERR_TOO_LONG),
    ("td_too_long", "spiffe://" + "a" * 256 + "/x", sid.ERR_TD_TOO_LONG),
]


@pytest.mark.parametrize(("value", "td", "path"), [r[1:] for r in VALID], ids=[r[0] for r in VALID])
def test_parse_valid(value: str, td: str, path: str) -> None:
    parsed = SpiffeId.parse(value)
    assert parsed.trust_domain == TrustDomain(td)
    assert parsed.path == path
    assert str(parsed) == value


@pytest.mark.parametrize(("value", "reason"), [r[1:] for r in INVALID], ids=[r[0] for r in INVALID])
def test_parse_invalid(value: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as exc:
        SpiffeId.parse(value)
    assert exc.value.reason == reason
    assert repr(value)[:40].rstrip("'") in str(exc.value)


def test_equality_is_plain_string_equality() -> None:
    assert SpiffeId.parse("spiffe://e.org/A") != SpiffeId.parse("spiffe://e.org/a")
    assert SpiffeId.parse("spiffe://e.org/a") == SpiffeId.parse("spiffe://e.org/a")


def test_segments_and_membership() -> None:
    parsed = SpiffeId.parse("spiffe://e.org/ns/prod")
    assert parsed.segments == ("ns", "prod")
    assert SpiffeId.parse("spiffe://e.org").segments == ()
    assert parsed.member_of(TrustDomain("e.org"))
    assert not parsed.member_of(TrustDomain("other.org"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("example.org", "example.org"), ("spiffe://example.org/a", "example.org")],
    ids=["bare", "from_id"],
)
def test_trust_domain_parse(value: str, expected: str) -> None:
    assert TrustDomain.parse(value).name == expected


@pytest.mark.parametrize(
    "value", ["", "Example.org", "e.org:1", "e.org/x"], ids=["empty", "upper", "port", "path"]
)
def test_trust_domain_parse_invalid(value: str) -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(value)
