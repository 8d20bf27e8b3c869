"""Certificate rotation from files under live traffic, and the admin endpoints."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.devcerts import issue_svid
from tests.conftest import SERVER_ID, Pki
from tests.integration.harness import (
    Proxy,
    serve,
    server_fingerprint,
    tls_client,
    wait_until,
    write_config,
)


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    from proxy import demo_upstream

    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    for name in ("server.pem", "server_key.pem"):
        shutil.copy(pki.dir / name, tmp_path / name)
    cfg = write_config(tmp_path, pki, upstream)
    text = cfg.read_text().replace(f"{pki.dir}/server", f"{tmp_path}/server")
    cfg.write_text(text.replace("tls:\n", "tls:\n  watch: 200ms\n", 1))
    return await serve(nursery, cfg, pki, upstream)


async def _wait_event(proxy: Proxy, name: str, count: int = 1) -> None:
    await wait_until(lambda: sum(e["event"] == name for e in proxy.events()) >= count)


async def test_rotation_under_live_keep_alive_traffic(proxy: Proxy, pki: Pki) -> None:
    ctx = tls_client(pki)
    before = await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx)
    statuses: list[int] = []
    stop = trio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(verify=tls_client(pki)) as c:
            for _ in range(5000):  # bounded; stops as soon as the rotation is seen
                statuses.append((await c.get(proxy.url + "/orders")).status_code)
                if stop.is_set():
                    return

    async with trio.open_nursery() as n:
        n.start_soon(client)
        await trio.sleep(0.3)
        # spiffe-helper's way: rewrite the SVID, then the key, in place.
        new = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
        (proxy.dir / "server.pem").write_bytes(new.chain_pem())
        (proxy.dir / "server_key.pem").write_bytes(new.key_pem())
        with trio.fail_after(5):
            while await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx) == before:
                await trio.sleep(0.1)
        await trio.sleep(0.2)
        stop.set()
    assert len(statuses) > 10 and set(statuses) == {200}
    client_lines = [d for d in proxy.decisions() if d["path"] == "/orders"]
    assert len({d["peer_addr"] for d in client_lines}) == 1  # never dropped or reconnected
    now_serving = await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx)
    assert now_serving == hashlib.sha256(new.cert.public_bytes(Encoding.DER)).hexdigest()
    reloaded = [e for e in proxy.events() if e["event"] == "credentials_reloaded"]
    assert reloaded and reloaded[-1]["trigger"] == "watch"
    assert 'spiffe_pep_credential_reloads_total{result="ok"}' in await proxy.metrics()


@pytest.mark.parametrize("damage", ["half_written", "mismatched_key", "expired"])
async def test_bad_rotation_rejected_old_credentials_keep_serving(
    proxy: Proxy, pki: Pki, damage: str
) -> None:
    ctx = tls_client(pki)
    before = await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx)
    cert = proxy.dir / "server.pem"
    if damage == "half_written":
        cert.write_bytes(cert.read_bytes()[:300])
    elif damage == "mismatched_key":
        other = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"])
        cert.write_bytes(other.chain_pem())  # the key file still holds the old key
    else:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        old = issue_svid(
            pki.intermediate,
            [SERVER_ID],
            dns=["localhost"],
            not_before=now - dt.timedelta(days=2),
            not_after=now - dt.timedelta(days=1),
        )
        cert.write_bytes(old.chain_pem())
        (proxy.dir / "server_key.pem").write_bytes(old.key_pem())
    await _wait_event(proxy, "credentials_reload_failed")
    assert await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx) == before
    async with httpx.AsyncClient(verify=ctx) as c:
        assert (await c.get(proxy.url + "/orders")).status_code == 200
    failed = [e for e in proxy.events() if e["event"] == "credentials_reload_failed"][-1]
    assert failed["location"].endswith(("server.pem", "server_key.pem"))
    assert 'spiffe_pep_credential_reloads_total{result="failed"} 1.0' in await proxy.metrics()


async def test_admin_readyz_status_and_expiry_gauges(proxy: Proxy) -> None:
    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with httpx.AsyncClient() as c:
        assert (await c.get(base + "/healthz")).json() == {"status": "ok"}
        assert (await c.get(base + "/readyz")).status_code == 200
        status = (await c.get(base + "/status")).json()
        assert status["spiffe_id"] == SERVER_ID
        assert status["policy"]["sha256"] == proxy.rt.policy.sha256
        assert set(status["bundles"]) == {"example.org", "partner.org"}
        assert status["bundles"]["example.org"]["x509_authorities"] == 1
        metrics = (await c.get(base + "/metrics")).text
        assert "spiffe_pep_svid_not_after_seconds " in metrics
        assert 'spiffe_pep_bundle_ca_not_after_seconds{subject="CN=partner.org CA' in metrics
        assert (await c.post(base + "/metrics")).status_code == 405
        assert (await c.get(base + "/nope")).status_code == 404
        proxy.rt.drain_requested.set()
        await trio.sleep(0)
        # Draining: not ready (the admin listener stops with the listeners right after).
        with pytest.raises(httpx.HTTPError):
            r = await c.get(base + "/readyz")
            assert r.status_code == 503
            raise httpx.HTTPError("not ready")
