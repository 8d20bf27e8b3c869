"""Differential tests: the proxy judges a request, then a real server reads the same
bytes. Every case of ``corpus.CORPUS`` goes over real mTLS, verbatim, through
``spiffe-pep run`` to each real server of ``servers.py`` (nginx with its defaults and with
``underscores_in_headers on``, Flask under gunicorn, node's http module, Tomcat 10).

The property, for every server and case: the proxy refused the request itself (its
decision log says so), or

- the resource the server served is covered by the route the proxy matched (a server
  that served ``admin`` while the proxy matched the catch-all ``prod-apps`` is a bypass),
  and
- the identity the app read is exactly the one the proxy set: one X-Client-Spiffe-Id
  equal to the client's SPIFFE ID, one XFCC with only this proxy's element, X-Forwarded-For
  the peer, no Client-Cert, and any "_" spelling the server keeps apart either absent or
  the same as the "-" one.

Each server is started once for the module, with its own proxy in front; cases are sent
one by one, each on a fresh TLS connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import CLIENT_ID, SERVER_ID, Pki
from tests.integration.differential.corpus import CORPUS, COVERED_BY, POLICY, Case
from tests.integration.differential.servers import (
    STARTERS,
    Process,
    ProxyProcess,
    Unavailable,
    start_nginx,
    start_proxy,
)
from tests.integration.harness import tls_client

SERVERS = ["nginx", "nginx-underscores", "gunicorn", "node", "tomcat"]


@dataclass
class Deployment:
    server: str
    proxy: ProxyProcess
    upstream: Process


@pytest.fixture(scope="module")
def nginx_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One nginx process serves both nginx variants."""
    try:
        process = start_nginx(tmp_path_factory.mktemp("nginx"))
    except Unavailable as exc:
        pytest.skip(str(exc))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    server: str = request.param
    owned = None
    if server.startswith("nginx"):
        upstream = request.getfixturevalue("nginx_process")
    else:
        try:
            upstream = owned = STARTERS[server](tmp_path_factory.mktemp(server))
        except Unavailable as exc:
            pytest.skip(str(exc))
    try:
        proxy = start_proxy(
            tmp_path_factory.mktemp(f"proxy-{server}"), pki, upstream.ports[server], POLICY
        )
    except BaseException:
        if owned:
            owned.stop()
        raise
    yield Deployment(server, proxy, upstream)
    proxy.stop()
    if owned:
        owned.stop()


@pytest.fixture(scope="module")
def client_tls(pki: Pki) -> ssl.SSLContext:
    return tls_client(pki)


@pytest.fixture(scope="module")
def expected_xfcc(pki: Pki) -> str:
    leaf = x509.load_pem_x509_certificate((pki.dir / "client.pem").read_bytes())
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    return f"By={SERVER_ID};Hash={digest};URI={CLIENT_ID}"


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def exchange(port: int, ctx: ssl.SSLContext, data: bytes) -> Answer:
    """Send ``data`` on a new mTLS connection and read one response (h11 parses it)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # bookkeeping
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        # The proxy may answer and close before reading it all: then read what it said.
        with contextlib.suppress(ssl.SSLError, BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        head: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    chunk = b""
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert head is not None
    return Answer(head.status_code, {n: v for n, v in head.headers}, body)


def served(server: str, answer: Answer) -> dict[str, Any] | None:
    """What the server says it served, or None when it answered without a handler (an
    error page, a redirect)."""
    text = answer.body.decode("utf-8", "replace")
    if server.startswith("nginx"):
        # nginx puts variables into its JSON as they are: escape its backslashes, and let
        # control characters through.
        text = text.replace("\\", "\\\\")
    try:
        seen = json.loads(text, strict=False)
    except ValueError:
        seen = None
    if not isinstance(seen, dict) or "resource" not in seen:
        assert answer.status >= 300, f"{server} answered {answer.status} without a handler"
        return None
    assert answer.status == 200, (answer.status, seen)
    seen["headers"] = {
        name: ([v] if v else []) if isinstance(v, str) else v for name, v in seen["headers"].items()
    }
    return seen


def identity_problems(seen: dict[str, Any], xfcc: str) -> list[str]:
    """Where the identity the app read differs from the one the proxy set."""
    expected = {
        "x-client-spiffe-id": [CLIENT_ID],
        "x-forwarded-client-cert": [xfcc],
        "x-forwarded-for": ["127.0.0.1"],
        "client-cert": [],
    }
    headers = seen["headers"]
    problems = []
    for name, want in expected.items():
        got = headers.get(name, [])
        if got != want:
            problems.append(f"{name}: read {got}, the proxy set {want}")
        underscored = name.replace("-", "_")
        other = headers.get(underscored, [])
        if other and other != got:
            problems.append(f"{underscored}: read {other}")
    return problems


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
@pytest.mark.parametrize("deployment", SERVERS, indirect=True, scope="module")
def test_differential(
    deployment: Deployment, case: Case, client_tls: ssl.SSLContext, expected_xfcc: str
) -> None:
    sent_id = uuid.uuid4().hex
    answer = exchange(deployment.proxy.port, client_tls, case.request(sent_id))
    request_id = answer.headers.get(b"x-request-id", sent_id.encode()).decode()
    decision = deployment.proxy.decision(request_id)
    if decision.get("upstream_status") is None:
        # Refused by the proxy itself: nothing reached the server (an allowed request
        # without an upstream answer would be a dead server, not a refusal).
        assert decision["decision"] in ("deny", "error"), decision
        assert answer.status >= 400 and decision["status"] == answer.status, decision
        assert json.loads(answer.body)["request_id"] == request_id
        return
    seen = served(deployment.server, answer)
    resource = seen["resource"] if seen else "none"
    route = decision["route"]
    covering = COVERED_BY[resource]
    problems = []
    if covering is not None and route not in covering:
        problems.append(
            f"bypass: {deployment.server} served {resource!r} "
            f"(saw {seen and seen['method']} {seen and seen['path']!r}) "
            f"while the proxy matched route {route!r} for {decision['method']} "
            f"{decision['host']} {decision['path']!r}"
        )
    if seen is not None:
        problems += identity_problems(seen, expected_xfcc)
    assert not problems, "\n".join(problems)
