"""``/ui`` in a real browser: headless Chromium loads the admin page of a live proxy that
served real traffic (curl with real SVIDs) and reads the denials table, the identity
map's nodes and edges, and a client certificate subject holding ``<script>`` (shown as
text, never run). With ``--workers 2`` the supervisor's page reads the workers' logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy import app, graphviz, ui
from proxy.audit_sink import JsonLines
from proxy.devcerts import issue_svid
from tests.conftest import CLIENT_ID, DENIED_ID, PARTNER_ID, Pki
from tests.integration.browser import chromium, full_page_screenshot, require_chromium
from tests.integration.harness import (
    POLICY,
    Proxy,
    curl,
    free_port,
    start,
    wait_until,
    write_config,
)

XSS_ID = "spiffe://example.org/ns/prod/sa/xss"
SCRIPT = '<script>document.title="pwned"</script>'
SCREENSHOT = os.environ.get("SPIFFE_PEP_UI_SCREENSHOT")  # also copy the screenshot here


def _xss_cert(pki: Pki) -> None:
    """A valid SVID whose subject CN is markup (a CA may put any text there)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, SCRIPT),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
        ]
    )
    pki.write("xss", issue_svid(pki.intermediate, [XSS_ID], subject=subject))


async def _traffic(proxy: Proxy) -> None:
    """Allowed and denied requests from four identities."""
    for path, cert, want in [
        ("/orders/1", "client", 200),
        ("/orders/2", "client", 200),
        ("/payments/7", "partner", 200),
        ("/hello", "xss", 200),
        ("/admin/users", "client", 403),  # route admin: allow []
        ("/orders/1", "denied", 403),  # ns/dev: not allowed on prod
        ("/orders/<script>x</script>", "denied", 403),
        ("/orders/3", "partner", 403),
    ]:
        got = await curl(proxy, path, cert=cert)
        assert got.status == want, (path, cert, got)
    await wait_until(lambda: len(proxy.decisions()) >= 8)


async def _failed_reload(proxy: Proxy) -> None:
    """A bad policy edit (rejected: file:line:column in the history), then the fix."""
    policy = proxy.dir / "policy.yaml"
    policy.write_text(POLICY.replace("upstream: app\n", "upstream: nowhere\n", 1))
    await wait_until(
        lambda: any(e["event"] == "policy_reload_failed" for e in proxy.events()), timeout=10
    )
    policy.write_text(POLICY)
    await wait_until(
        lambda: any(e["event"] == "policy_reloaded" for e in proxy.events()), timeout=10
    )


def _read_page(url: str, profile: Path, shot: Path) -> dict[str, Any]:
    """What the browser shows (in a thread: Selenium blocks)."""
    from selenium.webdriver.common.by import By

    def texts(css: str) -> list[str]:
        return [str(e.text) for e in driver.find_elements(By.CSS_SELECTOR, css)]

    with chromium(profile) as driver:
        driver.get(url)
        facts: dict[str, Any] = {
            "title": driver.title,
            "denials": texts("#denials tbody tr"),
            "allowed": texts("#allowed tbody tr"),
            "nodes": {
                str(g.get_attribute("id")): str(g.text)
                for g in driver.find_elements(By.CSS_SELECTOR, "#map-svg svg g.node")
            },
            "edges": [
                {
                    "id": str(g.get_attribute("id")),
                    "class": str(g.get_attribute("class")),
                    "stroke": str(path.get_attribute("stroke")),
                    "dashed": path.get_attribute("stroke-dasharray") is not None,
                    "text": str(g.text),
                }
                for g in driver.find_elements(By.CSS_SELECTOR, "#map-svg svg g.edge")
                for path in g.find_elements(By.TAG_NAME, "path")[:1]
            ],
            "expiry": texts("#expiry-table tbody tr"),
            "reloads": texts("#reloads tbody tr"),
            "drift": texts("#drift-alerts"),
            "counters": texts("#counters .card"),
            "scripts": len(driver.find_elements(By.TAG_NAME, "script")),
            "script_text_cells": [
                str(td.text)
                for td in driver.find_elements(By.CSS_SELECTOR, "td")
                if "<script>" in td.text
            ],
        }
        full_page_screenshot(driver, shot)
        driver.get(url + "?reason=identity_not_allowed&route=prod")
        facts["filtered_denials"] = texts("#denials tbody tr")
        facts["filtered_allowed"] = texts("#allowed tbody tr")
    return facts


