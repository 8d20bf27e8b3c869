"""proxy.canonical: one row per normalisation rule, named for the attack it stops."""

from __future__ import annotations

import pytest

from proxy.canonical import (
    CanonicalRequest,
    Refusal,
    Rules,
    UpstreamRules,
    build,
    fit_upstream,
    parse_host,
    spelling,
)

H = [(b"host", b"app.internal")]
PARAMS = Rules(path_params=True)


def ok(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
       rules: Rules | None = None) -> CanonicalRequest:  # fmt: skip
    got = build(method, target, H if headers is None else headers, rules or Rules())
    assert isinstance(got, CanonicalRequest), got
    return got


def refused(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
            rules: Rules | None = None) -> Refusal:  # fmt: skip
    got = build(method, target, H if headers is None else headers, rules or Rules())
    assert isinstance(got, Refusal), got
    return got


# --- paths ---------------------------------------------------------------------------

PATHS = [
    # (id, target, rules, matched path or (status, reason), forwarded target)
    ("plain", b"/api/x?y=1", None, "/api/x", b"/api/x?y=1"),
    ("unreserved_escape_decoded", b"/%61dmin", None, "/admin", b"/admin"),
    ("dot_escape_decoded_then_refused", b"/x/%2e%2e/admin", None, (400, "bad_request_target"), b""),
    ("dot_segment", b"/public/../admin", None, (400, "bad_request_target"), b""),
    ("single_dot_segment", b"/public/./admin", None, (400, "bad_request_target"), b""),
    ("slashes_merged", b"//admin//users", None, "/admin/users", b"/admin/users"),
    ("encoded_slash", b"/a%2fb", None, (400, "bad_request_target"), b""),
    ("encoded_backslash", b"/a%5cb", None, (400, "bad_request_target"), b""),
    ("raw_backslash", b"/admin\\users", None, (400, "bad_request_target"), b""),
    ("encoded_nul", b"/a%00", None, (400, "bad_request_target"), b""),
    ("overlong_utf8_dot", b"/%c0%ae%c0%ae/admin", None, (400, "bad_request_target"), b""),
    ("overlong_utf8_slash", b"/x%c0%afadmin", None, (400, "bad_request_target"), b""),
    ("valid_utf8_kept_encoded", b"/caf%c3%a9", None, "/caf%C3%A9", b"/caf%C3%A9"),
    ("double_encoding_kept", b"/a%252fb", None, "/a%252fb", b"/a%252fb"),
    # Servers decode these before routing: one spelling, so a route on /@admin or on
    # /v1/items/7:purge catches the escaped one too.
    ("escaped_at_sign_decoded", b"/%40admin", None, "/@admin", b"/@admin"),
    (
        "escaped_colon_decoded",
        b"/v1/items/7%3apurge",
        None,
        "/v1/items/7:purge",
        b"/v1/items/7:purge",
    ),
    (
        "escaped_sub_delims_decoded",
        b"/a%21%24%26%27%28%29%2A%2C%3D",
        None,
        "/a!$&'()*,=",
        b"/a!$&'()*,=",
    ),
    ("escaped_semicolon_kept", b"/a%3bb", None, "/a%3Bb", b"/a%3Bb"),
    ("escaped_plus_decoded", b"/c%2b%2B/x", None, "/c++/x", b"/c++/x"),  # nginx: /c++/x
    ("escaped_query_and_fragment_kept", b"/a%3f%23", None, "/a%3F%23", b"/a%3F%23"),
    ("raw_braces_encoded", b"/a{b}|c", None, "/a%7Bb%7D%7Cc", b"/a%7Bb%7D%7Cc"),
    (
        "raw_quote_and_brackets_encoded",
        b'/a"<[x]>^`',
        None,
        "/a%22%3C%5Bx%5D%3E%5E%60",
        b"/a%22%3C%5Bx%5D%3E%5E%60",
    ),
    ("broken_escape", b"/a%2", None, (400, "bad_request_target"), b""),
    (
        "tomcat_dotdot_semicolon",
        b"/public/..;/admin/users",
        None,
        (400, "path_parameters_refused"),
        b"",
    ),
    (
        "encoded_dotdot_semicolon",
        b"/x/%2e%2e;/admin/users",
        None,
        (400, "path_parameters_refused"),
        b"",
    ),
    ("jsessionid", b"/admin;jsessionid=x/users", None, (400, "path_parameters_refused"), b""),
    ("semicolon_suffix", b"/secret;x", None, (400, "path_parameters_refused"), b""),
    (
        "params_kept_match_without",
        b"/admin;jsessionid=x/users",
        PARAMS,
        "/admin/users",
        b"/admin;jsessionid=x/users",
    ),
    (
        "params_dotdot_refused",
        b"/public/..;/admin",
        PARAMS,
        (400, "dot_segment_with_parameters"),
        b"",
    ),
    ("params_dot_refused", b"/public/.;x/admin", PARAMS, (400, "dot_segment_with_parameters"), b""),
    ("params_empty_name_refused", b"/;x/admin", PARAMS, (400, "dot_segment_with_parameters"), b""),
    (
        "params_encoded_dotdot_refused",
        b"/x/%2e%2e;/admin",
        PARAMS,
        (400, "dot_segment_with_parameters"),
        b"",
    ),
    ("fragment", b"/a#b", None, (400, "bad_request_target"), b""),
    ("not_absolute", b"admin", None, (400, "bad_request_target"), b""),
    ("asterisk_for_get", b"*", None, (400, "bad_request_target"), b""),
    ("absolute_form", b"http://app.internal/a?b", None, "/a", b"/a?b"),
    (
        "absolute_form_other_host",
        b"http://admin.internal/a",
        None,
        (400, "host_does_not_match_target"),
        b"",
    ),
    ("absolute_form_userinfo", b"http://u@app.internal/a", None, (400, "bad_request_target"), b""),
    ("absolute_form_trailing_dot", b"http://APP.internal./a", None, "/a", b"/a"),
]


