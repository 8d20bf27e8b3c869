"""SIGHUP re-reads the runtime configuration: what can change live changes (upstreams and
the policy compiled against them, identity headers, request rules, log files), what
cannot is logged as needing a restart, and a bad edit is rejected with file:line while
the last good configuration keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy import demo_upstream
from tests.conftest import Pki
from tests.integration.harness import (
    POLICY,
    Proxy,
    RecordingUpstream,
    _lines,
    curl,
    free_port,
    raw,
    start,
    statuses,
    wait_listening,
    wait_until,
    write_config,
)


@pytest.fixture
async def proxy(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> Proxy:
    return await start(nursery, tmp_path, pki, policy_watch="off")


def _events(proxy: Proxy, name: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events() if e["event"] == name]


async def _sighup(proxy: Proxy, event: str) -> dict[str, Any]:
    """SIGHUP, and the ``event`` it caused."""
    before = len(_events(proxy, event))
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: len(_events(proxy, event)) > before)
    return _events(proxy, event)[-1]


async def test_sighup_applies_what_can_change_live(
    nursery: trio.Nursery, proxy: Proxy, tmp_path: Path
) -> None:
    cfg = tmp_path / "spiffe-pep.yaml"
    billing = RecordingUpstream()
    await nursery.start(billing.serve)
    r = await curl(proxy, "/x", "-H", "X_Debug: 1")
    assert r.status == 200 and b"x-client-spiffe-id" in r.body  # the demo upstream's echo

    # The upstream renamed and moved (the policy follows), another identity header, a
    # stricter http rule, another decision log, and a new listen address.
    text = cfg.read_text()
    text = text.replace("  app: {url: ", "  billing: {url: ").replace(
        f"127.0.0.1:{proxy.upstream_port}", f"127.0.0.1:{billing.port}"
    )
    text = text.replace(f"{tmp_path}/decisions.jsonl", f"{tmp_path}/decisions2.jsonl")
    text = text.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1")
    text += "identity_headers: {spiffe_id_header: X-Caller-Id}\n"
    text += "http: {underscores_in_headers: refuse}\n"
    cfg.write_text(text)
    (tmp_path / "policy.yaml").write_text(POLICY.replace("upstream: app", "upstream: billing"))
    done = await _sighup(proxy, "config_reloaded")
    assert set(done["changed"]) >= {"upstreams", "identity", "http", "decision_log"}, done
    (restart,) = _events(proxy, "config_restart_required")
    assert restart["settings"] == ["listen"]

    r = await curl(proxy, "/x")  # on the port it listened on, at the new upstream
    assert r.status == 200 and r.body == b"ok"
    (seen,) = billing.requests
    names = {n for n, _ in seen.headers}
    assert b"x-caller-id" in names and b"x-client-spiffe-id" not in names
    r = await curl(proxy, "/x", "-H", "X_Debug: 1")
    assert r.status == 400  # the request rules (Runtime.rules) were derived again
    await wait_until(lambda: len(_lines(tmp_path / "decisions2.jsonl")) == 2)
    line = _lines(tmp_path / "decisions2.jsonl")[-1]
    assert line["reason"] == "underscore_in_header_name"
    assert _lines(tmp_path / "decisions.jsonl")[-1]["upstream"] == "app"
    assert 'spiffe_pep_config_reloads_total{result="ok"} 1.0' in await proxy.metrics()


async def test_keep_alive_connection_gets_the_new_identity_headers(
    nursery: trio.Nursery, proxy: Proxy, tmp_path: Path
) -> None:
    cfg = tmp_path / "spiffe-pep.yaml"
    get = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def edit_then_get() -> None:
        await trio.sleep(0.3)
        cfg.write_text(cfg.read_text() + "identity_headers: {spiffe_id_header: X-Caller-Id}\n")
        await _sighup(proxy, "config_reloaded")

    nursery.start_soon(edit_then_get)
    out = await raw(proxy, get, get, pause=0.8)  # one connection, before and after
    assert statuses(out) == [200, 200]
    first, second = out.split(b"HTTP/1.1 200", 2)[1:]
    assert b"x-client-spiffe-id" in first and b"x-caller-id" not in first
    assert b"x-caller-id" in second and b"x-client-spiffe-id" not in second


@pytest.mark.parametrize(
    ("edit", "where", "message"),
    [
        (
            lambda t: t.replace("decision_log:", "decision_logs:"),
            ("spiffe-pep.yaml", "decision_logs:", 1),
            "unknown key 'decision_logs'",
        ),
        (
            lambda t: t + "timeouts: {idle: 60}\n",
            ("spiffe-pep.yaml", "timeouts:", 18),
            "duration with a unit",
        ),
        (  # the policy routes to the upstream 'dead': it cannot be removed under it
            lambda t: "\n".join(line for line in t.splitlines() if "dead:" not in line) + "\n",
            ("policy.yaml", "upstream: dead", 15),
            "unknown upstream 'dead'",
        ),
    ],
    ids=["unknown_key", "duration_without_unit", "upstream_the_policy_uses_removed"],
)
async def test_bad_config_edit_is_rejected_and_the_last_good_keeps_serving(
    proxy: Proxy, tmp_path: Path, edit: Any, where: tuple[str, str, int], message: str
) -> None:
    cfg = tmp_path / "spiffe-pep.yaml"
    good = cfg.read_text()
    cfg.write_text(edit(good))
    failed = await _sighup(proxy, "config_reload_failed")
    name, needle, column = where
    text = (tmp_path / name).read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if needle in t)
    assert failed["location"] == f"{tmp_path / name}:{line}:{column}", failed
    assert message in failed["error"]
    assert (await curl(proxy, "/x")).status == 200
    assert (await curl(proxy, "/dead")).status == 502  # the upstream is still there
    assert 'spiffe_pep_config_reloads_total{result="failed"} 1.0' in await proxy.metrics()
    # Fixed: applied at the next SIGHUP.
    cfg.write_text(good + "identity_headers: {spiffe_id_header: X-Caller-Id}\n")
    assert (await _sighup(proxy, "config_reloaded"))["changed"] == ["identity"]


async def test_a_bad_config_edit_undone_is_logged_so_the_last_word_is_not_an_error(
    proxy: Proxy, tmp_path: Path
) -> None:
    """An operator breaks the file, sees ``config_reload_failed``, restores it and sends
    SIGHUP: the file equals what serves, and that is said (event, metric), not silence
    that leaves the failure as the log's and the admin page's last word."""
    cfg = tmp_path / "spiffe-pep.yaml"
    good = cfg.read_text()
    cfg.write_text(good.replace("upstreams:", "upstreems:"))
    await _sighup(proxy, "config_reload_failed")
    cfg.write_text(good)
    done = await _sighup(proxy, "config_reloaded")
    assert done["unchanged"] is True and done["changed"] == [], done
    assert 'spiffe_pep_config_reloads_total{result="ok"} 1.0' in await proxy.metrics()
    # Once said: another SIGHUP on the same file is quiet again.
    os.kill(os.getpid(), signal.SIGHUP)
    await trio.sleep(0.5)
    assert len(_events(proxy, "config_reloaded")) == 1


async def test_workers_reload_the_config_on_sighup_to_the_supervisor(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    port = free_port()
    events = tmp_path / "events.jsonl"
    cfg = write_config(
        tmp_path, pki, upstream, listen=f"127.0.0.1:{port}", extra=f"event_log: {events}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def named(name: str) -> list[dict[str, Any]]:
        return [e for e in _lines(events) if e["event"] == name]

    try:
        await wait_listening(port, proc)
        await wait_until(lambda: len(named("listening")) == 2, 15)
        await trio.sleep(0.3)  # the workers' signal handlers are in place
        text = cfg.read_text().replace(f"listen: 127.0.0.1:{port}", f"listen: 127.0.0.1:{port + 1}")
        cfg.write_text(text + "identity_headers: {spiffe_id_header: X-Caller-Id}\n")
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: len(named("config_reloaded")) == 2)
        # A worker's own port and its lack of an admin listener are not edits of the file.
        assert [e["changed"] for e in named("config_reloaded")] == [["identity"]] * 2
        assert [e["settings"] for e in named("config_restart_required")] == [["listen"]] * 2
        done = await trio.run_process(
            ["curl", "-sS", *pki.client_args(), f"https://localhost:{port}/x"],
            capture_stdout=True,
        )
        assert b"x-caller-id" in done.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(proc.wait, 30)
    assert code == 0


async def test_sighup_handlers_are_in_place_when_the_proxy_says_it_serves(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """A SIGHUP sent as soon as the proxy reports serving (a worker's status line,
    /readyz) is handled: a worker ignores it until its handler is in place, and a single
    process would die of it."""
    before = signal.getsignal(signal.SIGHUP)
    await start(nursery, tmp_path, pki, policy_watch="off")  # returns when serve() started
    assert signal.getsignal(signal.SIGHUP) not in (before, signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
