"""XFCC against Envoy's documented examples, every mode, and malformed input."""

from __future__ import annotations

import pytest

from proxy import xfcc
from proxy.xfcc import XfccError

ENVOY_1 = (
    "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;"
    'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com'
)
ENVOY_2 = (
    "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;"
    "URI=http://testclient.lyft.com,By=http://backend.lyft.com;"
    "Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;URI=http://frontend.lyft.com"
)
ENVOY_3 = (
    "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;"
    'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com;'
    "DNS=lyft.com;DNS=www.lyft.com"
)

H1 = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
H2 = "9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e"
SUBJECT = "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"

DOCS = [
    (
        "one_uri",
        ENVOY_1,
        [
            [
                ("By", "http://frontend.lyft.com"),
                ("Hash", H1),
                ("Subject", SUBJECT),
                ("URI", "http://testclient.lyft.com"),
            ]
        ],
    ),
    (
        "two_hops",
        ENVOY_2,
        [
            [
                ("By", "http://frontend.lyft.com"),
                ("Hash", H1),
                ("URI", "http://testclient.lyft.com"),
            ],
            [("By", "http://backend.lyft.com"), ("Hash", H2), ("URI", "http://frontend.lyft.com")],
        ],
    ),
    (
        "uri_and_dns",
        ENVOY_3,
        [
            [
                ("By", "http://frontend.lyft.com"),
                ("Hash", H1),
                ("Subject", SUBJECT),
                ("URI", "http://testclient.lyft.com"),
                ("DNS", "lyft.com"),
                ("DNS", "www.lyft.com"),
            ]
        ],
    ),
]


@pytest.mark.parametrize(("header", "elements"), [r[1:] for r in DOCS], ids=[r[0] for r in DOCS])
def test_envoy_documented_examples_parse_and_round_trip(header: str, elements: list) -> None:
    assert xfcc.parse(header) == elements
    assert xfcc.format_header(elements) == header  # byte for byte, Envoy's own output


@pytest.mark.parametrize(
    "value",
    ["a,b", "a;b", "a=b", 'say "hi"', "back\\slash", 'CN=x,O=y "z";w', "plain", " ", " pad "],
)
def test_quoting_round_trips(value: str) -> None:
    element = [("By", "spiffe://e.org/p"), ("Subject", value), ("URI", value)]
    assert xfcc.parse(xfcc.format_element(element)) == [element]


def test_keys_are_case_insensitive() -> None:
    assert xfcc.parse("by=a;HASH=b;uri=c") == [[("By", "a"), ("Hash", "b"), ("URI", "c")]]


MALFORMED = [
    ("empty", ""),
    ("no_equals", "By"),
    ("unknown_key", "By=a;Foo=bar"),
    ("unterminated_quote", 'Subject="abc'),
    ("quote_inside_unquoted", 'By=a"b'),
    ("equals_inside_unquoted", "By=a=b"),
    ("junk_after_quoted", 'Subject="a"x'),
    ("trailing_semicolon", "By=a;"),
    ("trailing_comma", "By=a,"),
    ("control_char", "By=a\x01b"),
    ("dangling_backslash", 'Subject="a\\'),
]


@pytest.mark.parametrize("header", [r[1] for r in MALFORMED], ids=[r[0] for r in MALFORMED])
def test_malformed_rejected(header: str) -> None:
    with pytest.raises(XfccError):
        xfcc.parse(header)


OWN = [("By", "spiffe://e.org/inner"), ("Hash", "ab"), ("URI", "spiffe://e.org/edge")]
INBOUND = "By=spiffe://e.org/edge;Hash=cd;URI=spiffe://e.org/client"
OWN_TEXT = "By=spiffe://e.org/inner;Hash=ab;URI=spiffe://e.org/edge"

MODES = [
    # mode, inbound trusted?, expected
    ("sanitize", True, None),
    ("sanitize", False, None),
    ("sanitize_set", True, OWN_TEXT),
    ("sanitize_set", False, OWN_TEXT),
    ("forward_only", True, INBOUND),
    ("forward_only", False, None),
    ("always_forward_only", True, INBOUND),
    ("always_forward_only", False, None),
    ("append_forward", True, f"{INBOUND},{OWN_TEXT}"),
    ("append_forward", False, OWN_TEXT),
]


@pytest.mark.parametrize(
    ("mode", "trusted", "expected"),
    MODES,
    ids=[f"{m}-{'trusted' if t else 'untrusted'}" for m, t, _ in MODES],
)
def test_modes(mode: str, trusted: bool, expected: str | None) -> None:
    assert xfcc.outbound(mode, INBOUND, trusted, OWN) == expected


def test_element_fields_in_envoy_order() -> None:
    e = xfcc.element_for(
        ["DNS", "URI", "Subject", "Cert", "Hash", "By", "Chain"],
        by="spiffe://e.org/p",
        leaf_sha256="ab",
        cert_pem="-----BEGIN X=\n",
        chain_pem="C;",
        subject="CN=a,O=b",
        uris=["spiffe://e.org/c"],
        dns=["a.e.org", "b.e.org"],
    )
    assert [k for k, _ in e] == ["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS", "DNS"]
    text = xfcc.format_element(e)
    assert "Cert=-----BEGIN%20X%3D%0A" in text and 'Subject="CN=a,O=b"' in text
    assert xfcc.parse(text) == [e]


@pytest.mark.parametrize(
    "value",
    ["CN=a\r\nX-Evil: 1", "CN=\x00b", "CN=caf\u00e9", "O=\x7f"],
    ids=["crlf", "nul", "non_ascii", "del"],
)
def test_values_can_never_break_the_header_line(value: str) -> None:
    text = xfcc.format_element([("Subject", value), ("DNS", value)])
    assert all(" " <= c < "\x7f" for c in text)
    assert "%0D%0A" in xfcc.format_element([("Subject", "a\r\nb")])
