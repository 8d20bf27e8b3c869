"""Subject drift on a live proxy: real certificates, real TLS, clients bound to two (or
three) loopback addresses standing for networks (``ipv4_prefix: 32``: each address is
its own network). One test per drift kind, alert against deny, and what was learned
surviving a restart through the SQLite file another proxy shares."""

from __future__ import annotations

import datetime as dt
import re
import socket
import sqlite3
from pathlib import Path

import pytest
import trio

from proxy import demo_upstream
from proxy.devcerts import issue_ca, issue_svid
from tests.conftest import Pki
from tests.integration.harness import (
    POLICY,
    Proxy,
    curl,
    serve,
    start,
    tls_client,
    wait_until,
    write_config,
)

ID = "spiffe://example.org/ns/prod/sa/drifter"


def _policy(drift: str) -> str:
    return f"drift: {{ipv4_prefix: 32, {drift}}}\n" + POLICY


def _get(port: int, pki: Pki, cert: str, source: str) -> int:
    """One request on a new connection from ``source``; its status."""
    ctx = tls_client(pki, cert)
    with (
        socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        ) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"GET /drift HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert match, data[:200]
    return int(match.group(1))


async def get(proxy: Proxy, cert: str, source: str) -> int:
    return await trio.to_thread.run_sync(_get, proxy.port, proxy.pki, cert, source)


async def _proxy(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, drift: str, extra: str = ""
) -> Proxy:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream, policy=_policy(drift), extra=extra)
    return await serve(nursery, cfg, pki, upstream)


def _drift_events(proxy: Proxy) -> list[dict[str, object]]:
    return [e for e in proxy.events() if e["event"] == "identity_drift"]


async def _last_decision(proxy: Proxy, count: int) -> dict[str, object]:
    await wait_until(lambda: len(proxy.decisions()) >= count)
    return proxy.decisions()[-1]