@pytest.mark.parametrize(("target", "rules", "want", "forwarded"),
                         [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])  # fmt: skip
def test_path(target: bytes, rules: Rules | None, want: object, forwarded: bytes) -> None:
    if isinstance(want, tuple):
        r = refused(b"GET", target, rules=rules)
        assert (r.status, r.reason) == want
        return
    got = ok(b"GET", target, rules=rules)
    assert got.path == want
    assert got.target == forwarded
    # Canonical is a fixed point: the forwarded request canonicalises to itself.
    again = ok(b"GET", got.target, rules=rules)
    assert (again.path, again.target) == (got.path, got.target)


def test_path_parameters_need_an_upstream_that_keeps_them() -> None:
    req = ok(b"GET", b"/admin;v=1/users", rules=PARAMS)
    assert req.path_params
    assert fit_upstream(req, UpstreamRules(path_params=True)) is None
    refusal = fit_upstream(req, UpstreamRules())
    assert refusal is not None and refusal.reason == "path_parameters_refused"


# --- methods -------------------------------------------------------------------------

METHODS = [
    ("upper", b"POST", None),
    ("extension_method", b"M-SEARCH", None),
    ("lower_case_post_dispatched_as_post_by_django", b"post", (400, "method_not_uppercase")),
    ("mixed_case", b"Get", (400, "method_not_uppercase")),
    ("connect", b"CONNECT", (405, "connect_not_supported")),
]


@pytest.mark.parametrize(("method", "want"), [m[1:] for m in METHODS], ids=[m[0] for m in METHODS])
def test_method(method: bytes, want: tuple[int, str] | None) -> None:
    if want is None:
        assert ok(method, b"/a").method == method.decode()
    else:
        r = refused(method, b"/a")
        assert (r.status, r.reason) == want


# --- hosts ---------------------------------------------------------------------------

