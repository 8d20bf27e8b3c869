"""The canonical request over real mTLS: what the upstream receives is what the policy
judged, and ``spiffe-pep explain``/``test`` give the live proxy's verdict."""

from __future__ import annotations

import textwrap
from pathlib import Path

import trio

from proxy import app
from proxy.policy import tools
from proxy.spiffe_id import SpiffeId
from tests.conftest import CLIENT_ID, DENIED_ID, PARTNER_ID, Pki
from tests.integration.harness import (
    ROOT,
    raw_exchange,
    start_recording,
    statuses,
    wait_until,
)

POLICY = textwrap.dedent("""\
    routes:
      - name: admin-host
        match: {hosts: [admin.internal]}
        upstream: app
        allow: []
      - name: admin
        match: {path_prefix: /admin}
        upstream: app
        allow: []
      - name: secret
        match: {path: /secret}
        upstream: app
        allow: []
      - name: invoices-write
        match: {path: /api/invoices, methods: [POST]}
        upstream: app
        allow: []
      - name: prod-apps
        match: {path_prefix: /}
        upstream: app
        allow: ["spiffe://example.org/ns/prod/*"]
""")

FORGED = "spiffe://example.org/ns/prod/sa/forged"


def request(method: bytes, target: bytes, host: bytes = b"localhost", *extra: bytes) -> bytes:
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\nConnection: close\r\n"
        + b"".join(extra)
        + b"\r\n"
    )


async def test_forged_identity_in_any_spelling_never_reaches_the_upstream(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=POLICY)
    forged = [
        b"X_Client_Spiffe_Id: " + FORGED.encode() + b"\r\n",
        b"X_Forwarded_Client_Cert: By=spiffe://x;URI=" + FORGED.encode() + b"\r\n",
        b"Client_Cert: :AAAA:\r\n",
        b"X_Forwarded_For: 10.9.9.9\r\n",
        b"X-Client-Spiffe-Id: " + FORGED.encode() + b"\r\n",
        b"X-Forwarded-Client-Cert: URI=" + FORGED.encode() + b"\r\n",
        b"X-HTTP-Method-Override: POST\r\n",
        b"X-Original-URL: /admin/users\r\n",
        b"X-Rewrite-URL: /admin/users\r\n",
        b"X-Forwarded-Host: admin.internal\r\n",
        b"Forwarded: host=admin.internal;for=10.9.9.9\r\n",
        b"X-Real-IP: 10.9.9.9\r\n",
        b"True-Client-IP: 10.9.9.9\r\n",
        b"X-Kept: yes\r\n",
    ]
    out, _ = await raw_exchange(proxy, request(b"GET", b"/api/invoices", b"localhost", *forged))
    assert statuses(out) == [200]
    (seen,) = upstream.requests
    names = [n for n, _ in seen.headers]
    assert not any(b"_" in n for n in names), names
    for gone in (b"x-http-method-override", b"x-original-url", b"x-rewrite-url",
                 b"x-forwarded-host", b"forwarded", b"x-real-ip", b"true-client-ip"):  # fmt: skip
        assert gone not in names
    values = dict(seen.headers)
    assert [v for n, v in seen.headers if n == b"x-client-spiffe-id"] == [CLIENT_ID.encode()]
    assert [n for n in names if n == b"x-forwarded-client-cert"] == [b"x-forwarded-client-cert"]
    assert FORGED.encode() not in values[b"x-forwarded-client-cert"]
    assert values[b"x-forwarded-for"] == b"127.0.0.1"
    assert values[b"x-kept"] == b"yes"
    await wait_until(lambda: proxy.decisions())
    (line,) = proxy.decisions()
    assert (
        line["dropped_headers"]
        == "x_client_spiffe_id,x_forwarded_client_cert,client_cert,x_forwarded_for"
    )
    assert (
        'spiffe_pep_request_headers_dropped_total{rule="underscore"} 4.0' in await proxy.metrics()
    )


async def test_upstream_gets_the_canonical_host_and_target(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=POLICY)
    out, _ = await raw_exchange(proxy, request(b"GET", b"//%61pi//x?q=%61", b"LOCALHOST.:8443"))
    assert statuses(out) == [200]
    (seen,) = upstream.requests
    assert seen.target == b"/api/x?q=%61"  # the query is the app's business, untouched
    assert [v for n, v in seen.headers if n == b"host"] == [b"localhost:8443"]