async def test_new_network_after_learning_is_an_alert(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("drifter", [ID])
    proxy = await _proxy(nursery, tmp_path, pki, "mode: alert, learn: 1s")
    assert await get(proxy, "drifter", "127.0.0.2") == 200  # first sighting: learning starts
    assert await get(proxy, "drifter", "127.0.0.3") == 200  # still learning: learned
    await trio.sleep(1.1)
    assert await get(proxy, "drifter", "127.0.0.3") == 200
    assert _drift_events(proxy) == []
    assert await get(proxy, "drifter", "127.0.0.4") == 200  # alert only: served
    line = await _last_decision(proxy, 4)
    assert line["drift"] == ["new_network"] and line["decision"] == "allow"
    (event,) = _drift_events(proxy)
    assert event["kind"] == "new_network" and event["mode"] == "alert"
    assert event["spiffe_id"] == ID and event["subject"] == "peer"
    evidence = event["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["network"] == "127.0.0.4/32"
    assert evidence["known_networks"] == ["127.0.0.2/32", "127.0.0.3/32"]
    assert 'spiffe_pep_identity_drift_total{kind="new_network",mode="alert"} 1.0' in (
        await proxy.metrics()
    )
    # Alerted once, then learned: the network is known now.
    assert await get(proxy, "drifter", "127.0.0.4") == 200
    assert (await _last_decision(proxy, 5))["drift"] is None


async def test_new_network_is_refused_in_deny_mode_and_not_learned(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("drifter", [ID])
    proxy = await _proxy(nursery, tmp_path, pki, "mode: deny, learn: 0s")
    assert await get(proxy, "drifter", "127.0.0.2") == 200
    for _ in range(2):  # a refused network never becomes normal by being tried
        assert await get(proxy, "drifter", "127.0.0.3") == 403
    line = await _last_decision(proxy, 3)
    assert line["reason"] == "identity_drift_new_network" and line["decision"] == "deny"
    assert line["drift"] == ["new_network"] and str(line["rule"]).startswith("drift.new_network")
    assert await get(proxy, "drifter", "127.0.0.2") == 200
    metrics = await proxy.metrics()
    assert 'spiffe_pep_identity_drift_total{kind="new_network",mode="deny"} 2.0' in metrics
    assert 'reason="identity_drift_new_network"' in metrics


async def test_explicit_networks_skip_learning(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("drifter", [ID])
    proxy = await _proxy(nursery, tmp_path, pki, "mode: deny, networks: [127.0.0.2/32]")
    assert await get(proxy, "drifter", "127.0.0.3") == 403  # first sighting, yet refused
    assert await get(proxy, "drifter", "127.0.0.2") == 200


async def test_two_live_credentials_from_two_peers(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("copy_a", [ID])
    pki.svid("copy_b", [ID])
    proxy = await _proxy(nursery, tmp_path, pki, "mode: alert")
    assert await get(proxy, "copy_a", "127.0.0.2") == 200
    assert await get(proxy, "copy_b", "127.0.0.2") == 200  # a rotation: the same peer
    assert _drift_events(proxy) == []
    assert await get(proxy, "copy_b", "127.0.0.3") == 200
    (event,) = _drift_events(proxy)
    assert event["kind"] == "concurrent_credentials"
    evidence = event["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["peer"] == "127.0.0.3" and evidence["other_peer"] == "127.0.0.2"
    assert evidence["other_sha256"] != evidence["sha256"]
    assert (await _last_decision(proxy, 3))["drift"] == ["concurrent_credentials"]


async def test_credential_from_another_ca(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    # A second CA trusted for example.org (a migration, or a CA that should not mint this).
    other = issue_ca("example.org", common_name="second example.org CA")
    pki.svid("drifter", [ID])
    pki.write("other_ca", issue_svid(other, [ID]))
    bundle = tmp_path / "two_roots.pem"
    bundle.write_bytes(Path(pki.bundle).read_bytes() + other.cert_pem())
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    cfg = write_config(tmp_path, pki, upstream, policy=_policy("mode: deny"))
    cfg.write_text(cfg.read_text().replace(f"example.org: {pki.bundle}", f"example.org: {bundle}"))
    proxy = await serve(nursery, cfg, pki, upstream)
    assert await get(proxy, "drifter", "127.0.0.2") == 200
    assert await get(proxy, "other_ca", "127.0.0.2") == 403
    line = await _last_decision(proxy, 2)
    assert line["reason"] == "identity_drift_new_issuer"
    (event,) = _drift_events(proxy)
    evidence = event["evidence"]
    assert isinstance(evidence, dict)
    assert "second example.org CA" in str(evidence["issuer"])
    assert evidence["known_issuers"] == [pki.intermediate.cert.subject.rfc4514_string()]


async def test_credential_living_far_longer(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("hourly", [ID], lifetime=dt.timedelta(hours=1))
    pki.svid("yearly", [ID], lifetime=dt.timedelta(days=365))
    proxy = await _proxy(nursery, tmp_path, pki, "mode: alert")
    assert await get(proxy, "hourly", "127.0.0.2") == 200
    assert await get(proxy, "yearly", "127.0.0.2") == 200
    (event,) = _drift_events(proxy)
    assert event["kind"] == "lifetime"
    assert event["evidence"] == {"lifetime_s": 365 * 86400, "longest_before_s": 3600, "factor": 4.0}
    assert (await _last_decision(proxy, 2))["drift"] == ["lifetime"]


async def test_what_was_learned_survives_a_restart_in_the_shared_store(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    pki.svid("drifter", [ID])
    store = tmp_path / "drift.sqlite"
    extra = f"drift_store: {store}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with trio.CancelScope() as first:
        async with trio.open_nursery() as inner:
            a = await _proxy(inner, tmp_path / "a", pki, "mode: deny, learn: 0s", extra)
            assert await get(a, "drifter", "127.0.0.2") == 200
            first.cancel()  # stopped: what is queued is written
    rows = sqlite3.connect(store).execute("SELECT kind, key FROM drift_facts").fetchall()
    assert ("network", "127.0.0.2/32") in rows
    # Another proxy (a restart, or a worker beside it) starts from what the first learned.
    b = await _proxy(nursery, tmp_path / "b", pki, "mode: deny, learn: 0s", extra)
    assert await get(b, "drifter", "127.0.0.3") == 403
    assert await get(b, "drifter", "127.0.0.2") == 200
    # And one running beside it reads what the other learns while both run.
    pki.svid("newcomer", ["spiffe://example.org/ns/prod/sa/newcomer"])
    (tmp_path / "c").mkdir()
    c = await _proxy(nursery, tmp_path / "c", pki, "mode: deny, learn: 0s", extra)
    assert await get(b, "newcomer", "127.0.0.2") == 200
    await trio.sleep(2.5)  # c reads back what b wrote
    assert await get(c, "newcomer", "127.0.0.3") == 403


async def test_origin_behind_a_new_trusted_hop(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    # An origin is learned by the hop it comes through (its address is not ours to see).
    pki.svid("hop2", ["spiffe://example.org/ns/prod/sa/hop2"])
    proxy = await start(
        nursery,
        tmp_path,
        pki,
        policy=_policy("mode: deny, learn: 0s"),
        identity_headers='xfcc: append_forward\ntrusted_forwarders: ["spiffe://example.org/ns/prod/*"]',
    )
    origin = "spiffe://example.org/ns/prod/sa/origin"
    xfcc = f"X-Forwarded-Client-Cert: Hash={'cd' * 32};URI={origin}"
    for _ in range(2):  # per request: the same origin via the same hop is known
        assert (await curl(proxy, "/x", "-H", xfcc)).status == 200
    assert (await curl(proxy, "/x", "-H", xfcc, cert="hop2")).status == 403
    line = await _last_decision(proxy, 3)
    assert line["reason"] == "identity_drift_new_network"
    assert line["drift"] == ["new_network"]
    (event,) = _drift_events(proxy)
    assert event["subject"] == "origin" and event["spiffe_id"] == origin
    evidence = event["evidence"]
    assert isinstance(evidence, dict)
    assert evidence["network"] == "via spiffe://example.org/ns/prod/sa/hop2"


def test_a_drift_store_that_cannot_be_opened_stops_startup(tmp_path: Path, pki: Pki) -> None:
    from proxy import app
    from proxy.errors import ConfigError

    extra = "drift_store: /nonexistent/d.sqlite\n"
    cfg = write_config(tmp_path, pki, 9, policy=_policy("mode: alert"), extra=extra)
    with pytest.raises(ConfigError, match="cannot open the drift store"):
        app.build_runtime(app.read_config(cfg))
