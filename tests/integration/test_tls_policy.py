"""The TLS policy of both contexts, checked with openssl s_client against the live proxy:
TLS 1.2 only with ECDHE and AEAD suites, and no session resumption in either version (a
resumed session would skip the SVID checks that run on every full handshake)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import SERVER_ID, Pki
from tests.integration.harness import (
    Proxy,
    curl,
    free_port,
    serve,
    start,
    wait_listening,
    wait_until,
    write_config,
)

REQUEST = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    (pki.dir / "intermediate.pem").write_bytes(pki.intermediate.cert_pem())
    return await start(nursery, tmp_path, pki)


async def s_client(proxy: Proxy, *args: str, data: bytes = REQUEST, ign_eof: bool = True) -> str:
    """openssl s_client presenting the client SVID; sends ``data`` and reads until the
    server closes (``ign_eof``) or stdin ends."""
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{proxy.port}",
        "-servername",
        "localhost",
        "-CAfile",
        proxy.pki.bundle,
        "-cert",
        f"{proxy.pki.dir}/client.pem",
        "-key",
        f"{proxy.pki.dir}/client_key.pem",
        "-cert_chain",  # -cert reads the leaf only
        f"{proxy.pki.dir}/intermediate.pem",
        *(["-ign_eof"] if ign_eof else []),
        *args,
    ]
    with trio.fail_after(30):
        done = await trio.run_process(
            cmd, stdin=data, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def s_server(pki: Pki, port: int, *args: str) -> subprocess.Popen[bytes]:
    """openssl s_server on loopback presenting the server SVID (leaf and intermediate),
    answering HTTP with a status page; it resumes sessions (OpenSSL's defaults)."""
    (pki.dir / "intermediate.pem").write_bytes(pki.intermediate.cert_pem())
    cmd = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet", *args]
    cmd += ["-cert", f"{pki.dir}/server.pem", "-key", f"{pki.dir}/server_key.pem"]
    cmd += ["-cert_chain", f"{pki.dir}/intermediate.pem"]
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize(
    "cipher",
    [
        "ECDHE-ECDSA-AES128-SHA",  # CBC, SHA-1 MAC
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA256",  # CBC
        "ECDHE-ECDSA-AES256-SHA384",
    ],
)
async def test_tls12_weak_cipher_is_refused(proxy: Proxy, cipher: str) -> None:
    out = await s_client(proxy, "-tls1_2", "-cipher", cipher)
    assert "HTTP/1.1 200" not in out
    assert f"Cipher is {cipher}" not in out and "Cipher is (NONE)" in out, out[-1500:]


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
async def test_tls12_ecdhe_aead_is_accepted(proxy: Proxy, cipher: str) -> None:
    out = await s_client(proxy, "-tls1_2", "-cipher", cipher)
    assert f"Cipher is {cipher}" in out and "HTTP/1.1 200" in out, out[-1500:]


async def test_tls13_is_accepted(proxy: Proxy) -> None:
    out = await s_client(proxy, "-tls1_3")
    assert "TLSv1.3" in out and "HTTP/1.1 200" in out, out[-1500:]


async def test_tls12_session_is_never_resumed(proxy: Proxy) -> None:
    out = await s_client(proxy, "-tls1_2", "-reconnect")
    assert out.count("New, TLSv1.2") >= 2, out[-2000:]  # every reconnect did a handshake
    assert "Reused" not in out


async def test_tls13_session_is_never_resumed(proxy: Proxy, tmp_path: Path) -> None:
    session = tmp_path / "session.pem"
    first = await s_client(proxy, "-tls1_3", "-sess_out", str(session))
    assert "HTTP/1.1 200" in first and session.exists(), first[-1500:]
    # The saved session holds a ticket the proxy sent (OpenSSL's stateful TLS 1.3 ticket,
    # see proxy/tls.py): offering it finds no session, and the handshake is a full one.
    second = await s_client(proxy, "-tls1_3", "-sess_in", str(session))
    assert "Reused" not in second and "New, TLSv1.3" in second, second[-1500:]
    assert "HTTP/1.1 200" in second


async def test_s_client_detects_resumption_where_a_server_allows_it(
    tmp_path: Path, pki: Pki
) -> None:
    # The control for the two tests above: against openssl s_server, which resumes, the
    # same s_client runs do show "Reused".
    port = free_port()
    server = s_server(pki, port)
    try:
        await wait_listening(port, server)
        target = Proxy(port, 0, None, tmp_path, pki)  # type: ignore[arg-type]
        out = await s_client(target, "-tls1_2", "-reconnect", data=b"", ign_eof=False)
        assert "Reused, TLSv1.2" in out, out[-1500:]
        session = tmp_path / "control.pem"
        await s_client(target, "-tls1_3", "-sess_out", str(session), data=b"GET / HTTP/1.0\r\n\r\n")
        out = await s_client(target, "-tls1_3", "-sess_in", str(session), data=b"", ign_eof=False)
        assert "Reused, TLSv1.3" in out, out[-1500:]
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize(
    ("cipher", "status"),
    [("ECDHE-ECDSA-AES128-SHA", 502), ("ECDHE-ECDSA-AES128-GCM-SHA256", 200)],
    ids=["cbc_only_upstream_refused", "aead_upstream_accepted"],
)
async def test_upstream_tls12_policy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, cipher: str, status: int
) -> None:
    # The upstream context has the same policy: an upstream that offers only a CBC suite
    # gets no handshake (502 upstream_tls_failed).
    port = free_port()
    server = s_server(pki, port, "-tls1_2", "-cipher", cipher)
    try:
        await wait_listening(port, server)
        cfg = write_config(tmp_path, pki, port)
        cfg.write_text(
            cfg.read_text().replace(
                f'url: "http://127.0.0.1:{port}"',
                f'url: "https://localhost:{port}", tls: {{expect: "{SERVER_ID}"}}',
            )
        )
        proxy = await serve(nursery, cfg, pki, port)
        r = await curl(proxy, "/x")
        assert r.status == status, r.body
        if status == 502:
            await wait_until(lambda: proxy.decisions())
            assert proxy.decisions()[-1]["reason"] == "upstream_tls_failed"
    finally:
        server.kill()
        server.wait(10)