@pytest.fixture
async def served(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    _xss_cert(pki)
    proxy = await start(nursery, tmp_path, pki)
    await _traffic(proxy)
    await _failed_reload(proxy)
    return proxy


async def test_ui_over_http_is_escaped_and_locked_down(served: Proxy) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{served.admin_port}/ui")
        foreign = await c.get(
            f"http://127.0.0.1:{served.admin_port}/ui", headers={"host": "evil.example"}
        )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script at all
    assert "<script" not in r.text.lower()
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in r.text
    assert "/orders/&lt;script&gt;" in r.text or "/orders/%3Cscript%3E" in r.text
    assert "policy.yaml:" in r.text and "nowhere" in r.text  # the failed reload, located
    assert foreign.status_code == 421 and "spiffe" not in foreign.text  # same Host rules


async def test_ui_in_headless_chromium(served: Proxy, tmp_path: Path) -> None:
    require_chromium()
    shot = tmp_path / "ui.png"
    url = f"http://127.0.0.1:{served.admin_port}/ui"
    facts = await trio.to_thread.run_sync(_read_page, url, tmp_path / "chromium-profile", shot)
    print(f"screenshot: {shot}")
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)

    # Denials first, each with its identity, route and reason.
    assert facts["title"] == "spiffe-pep admin"  # no script ran
    denials = facts["denials"]
    assert len(denials) == 4 and len(facts["allowed"]) == 4
    assert any(DENIED_ID in row and "identity_not_allowed" in row for row in denials)
    assert any(CLIENT_ID in row and "admin" in row for row in denials)
    assert any(PARTNER_ID in row and "prod" in row for row in denials)
    # The filter: denials of route prod for identity_not_allowed only.
    assert facts["filtered_allowed"] == []
    assert len(facts["filtered_denials"]) == 3
    assert all("prod" in row for row in facts["filtered_denials"])

    # The map: identities and routes as nodes; granted, used and denied edges.
    nodes = facts["nodes"]
    for key in (
        f"id:{CLIENT_ID}",
        f"id:{DENIED_ID}",
        f"id:{XSS_ID}",
        f"id:{PARTNER_ID}",
        "pattern:spiffe://example.org/ns/prod/*",
        "route:prod",
        "route:admin",
        "route:partner",
        "route:dead",
    ):
        assert key in nodes, (key, sorted(nodes))
    edges = {e["id"]: e for e in facts["edges"]}
    used = edges[f"used:id:{CLIENT_ID}->route:prod"]
    assert used["class"] == "edge used" and used["text"] == "2" and not used["dashed"]
    denied = edges[f"denied:id:{DENIED_ID}->route:prod"]
    assert denied["stroke"] == "#cf222e" and "2 identity_not_allowed" in denied["text"]
    assert edges[f"denied:id:{CLIENT_ID}->route:admin"]["stroke"] == "#cf222e"
    unused = edges["granted:pattern:spiffe://example.org/ns/prod/*->route:dead"]
    assert unused["dashed"] and "unused" in unused["class"]
    grant = edges["granted:pattern:spiffe://example.org/ns/prod/*->route:prod"]
    assert not grant["dashed"]  # used by client and xss
    assert not edges[f"granted:id:{PARTNER_ID}->route:partner"]["dashed"]

    # The <script> subject is text: the cell shows it, no script element exists.
    assert facts["scripts"] == 0
    assert any(SCRIPT in cell for cell in facts["script_text_cells"])
    assert any(XSS_ID in row and SCRIPT in row for row in facts["expiry"])
    # Expiry: own SVID, bundle CAs, clients; reload history with the failure located.
    assert any(row.startswith("own SVID") for row in facts["expiry"])
    assert any(row.startswith("bundle CA") for row in facts["expiry"])
    failed = [row for row in facts["reloads"] if "failed" in row]
    assert failed and "policy.yaml:" in failed[0] and "nowhere" in failed[0]
    assert "No identity drift alerts" in facts["drift"][0]
    assert any("requests denied" in c and c.startswith("4") for c in facts["counters"])
    assert shot.stat().st_size > 10_000


async def test_ui_of_workers_reads_their_logs(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """``--workers 2``: the supervisor's /ui shows what the workers logged."""
    from proxy import demo_upstream

    _xss_cert(pki)
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", policy_watch="off")
    cfg.write_text(
        cfg.read_text().replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}")
        + f"event_log: {tmp_path}/events.jsonl\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = Proxy(port, upstream, None, tmp_path, pki, admin)  # type: ignore[arg-type]
    try:
        with trio.fail_after(20):
            while (await curl(proxy, "/orders/1", cert="xss")).status != 200:
                await trio.sleep(0.1)
        assert (await curl(proxy, "/orders/1", cert="denied")).status == 403
        await wait_until(lambda: len(proxy.decisions()) >= 2)
        await wait_until(lambda: any(e["event"] == "peer_credential_seen" for e in proxy.events()))
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{admin}/ui")
        assert r.status_code == 200
        assert "the supervisor of 2 workers" in r.text
        denials = r.text.split('id="denials"', 1)[1].split("</table>", 1)[0]
        assert DENIED_ID in denials and "identity_not_allowed" in denials
        assert "&lt;script&gt;document.title" in r.text and "<script" not in r.text
        if graphviz.available():  # Graphviz writes the id's "-" as a character reference
            assert f'id="used:id:{XSS_ID}&#45;&gt;route:prod" class="edge used"' in r.text
        else:
            assert 'id="map-table"' in r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(proc.wait)


async def test_workers_view_says_what_it_cannot_show(tmp_path: Path, pki: Pki) -> None:
    """Under a supervisor, logs on stdout/stderr cannot be read back, and a policy file
    that does not load leaves the last version that did: the page says so."""
    cfg = write_config(tmp_path, pki, free_port())
    cfg.write_text(cfg.read_text().replace(f"{tmp_path}/decisions.jsonl", "stdout"))
    rt = app.build_runtime(app.read_config(cfg), events=JsonLines(str(tmp_path / "ev.jsonl")))
    (tmp_path / "policy.yaml").write_text("routes: [")
    inputs = ui.WorkersView(rt, 2, list, app.read_policy).gather()
    notes = " ".join(inputs.notes)
    assert "decision_log is stdout" in notes and "event_log is stderr" in notes
    assert "does not load" in inputs.policy_info.note and inputs.policy is rt.policy
    assert not inputs.recent.decisions