HOSTS = [
    ("plain", b"app.internal", ("app.internal", None)),
    ("port_kept_apart", b"app.internal:8443", ("app.internal", 8443)),
    ("nginx_trailing_dot", b"admin.internal.", ("admin.internal", None)),
    ("case_dot_and_port", b"ADMIN.internal.:8443", ("admin.internal", 8443)),
    ("ipv4", b"127.0.0.1:80", ("127.0.0.1", 80)),
    ("ipv6", b"[::1]:8443", ("[::1]", 8443)),
    ("ipv6_no_port", b"[::1]", ("[::1]", None)),
    ("underscore_label", b"my_host.internal", ("my_host.internal", None)),
    ("empty_port", b"app.internal:", ("app.internal", None)),
    ("two_trailing_dots", b"admin.internal..", (400, "malformed_host")),
    ("empty_label", b"admin..internal", (400, "malformed_host")),
    ("leading_dot", b".admin.internal", (400, "malformed_host")),
    ("second_colon", b"admin.internal:80:80", (400, "malformed_host")),
    ("non_ascii", "adm\u0131n.internal".encode(), (400, "malformed_host")),
    ("percent", b"admin%2einternal", (400, "malformed_host")),
    ("userinfo", b"evil@admin.internal", (400, "malformed_host")),
    ("port_too_big", b"app.internal:65536", (400, "malformed_host")),
    ("port_not_digits", b"app.internal:8x", (400, "malformed_host")),
    ("bad_ipv6", b"[zz::1]", (400, "malformed_host")),
    ("junk_after_ipv6", b"[::1]x", (400, "malformed_host")),
]


@pytest.mark.parametrize(("raw", "want"), [h[1:] for h in HOSTS], ids=[h[0] for h in HOSTS])
def test_host(raw: bytes, want: tuple[object, object]) -> None:
    if isinstance(want[0], int):
        r = refused(b"GET", b"/", [(b"host", raw)])
        assert (r.status, r.reason) == want
        return
    got = ok(b"GET", b"/", [(b"host", raw)])
    assert (got.host, got.port) == want
    # The upstream gets the canonical Host, first.
    assert got.headers[0] == (b"host", got.authority.encode())
    assert parse_host(got.authority.encode()) == want


def test_duplicate_host_is_refused() -> None:
    r = refused(b"GET", b"/", [(b"host", b"a.internal"), (b"host", b"admin.internal")])
    assert r.reason == "duplicate_host"


def test_http10_without_host_has_an_empty_host() -> None:
    got = build(b"GET", b"/", [], Rules(), b"1.0")
    assert isinstance(got, CanonicalRequest) and got.host == "" and got.headers == ()


# --- headers -------------------------------------------------------------------------

