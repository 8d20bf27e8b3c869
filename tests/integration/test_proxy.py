"""End to end: real TLS on 127.0.0.1, the real demo upstream, curl and raw TLS clients."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import CLIENT_ID, PARTNER_ID, SERVER_ID, Pki
from tests.integration.harness import (
    Proxy,
    curl,
    raw,
    raw_exchange,
    start,
    statuses,
    tls_client,
    upstream_headers,
)


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki, timeouts="timeouts: {upstream_response: 1s}\n")


async def test_allowed_request_reaches_upstream_with_identity(proxy: Proxy) -> None:
    r = await curl(proxy, "/orders/7?x=1", "-H", "X-Request-Id: abc-123")
    assert r.status == 200, r.stderr
    seen = r.json()
    assert seen["target"] == "/orders/7?x=1"
    h = upstream_headers(r)
    assert h["host"] == [f"localhost:{proxy.port}"]  # Host is preserved
    assert h["x-client-spiffe-id"] == [CLIENT_ID]
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-request-id"] == ["abc-123"]
    leaf_sha = proxy.decisions()[-1]["leaf_sha256"]
    assert h["x-forwarded-client-cert"] == [f"By={SERVER_ID};Hash={leaf_sha};URI={CLIENT_ID}"]

    (rec,) = proxy.decisions()
    assert rec["decision"] == "allow" and rec["reason"] == "allowed"
    assert rec["spiffe_id"] == CLIENT_ID and rec["route"] == "prod"
    assert rec["rule"] == "allow[0] spiffe://example.org/ns/prod/*"
    assert rec["policy_sha256"] == proxy.rt.policy.sha256
    assert rec["status"] == rec["upstream_status"] == 200
    assert rec["request_id"] == "abc-123" and rec["method"] == "GET"
    assert rec["host"] == "localhost" and rec["path"] == "/orders/7"
    assert rec["bytes_out"] == len(r.body) and rec["leaf_not_after"].endswith("Z")
    for key in ("time", "peer_addr", "bytes_in", "duration_ms"):
        assert key in rec


async def test_denied_request_gets_403_without_policy_details(proxy: Proxy) -> None:
    r = await curl(proxy, "/orders", cert="denied")
    assert r.status == 403
    body = r.json()
    assert set(body) == {"error", "reason", "request_id"}
    assert body["error"] == "forbidden"
    assert "prod" not in r.body.decode() and "spiffe" not in r.body.decode()
    (rec,) = proxy.decisions()
    assert rec["decision"] == "deny" and rec["reason"] == "identity_not_allowed"
    assert rec["route"] == "prod" and rec["request_id"] == body["request_id"]


async def test_no_matching_route_is_denied(proxy: Proxy) -> None:
    r = await curl(proxy, "/payments/1")  # partner-only route: first match decides
    assert r.status == 403
    assert proxy.decisions()[-1]["reason"] == "identity_not_allowed"
    r = await curl(proxy, "/admin/users")
    assert r.status == 403


async def test_federated_workload_allowed_by_its_own_bundle(proxy: Proxy) -> None:
    r = await curl(proxy, "/payments/1", cert="partner")
    assert r.status == 200, r.stderr
    assert upstream_headers(r)["x-client-spiffe-id"] == [PARTNER_ID]
    r = await curl(proxy, "/orders", cert="partner")
    assert r.status == 403


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        (None, "no_client_certificate"),
        ("untrusted", "chain_not_verified"),
        ("confused", "chain_not_verified"),  # partner.org's CA signing an example.org SVID
        ("no_uri", "no_uri_san"),
        ("expired", "certificate_expired"),
        ("leaf_ca", "leaf_is_ca"),
    ],
    ids=[
        "no_client_cert",
        "untrusted_ca",
        "federation_confusion",
        "no_uri_san",
        "expired",
        "leaf_is_ca",
    ],
)
async def test_bad_client_certificates_are_refused_and_logged(
    proxy: Proxy, cert: str | None, reason: str
) -> None:
    r = await curl(proxy, "/orders", cert=cert)
    assert r.returncode != 0 and r.status == 0, (r.status, r.body)
    assert proxy.decisions() == []  # no HTTP request was ever read
    (event,) = [e for e in proxy.events() if e["event"] == "tls_handshake_failed"]
    assert event["reason"] == reason
    assert event["peer_addr"].startswith("127.0.0.1:")
    if cert is not None:
        assert len(event["leaf_sha256"]) == 64


async def test_spoofed_identity_headers_are_stripped(proxy: Proxy) -> None:
    r = await curl(
        proxy,
        "/orders",
        "-H",
        "X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://example.org/ns/ops/sa/admin",
        "-H",
        "X-Client-Spiffe-Id: spiffe://example.org/ns/ops/sa/admin",
        "-H",
        "X-Forwarded-For: 10.9.9.9",
        "-H",
        "x-forwarded-client-cert: URI=spiffe://example.org/sneaky",
    )
    assert r.status == 200
    h = upstream_headers(r)
    assert len(h["x-forwarded-client-cert"]) == 1
    assert "admin" not in h["x-forwarded-client-cert"][0]
    assert "sneaky" not in r.body.decode()
    assert h["x-client-spiffe-id"] == [CLIENT_ID]
    assert h["x-forwarded-for"] == ["127.0.0.1"]


async def test_hop_by_hop_headers_removed(proxy: Proxy) -> None:
    r = await curl(
        proxy,
        "/orders",
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "Upgrade: websocket",
        "-H",
        "X-Kept: yes",
    )
    h = upstream_headers(r)
    for name in ("connection", "x-secret", "keep-alive", "te", "proxy-connection", "upgrade"):
        assert name not in h, name
    assert h["x-kept"] == ["yes"]


async def test_invalid_request_id_replaced(proxy: Proxy) -> None:
    r = await curl(proxy, "/orders", "-H", "X-Request-Id: has spaces{}")
    rid = upstream_headers(r)["x-request-id"][0]
    assert rid != "has spaces{}" and len(rid) == 32


async def test_keep_alive_with_client_and_upstream_pool(proxy: Proxy) -> None:
    async with httpx.AsyncClient(verify=tls_client(proxy.pki)) as client:
        for path in ("/a", "/b", "/c"):
            response = await client.get(proxy.url + path)
            assert response.status_code == 200
            assert response.json()["target"] == path
    decisions = proxy.decisions()
    assert [d["status"] for d in decisions] == [200, 200, 200]
    assert len({d["peer_addr"] for d in decisions}) == 1  # one client connection
    assert len(proxy.rt.pools["app"]._idle) == 1  # one pooled upstream connection, reused


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_tls_versions(proxy: Proxy, tls: str) -> None:
    r = await curl(proxy, "/orders", "--tlsv" + tls, "--tls-max", tls, "-v")
    assert r.status == 200
    assert f"TLSv{tls}" in r.stderr


async def test_upstream_unreachable_is_502(proxy: Proxy) -> None:
    r = await curl(proxy, "/dead/x")
    assert r.status == 502 and r.json()["error"] == "bad_gateway"
    assert proxy.decisions()[-1]["reason"] == "upstream_unreachable"
    assert (await curl(proxy, "/orders")).status == 200  # the proxy is fine


async def test_upstream_timeout_is_504(proxy: Proxy) -> None:
    r = await curl(proxy, "/sleep/3")
    assert r.status == 504 and r.json()["error"] == "gateway_timeout"
    assert proxy.decisions()[-1]["reason"] == "upstream_timeout"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/%61dmin/users", 403),  # decoded to /admin: the admin route blocks it
        ("//admin", 403),  # merged to /admin
        ("/orders/../admin", 400),  # dot segments refused
        ("/orders/%2e%2e/admin", 400),
        ("/admin%2Fusers", 400),  # encoded slash refused
        ("/x%zz", 400),
    ],
    ids=[
        "encoded_letters",
        "double_slash",
        "dot_segment",
        "encoded_dot_segment",
        "encoded_slash",
        "bad_escape",
    ],
)
async def test_path_tricks_cannot_bypass_routes(proxy: Proxy, path: str, status: int) -> None:
    r = await curl(proxy, path, "--path-as-is")
    assert r.status == status, r.body


async def test_path_forwarded_normalized(proxy: Proxy) -> None:
    r = await curl(proxy, "/%6Frders//7", "--path-as-is")
    assert r.json()["target"] == "/orders/7"


async def test_bad_connections_do_not_disturb_others(proxy: Proxy) -> None:
    # A plain-TCP client speaking garbage and one stalled mid-handshake stay open
    # while real requests go through.
    s1 = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await s1.send_all(b"this is not TLS\r\n\r\n")
    s2 = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await s2.send_all(b"\x16\x03\x01\x00")  # a partial ClientHello, then silence
    results = []
    async with trio.open_nursery() as n:

        async def one() -> None:
            results.append((await curl(proxy, "/orders")).status)

        for _ in range(5):
            n.start_soon(one)
    assert results == [200] * 5
    await s1.aclose()
    await s2.aclose()


async def test_denied_request_with_body_closes_without_reading_it(proxy: Proxy) -> None:
    r = await curl(proxy, "/orders", "--data-binary", "x" * 1000, cert="denied")
    assert r.status == 403
    assert proxy.decisions()[-1]["bytes_in"] == 0


async def test_request_body_streams_to_upstream(proxy: Proxy) -> None:
    payload = b"0123456789" * 100_000
    r = await curl(proxy, "/upload", "--data-binary", "@-", "-H", "Transfer-Encoding: chunked")
    del r
    import hashlib

    for args in (
        ["--data-binary", f"@{proxy.dir}/payload"],
        ["--data-binary", f"@{proxy.dir}/payload", "-H", "Transfer-Encoding: chunked"],
    ):
        (proxy.dir / "payload").write_bytes(payload)
        r = await curl(proxy, "/upload", *args)
        assert r.status == 200
        assert r.json()["body_bytes"] == len(payload)
        assert r.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert proxy.decisions()[-1]["bytes_in"] == len(payload)


async def test_certificate_expiring_mid_connection_is_denied_from_then_on(
    proxy: Proxy, pki: Pki
) -> None:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    pki.svid(
        "short",
        [CLIENT_ID],
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(seconds=2),
    )
    first = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    out = await raw(proxy, first, second, cert="short", pause=3.2)
    assert statuses(out) == [200, 403]
    assert [d["reason"] for d in proxy.decisions()] == ["allowed", "certificate_expired"]


async def test_http10_keep_alive_for_ab(proxy: Proxy) -> None:
    # ab -k speaks HTTP/1.0 with "Connection: Keep-Alive": three requests, one connection.
    req = b"GET /orders HTTP/1.0\r\nHost: localhost\r\nConnection: Keep-Alive\r\n\r\n"
    last = b"GET /orders HTTP/1.0\r\nHost: localhost\r\n\r\n"
    out = await raw(proxy, req + req, last)
    assert statuses(out) == [200, 200, 200]
    assert out.count(b"Connection: keep-alive") == 2
    assert len({d["peer_addr"] for d in proxy.decisions()}) == 1
    # A denied HTTP/1.0 keep-alive request keeps the connection too (its 403 has a length).
    out = await raw(proxy, req, last, cert="denied")
    assert statuses(out) == [403, 403]
    # An allowed one with a body, then the next request on the same connection.
    post = (
        b"POST /x HTTP/1.0\r\nHost: localhost\r\nConnection: Keep-Alive\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    out = await raw(proxy, post, last)
    assert statuses(out) == [200, 200]


async def test_http10_keep_alive_request_refused_before_the_policy_closes(
    proxy: Proxy,
) -> None:
    # Refused while the canonical request is built (before keep-alive is decided): the
    # 400 says close and the connection ends; the next request is never read.
    bad = b"GET /orders HTTP/1.0\r\nHost: a..b\r\nConnection: Keep-Alive\r\n\r\n"
    nxt = b"GET /orders HTTP/1.0\r\nHost: localhost\r\n\r\n"
    out, closed = await raw_exchange(proxy, bad, nxt, pause=0.2)
    assert statuses(out) == [400] and closed
    assert b"Connection: close" in out
    assert [d["reason"] for d in proxy.decisions()] == ["malformed_host"]


async def test_keep_alive_survives_a_denied_request(proxy: Proxy) -> None:
    req = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
    out = await raw(
        proxy,
        req,
        req + b"GET /orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        cert="denied",
    )
    assert statuses(out) == [403, 403, 403]
    assert len({d["peer_addr"] for d in proxy.decisions()}) == 1


async def test_ab_keep_alive_really_keeps_alive(proxy: Proxy, pki: Pki) -> None:
    import shutil

    if shutil.which("ab") is None:
        pytest.skip("ApacheBench (apache2-utils) is not installed")
    pem = proxy.dir / "ab.pem"
    pem.write_bytes(
        (pki.dir / "client.pem").read_bytes() + (pki.dir / "client_key.pem").read_bytes()
    )
    done = await trio.run_process(
        [
            "ab",
            "-k",
            "-n",
            "200",
            "-c",
            "4",
            "-E",
            str(pem),
            f"https://127.0.0.1:{proxy.port}/orders",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = done.stdout.decode()
    assert "Keep-Alive requests:    200" in out, out
    assert "Failed requests:        0" in out


async def test_verified_svid_cache_is_per_credentials(proxy: Proxy) -> None:
    for _ in range(3):
        assert (await curl(proxy, "/orders")).status == 200
    cache = proxy.rt.credentials.peer_cache
    assert len(cache) == 1  # three handshakes, one path validation
    assert (await curl(proxy, "/orders", cert="untrusted")).returncode != 0
    assert len(cache) == 1  # a rejected chain is never remembered
    from proxy.app import CredentialReloader

    assert CredentialReloader(proxy.rt).reload("test")
    assert proxy.rt.credentials.peer_cache == {}  # new trust store, new cache
    assert (await curl(proxy, "/orders")).status == 200


def test_trusted_h11_events_keep_h11_framing_checks() -> None:
    """proxy.exchange builds upstream requests and client responses with h11's private
    ``_parsed=True`` (no header re-validation), but h11 must still apply
    Content-Length/Transfer-Encoding semantics: pin the behaviour the proxy relies on, so
    an h11 upgrade that changes it fails here, not in production."""
    import h11

    event = h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")], _parsed=True)
    assert list(event.headers) == [(b"host", b"x")]  # names still normalized
    with pytest.raises(h11.LocalProtocolError):
        h11.Response(
            status_code=200,
            reason=b"",
            headers=[(b"content-length", b"1"), (b"content-length", b"2")],
            _parsed=True,
        )


async def test_status_lines_carry_reason_phrases(proxy: Proxy) -> None:
    def first_line(response: bytes) -> bytes:
        return response.split(b"\r\n", 1)[0]

    get = b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert first_line(await raw(proxy, get % b"/admin")) == b"HTTP/1.1 403 Forbidden"
    assert first_line(await raw(proxy, get % b"/x")) == b"HTTP/1.1 200 OK"  # upstream: "200 "
    assert first_line(await raw(proxy, get % b"/dead")) == b"HTTP/1.1 502 Bad Gateway"
    assert first_line(await raw(proxy, b"GET /%zz HTTP/1.1\r\nHost: localhost\r\n\r\n")) == (
        b"HTTP/1.1 400 Bad Request"
    )
    upload = (
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\n"
    )
    out = await raw(proxy, upload, b"ok", pause=0.3)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), out[:80]
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.admin_port)
    await stream.send_all(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert first_line(await stream.receive_some(4096)) == b"HTTP/1.1 404 Not Found"
    await stream.aclose()


async def test_103_early_hints_from_the_upstream_are_forwarded(proxy: Proxy) -> None:
    out = await raw(
        proxy, b"GET /early-hints HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    hints, _, final = out.partition(b"\r\n\r\n")
    assert hints == b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    # Never to an HTTP/1.0 client (RFC 9110 section 15.2).
    out = await raw(proxy, b"GET /early-hints HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b" 103 " not in out
    r = await curl(proxy, "/early-hints", "-v")
    assert r.status == 200 and "< HTTP/1.1 103 Early Hints" in r.stderr


async def test_denied_head_request_gets_its_403_head_not_an_empty_reply(proxy: Proxy) -> None:
    """A load balancer's or monitor's HEAD that the policy denies: the 403's head with the
    length a GET would get and no body (RFC 9110 section 9.3.2), and the connection goes
    on. The body used to be sent anyway, h11 refused it, and the client got nothing."""
    get = b"GET /admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    head = b"HEAD /admin HTTP/1.1\r\nHost: localhost\r\n\r\n"
    got_get = await raw(proxy, get)
    got = await raw(proxy, head + get)
    first, _, rest = got.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 403 Forbidden\r\n"), got
    length = next(line for line in first.split(b"\r\n") if line.startswith(b"content-length"))
    assert length in got_get  # the length a GET gets
    assert rest.startswith(b"HTTP/1.1 403 Forbidden\r\n")  # no body between the two
    assert not [e for e in proxy.events() if e["event"] == "internal_error"]
    assert [d["method"] for d in proxy.decisions()][-2:] == ["HEAD", "GET"]


async def test_a_bad_head_after_a_head_request_still_gets_its_400(proxy: Proxy) -> None:
    """The HEAD of one request must not make the reply to the next, unreadable, head
    bodiless: its 400 was lost (found by a review of the HEAD change)."""
    head = b"HEAD /admin HTTP/1.1\r\nHost: localhost\r\n\r\n"
    bad = b"GET /x HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n"
    out = await raw(proxy, head + bad)
    assert statuses(out) == [403, 400], out
    assert out.rstrip().endswith(b"}")  # the 400's JSON body
    assert not [e for e in proxy.events() if e["event"] in ("internal_error", "connection_error")]


async def test_an_empty_line_split_between_segments_before_a_request_is_skipped(
    proxy: Proxy,
) -> None:
    """RFC 9112 section 2.2: empty lines before a request line are ignored, also when
    the CR and the LF arrive apart (nginx and node serve it; a lone CR got 400)."""
    get = b"GET /orders HTTP/1.1\r\nHost: localhost\r\n\r\n"
    close = b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    out = await raw(proxy, b"\r", b"\n" + get + b"\r", b"\n" + close, pause=0.2)
    assert statuses(out) == [200, 200], out


async def test_a_lone_cr_then_end_of_stream_does_not_stall_the_proxy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A CR, then close_notify: there is no LF to wait for. Waiting for it anyway spun on
    reads that return at once without blocking, freezing every connection of the worker
    until request_head (found by a review of the split-empty-line change)."""
    import contextlib
    import socket
    import ssl
    import time

    proxy = await start(nursery, tmp_path, pki, timeouts="timeouts: {request_head: 10s}\n")
    ctx = tls_client(pki)

    def cr_then_close() -> float:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw_sock:
            s = ctx.wrap_socket(raw_sock, server_hostname="localhost")
            s.sendall(b"\r")
            # close_notify; returns once the proxy answered (its 400 may come after our
            # close_notify: an SSLError) and closed
            with contextlib.suppress(ssl.SSLError, OSError):
                s.unwrap()
        return time.monotonic() - t0

    assert await trio.to_thread.run_sync(cr_then_close) < 2
    assert (await curl(proxy, "/orders")).status == 200