async def test_nginx_trailing_dot_host_is_judged_as_the_admin_vhost(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=POLICY)
    for host in (b"admin.internal.", b"ADMIN.internal.:8443", b"Admin.Internal"):
        out, _ = await raw_exchange(proxy, request(b"GET", b"/public", host))
        assert statuses(out) == [403], host
    assert upstream.requests == []
    await wait_until(lambda: len(proxy.decisions()) == 3)
    assert {d["route"] for d in proxy.decisions()} == {"admin-host"}


async def test_exact_route_catches_a_trailing_slash(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=POLICY)
    out, _ = await raw_exchange(proxy, request(b"GET", b"/secret/"))
    assert statuses(out) == [403]
    assert upstream.requests == []


async def test_path_params_kept_for_an_upstream_that_asks(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(
        nursery, tmp_path, pki, policy=POLICY, app_options="path_params: keep, "
    )
    out, _ = await raw_exchange(proxy, request(b"GET", b"/shop;jsessionid=1/cart"))
    assert statuses(out) == [200]
    assert [r.target for r in upstream.requests] == [b"/shop;jsessionid=1/cart"]
    for target in (b"/admin;x=1/users", b"/public/..;/admin/users"):
        out, _ = await raw_exchange(proxy, request(b"GET", target))
        assert statuses(out) == [403 if target.startswith(b"/admin") else 400], target
    assert len(upstream.requests) == 1


async def test_case_insensitive_upstream_matches_folded_paths(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(
        nursery, tmp_path, pki, policy=POLICY, app_options="case_insensitive_paths: true, "
    )
    for target in (b"/ADMIN/users", b"/Secret", b"/admin"):
        out, _ = await raw_exchange(proxy, request(b"GET", target))
        assert statuses(out) == [403], target
    assert upstream.requests == []


async def test_http10_request_without_host_is_forwarded_with_one(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=POLICY)
    out, _ = await raw_exchange(proxy, b"GET /orders HTTP/1.0\r\n\r\n")
    assert statuses(out) == [200]
    (seen,) = upstream.requests
    assert [v for n, v in seen.headers if n == b"host"] == [f"127.0.0.1:{upstream.port}".encode()]


async def test_underscore_headers_refused_when_configured(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy, upstream = await start_recording(
        nursery, tmp_path, pki, policy=POLICY, extra="http: {underscores_in_headers: refuse}\n"
    )
    out, _ = await raw_exchange(proxy, request(b"GET", b"/x", b"localhost", b"X_A: 1\r\n"))
    assert statuses(out) == [400] and upstream.requests == []
    await wait_until(lambda: proxy.decisions())
    assert proxy.decisions()[0]["reason"] == "underscore_in_header_name"


# --- the tools agree with the live proxy ---------------------------------------------

CORPUS = [
    (b"GET", b"/%61dmin"),
    (b"GET", b"//admin"),
    (b"GET", b"/admin?x=1"),
    (b"GET", b"/x/../admin"),
    (b"GET", b"/public/..;/admin/users"),
    (b"GET", b"/admin;jsessionid=x/users"),
    (b"GET", b"/secret/"),
    (b"GET", b"/secret;x"),
    (b"GET", b"/secret"),
    (b"GET", b"/hello"),
    (b"GET", b"/healthz"),
    (b"POST", b"/payments/1"),
    (b"post", b"/api/invoices"),
    (b"POST", b"/api/invoices"),
    (b"GET", b"/a%2fb"),
    (b"GET", b"/%c0%ae%c0%ae/admin"),
]
HOSTS = [b"localhost", b"admin.internal.", b"ADMIN.internal.:8443", b"localhost..", b"a:1:2"]
CERTS = {CLIENT_ID: "client", DENIED_ID: "denied", PARTNER_ID: "partner"}


def _shipped(policy_text: str) -> str:
    """A shipped policy pointed at the test's upstream."""
    return policy_text.replace("upstream: demo", "upstream: app")


async def _agree(proxy_policy: str, nursery: trio.Nursery, tmp: Path, pki: Pki) -> int:
    proxy, _ = await start_recording(nursery, tmp, pki, policy=proxy_policy)
    config = app.read_config(tmp / "spiffe-pep.yaml")
    policy = app.read_policy(config)
    cases = [(i, m, h, t) for i in CERTS for m, t in CORPUS for h in HOSTS[:3]]
    cases += [(i, b"GET", h, b"/hello") for i in CERTS for h in HOSTS[3:]]
    cases += [
        (t.spiffe_id, t.method.encode(), t.host.encode(), t.path.encode())
        for t in policy.tests
        if t.spiffe_id in CERTS and t.audience is None
    ]
    for n, (ident, method, host, target) in enumerate(cases):
        await raw_exchange(proxy, request(method, target, host), cert=CERTS[ident])
        await wait_until(lambda n=n: len(proxy.decisions()) > n)  # type: ignore[misc]
        live = proxy.decisions()[n]
        offline = tools.outcome(
            tools.decide(
                policy,
                ident,
                method.decode(),
                host.decode(),
                target.decode(),
                rules=config.canonical_rules(),
                upstreams=config.upstream_rules(),
            )
        )
        live_decision = "allow" if live["decision"] == "allow" else "deny"
        assert (live_decision, live["route"], live["reason"]) == offline, (
            ident,
            method,
            host,
            target,
        )
        assert SpiffeId.parse(ident)
    return len(cases)


async def test_explain_agrees_with_the_live_proxy_on_a_corpus(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    assert await _agree(POLICY, nursery, tmp_path, pki) > 100


async def test_shipped_policy_tests_agree_with_the_live_proxy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    text = _shipped((ROOT / "config" / "policy.yaml").read_text())
    assert await _agree(text, nursery, tmp_path, pki) > 100


async def test_escaped_spellings_of_a_guarded_path_are_judged_by_its_route(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """Flask, Django, nginx and Tomcat decode ``%40`` and ``%3A`` before routing, and
    read ``{`` and ``%7B`` alike: ``/%40admin`` is ``/@admin`` to them, so the route of
    ``/@admin`` must judge it, not the catch-all after it. Each spelling is one canonical
    path, and the upstream gets that one."""
    policy = textwrap.dedent("""\
        routes:
          - {name: at-admin, match: {path_prefix: /@admin}, upstream: app, allow: []}
          - {name: purge, match: {path: '/v1/items/7:purge'}, upstream: app, allow: []}
          - {name: braces, match: {path: /t/%7Bid%7D}, upstream: app, allow: []}
          - {name: rest, match: {path_prefix: /}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"]}
    """)
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=policy)
    for target in (b"/%40admin/users", b"/v1/items/%37%3apurge", b"/t/{id}", b"/t/%7bid%7d"):
        out, _ = await raw_exchange(proxy, request(b"GET", target, b"localhost"))
        assert statuses(out) == [403], target
    out, _ = await raw_exchange(proxy, request(b"GET", b"/v1/items/7%3Aget", b"localhost"))
    assert statuses(out) == [200]
    assert [r.target for r in upstream.requests] == [b"/v1/items/7:get"]
    routes = [d["route"] for d in proxy.decisions()]
    assert routes == ["at-admin", "purge", "braces", "braces", "rest"]


async def test_method_override_parameter_never_reaches_the_app(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A caller allowed to POST but not to DELETE: Laravel would run
    ``POST /orders/7?_method=DELETE`` as DELETE. Refused before the policy, logged with
    its reason; ``http: {method_override_params: [_verb]}`` names other parameters."""
    policy = textwrap.dedent("""\
        routes:
          - {name: delete, match: {methods: [DELETE]}, upstream: app, allow: []}
          - {name: rest, match: {path_prefix: /}, upstream: app, allow: ["spiffe://example.org/ns/prod/*"]}
    """)
    extra = "http: {method_override_params: [_method, _verb]}\n"
    proxy, upstream = await start_recording(nursery, tmp_path, pki, policy=policy, extra=extra)
    for target in (b"/orders/7?_method=DELETE", b"/orders/7?x=1&.method=DELETE", b"/o?_verb=PUT"):
        out, _ = await raw_exchange(proxy, request(b"POST", target, b"localhost"))
        assert statuses(out) == [400], target
    out, _ = await raw_exchange(proxy, request(b"POST", b"/orders/7?method=x", b"localhost"))
    assert statuses(out) == [200]
    assert [r.target for r in upstream.requests] == [b"/orders/7?method=x"]
    reasons = [d["reason"] for d in proxy.decisions()]
    assert reasons == ["method_override_refused"] * 3 + ["allowed"]