OWNED = Rules(owned=frozenset({spelling("X-Client-Spiffe-Id")}))
HEADERS = [
    # (id, header name, rules, kept?, reason when refused)
    ("wsgi_underscore_spiffe_id", b"x_client_spiffe_id", OWNED, False),
    ("wsgi_underscore_xfcc", b"x_forwarded_client_cert", OWNED, False),
    ("wsgi_underscore_client_cert", b"client_cert", OWNED, False),
    ("wsgi_underscore_xff", b"x_forwarded_for", OWNED, False),
    ("underscore_other_dropped", b"x_custom", OWNED, False),
    ("underscore_passed_when_asked", b"x_custom", Rules(underscores="pass"), True),
    (
        "owned_still_removed_when_passing",
        b"x_client_spiffe_id",
        Rules(underscores="pass", owned=OWNED.owned),
        False,
    ),
    ("owned_dash_spelling", b"x-client-spiffe-id", OWNED, False),
    # PHP reads '.' in a header name as '_' (Caddy + php-fpm pass such names through).
    ("php_dotted_spiffe_id", b"x.client.spiffe.id", OWNED, False),
    ("php_dotted_xfcc", b"X.Forwarded.Client.Cert", OWNED, False),
    ("php_dotted_method_override", b"x.http-method.override", OWNED, False),
    ("dotted_other_kept", b"x.custom", OWNED, True),
    ("client_cert_chain", b"client-cert-chain", OWNED, False),
    ("method_override", b"x-http-method-override", OWNED, False),
    ("x_http_method", b"x-http-method", OWNED, False),
    ("x_method_override", b"x-method-override", OWNED, False),
    ("iis_original_url", b"x-original-url", OWNED, False),
    ("iis_rewrite_url", b"x-rewrite-url", OWNED, False),
    ("original_method", b"x-original-method", OWNED, False),
    ("forwarded", b"forwarded", OWNED, False),
    ("x_forwarded_host", b"x-forwarded-host", OWNED, False),
    ("x_forwarded_port", b"x-forwarded-port", OWNED, False),
    ("x_forwarded_prefix", b"x-forwarded-prefix", OWNED, False),
    ("x_real_ip", b"x-real-ip", OWNED, False),
    ("true_client_ip", b"true-client-ip", OWNED, False),
    ("expect_answered_by_proxy", b"expect", OWNED, False),
    ("override_list_configurable", b"x-real-ip", Rules(remove=frozenset()), True),
    ("ordinary_header_kept", b"accept", OWNED, True),
]


@pytest.mark.parametrize(("name", "rules", "kept"), [h[1:] for h in HEADERS], ids=[h[0] for h in HEADERS])  # fmt: skip
def test_header(name: bytes, rules: Rules, kept: bool) -> None:
    got = ok(b"GET", b"/", [*H, (name, b"spiffe://example.org/forged")], rules)
    assert ((name, b"spiffe://example.org/forged") in got.headers) is kept


def test_underscore_header_refused_when_configured() -> None:
    r = refused(b"GET", b"/", [*H, (b"x_client_spiffe_id", b"x")], Rules(underscores="refuse"))
    assert (r.status, r.reason) == (400, "underscore_in_header_name")


def test_underscore_drops_are_reported() -> None:
    got = ok(b"GET", b"/", [*H, (b"x_a", b"1"), (b"x_b", b"2")])
    assert got.dropped == (b"x_a", b"x_b")


def test_inbound_xfcc_and_xff_are_set_aside_not_forwarded() -> None:
    got = ok(b"GET", b"/", [*H, (b"x-forwarded-client-cert", b"By=a"), (b"x-forwarded-client-cert", b"By=b"),
                           (b"x-forwarded-for", b"1.2.3.4")])  # fmt: skip
    assert got.xfcc == "By=a,By=b" and got.forwarded_for == b"1.2.3.4"
    assert not any(n.startswith(b"x-forwarded") for n, _ in got.headers)


# --- framing and limits --------------------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused() -> None:
    r = refused(b"POST", b"/", [*H, (b"content-length", b"3"), (b"transfer-encoding", b"chunked")])
    assert r.reason == "content_length_with_transfer_encoding"


def test_declared_body_over_the_limit_is_413() -> None:
    r = refused(b"POST", b"/", [*H, (b"content-length", b"11")], Rules(max_body_bytes=10))
    assert (r.status, r.reason) == (413, "request_body_too_large")


def test_head_over_the_limit_is_431() -> None:
    r = refused(b"GET", b"/", [*H, (b"x-big", b"a" * 200)], Rules(max_header_bytes=100))
    assert (r.status, r.reason) == (431, "request_head_too_large")


@pytest.mark.parametrize(
    ("headers", "has_body"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"5")], True),
        ([(b"transfer-encoding", b"chunked")], True),
    ],
    ids=["none", "cl0", "cl5", "chunked"],
)
def test_has_body(headers: list[tuple[bytes, bytes]], has_body: bool) -> None:
    assert ok(b"POST", b"/", [*H, *headers]).has_body is has_body


def test_http_version_other_than_1x_is_505() -> None:
    got = build(b"GET", b"/", H, Rules(), b"2.0")
    assert isinstance(got, Refusal) and got.status == 505


def test_memo_keeps_no_long_input_and_no_refusal() -> None:
    """parse_host/parse_target remember results by their whole input, bounded: a client
    sending huge Hosts or targets (even one the policy denies) cannot make the memo hold
    them, and a refused input is never remembered (it raises every time)."""
    from proxy import canonical as c

    long_host = b"a" * 60_000 + b".example"
    assert c.parse_host(long_host) == (long_host.decode(), None)
    assert long_host not in c._hosts
    long_target = b"/" + b"x" * 10_000
    assert c.parse_target(b"GET", long_target)[0] == long_target.decode()
    assert all(len(k[1]) <= c._MEMO_TARGET for k in c._targets)
    for _ in range(2):
        with pytest.raises(c.Refused):
            c.parse_host(b"a..b")
    assert b"a..b" not in c._hosts
    assert c.parse_host(b"Example.org.:8443") == ("example.org", 8443)
    assert c.parse_host(b"Example.org.:8443") == c._parse_host(b"Example.org.:8443")


def test_the_judged_request_cannot_be_changed_after_the_verdict() -> None:
    # The policy judges the CanonicalRequest and the upstream head is serialised from
    # the same object: nothing may rewrite it in between.
    got = build(b"GET", b"/orders/1", [(b"host", b"app")], Rules())
    assert isinstance(got, CanonicalRequest)
    with pytest.raises(AttributeError):
        got.path = "/admin"  # type: ignore[misc]
    with pytest.raises(TypeError):
        got[3] = "/admin"  # type: ignore[index]
    assert got.path == "/orders/1" and got.authority == "app"


@pytest.mark.parametrize(
    ("target", "rules", "spoofed"),
    [
        # Laravel (by default), Symfony (when enabled) and Express's method-override run
        # POST /x?_method=DELETE as DELETE: not the method the policy judged.
        (b"/orders/7?_method=DELETE", Rules(), "_method"),
        (b"/orders/7?a=1&_method=PUT", Rules(), "_method"),
        (b"/orders/7?%5Fmethod=DELETE", Rules(), "%5Fmethod"),  # decoded by every framework
        (b"/orders/7?.method=DELETE", Rules(), ".method"),  # PHP reads '.' as '_'
        (b"/orders/7?+method=DELETE", Rules(), None),  # PHP skips the space: $_GET["method"]
        (b"/orders/7?[method=DELETE", Rules(), "[method"),
        # PHP skips leading spaces and cuts at a NUL (php_register_variable_ex)
        (b"/orders/7?+_method=DELETE", Rules(), "+_method"),
        (b"/orders/7?%20.method=DELETE", Rules(), "%20.method"),
        (b"/orders/7?_method%00x=DELETE", Rules(), "_method%00x"),
        (b"/orders/7?_method[x]=DELETE", Rules(), "_method[x]"),  # an array named _method
        (b"/orders/7?_verb=DELETE", Rules(override_params=frozenset({"_verb"})), "_verb"),
        (b"/orders/7?x_method=1&method=2&_METHOD=3", Rules(), None),  # other names pass
        (b"/orders/7?q=%20", Rules(), None),
        (b"/orders/7?_method=DELETE", Rules(override_params=frozenset()), None),  # turned off
    ],
    ids=["plain", "second", "escaped", "php_dot", "php_space", "php_bracket",
         "php_leading_space", "php_leading_space_dot", "php_nul", "php_array", "configured",
         "other_names", "escapes_only", "turned_off"],
)  # fmt: skip
def test_method_override_parameter_is_refused(
    target: bytes, rules: Rules, spoofed: str | None
) -> None:
    if spoofed is None:
        assert ok(b"POST", target, rules=rules).target == target
        return
    r = refused(b"POST", target, rules=rules)
    assert (r.status, r.reason, r.detail) == (400, "method_override_refused", spoofed)
