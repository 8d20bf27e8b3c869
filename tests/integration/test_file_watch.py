"""The policy file is watched with kernel notifications: an edit is in force within a
fraction of a second, a half-written file is never tried while it keeps changing, one
that fails to parse is tried again on the next change, an atomic rename is seen, and
polling still works where inotify is not available."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import trio

from proxy import filewatch, inotify
from tests.conftest import CLIENT_ID, Pki
from tests.integration.harness import POLICY, Proxy, start, wait_until


def _events(proxy: Proxy, name: str) -> list[dict[str, object]]:
    return [e for e in proxy.events() if e["event"] == name]


REVOKED = f'revoked: {{ids: ["{CLIENT_ID}"]}}\n' + POLICY


async def test_policy_edit_is_in_force_well_within_a_second(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, policy_watch="50ms")
    await trio.sleep(0.2)  # the watch is up
    old = proxy.rt.policy
    for i in range(3):
        written = time.monotonic()
        (tmp_path / "policy.yaml").write_text(REVOKED + f"# edit {i}\n")
        await wait_until(lambda: proxy.rt.policy is not old, timeout=2, interval=0.005)  # noqa: B023
        assert time.monotonic() - written < 1.0
        old = proxy.rt.policy
    assert CLIENT_ID in proxy.rt.policy.revoked_ids
    assert not _events(proxy, "file_watch_polling")


async def test_a_file_still_being_written_is_not_tried(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, policy_watch="300ms")
    await trio.sleep(0.2)
    path = tmp_path / "policy.yaml"
    with path.open("w") as f:  # in place, in two parts, as a slow writer does
        f.write(REVOKED[:40])  # not a valid policy
        f.flush()
        await trio.sleep(0.1)
        f.write(REVOKED[40:])
    await wait_until(lambda: _events(proxy, "policy_reloaded"))
    assert not _events(proxy, "policy_reload_failed")
    assert CLIENT_ID in proxy.rt.policy.revoked_ids


async def test_a_bad_file_is_tried_again_on_the_next_change(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    proxy = await start(nursery, tmp_path, pki, policy_watch="50ms")
    await trio.sleep(0.2)
    path = tmp_path / "policy.yaml"
    path.write_text(REVOKED[:40])
    await wait_until(lambda: _events(proxy, "policy_reload_failed"))
    assert proxy.rt.policy.revoked_ids == frozenset()  # never swapped in
    path.write_text(REVOKED)
    await wait_until(lambda: _events(proxy, "policy_reloaded"))
    assert CLIENT_ID in proxy.rt.policy.revoked_ids


async def test_an_atomic_rename_is_seen(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    proxy = await start(nursery, tmp_path, pki, policy_watch="50ms")
    await trio.sleep(0.2)
    tmp = tmp_path / ".policy.yaml.tmp"
    tmp.write_text(REVOKED)
    os.replace(tmp, tmp_path / "policy.yaml")
    await wait_until(lambda: CLIENT_ID in proxy.rt.policy.revoked_ids, timeout=3)


async def test_polling_where_there_are_no_kernel_notifications(tmp_path: Path) -> None:
    path = tmp_path / "watched"
    path.write_text("one")
    calls: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: filewatch.watch(
                lambda: [path], 0.05, lambda: calls.append(time.monotonic()), kernel=False
            )
        )
        await trio.sleep(0.1)
        path.write_text("two, longer")
        await wait_until(lambda: calls)
        await trio.sleep(0.3)
        assert len(calls) == 1  # once per change
        nursery.cancel_scope.cancel()


async def test_kernel_watch_stops_promptly_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "watched"
    path.write_text("one")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(filewatch.watch, lambda: [path], 0.05, lambda: None)
        await trio.sleep(0.2)
        started = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - started < 0.5


def test_a_busy_file_beside_the_watched_one_is_not_reported(tmp_path: Path) -> None:
    """The decision log often sits beside the policy: its writes must not wake the
    watch (the kernel reports nothing), while the policy's own write and an atomic
    rename over it are reported."""
    policy, log = tmp_path / "policy.yaml", tmp_path / "decisions.jsonl"
    policy.write_text("one")
    log.write_text("")  # created before: its creation is a name appearing
    watcher = inotify.Inotify()
    try:
        d = watcher.add(str(tmp_path), inotify.DIRECTORY)
        f = watcher.add(str(policy), inotify.FILE)
        with log.open("a") as out:
            for i in range(200):
                out.write(f"line {i}\n")
                out.flush()
        assert watcher.read() == []
        policy.write_text("two")
        assert {e.wd for e in watcher.read()} == {f}
        tmp = tmp_path / ".policy.yaml.tmp"
        tmp.write_text("three")
        os.replace(tmp, policy)
        events = watcher.read()
        assert inotify.Event(d, inotify.IN_MOVED_TO, "policy.yaml") in events
    finally:
        watcher.close()


async def test_polling_can_be_forced_for_network_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPIFFE_PEP_FORCE_POLLING", "1")
    path = tmp_path / "watched"
    path.write_text("one")
    why: list[str] = []
    calls: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            filewatch.watch, lambda: [path], 0.05, lambda: calls.append(1.0), why.append
        )
        await trio.sleep(0.1)
        path.write_text("two, longer")
        await wait_until(lambda: calls)
        nursery.cancel_scope.cancel()
    assert why == ["SPIFFE_PEP_FORCE_POLLING is set"]


async def test_a_change_is_not_lost_when_the_kernel_runs_out_of_watches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atomic save needs a watch for the new inode; with fs.inotify.max_user_watches
    used up that fails (ENOSPC) and the watch falls back to polling. The change that
    was being applied is applied, not taken for the polling's starting point."""
    path = tmp_path / "policy.yaml"
    path.write_text("one")
    real_add = inotify.Inotify.add
    file_watches = [0]

    def add(self: inotify.Inotify, name: str, mask: int) -> int:
        if mask == inotify.FILE:
            file_watches[0] += 1
            if file_watches[0] > 1:  # the renamed-in inode: no watch left
                raise inotify.Unavailable(errno.ENOSPC, "inotify_add_watch: no space left")
        return real_add(self, name, mask)

    monkeypatch.setattr(inotify.Inotify, "add", add)
    seen: list[str] = []
    why: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            filewatch.watch, lambda: [path], 0.05, lambda: seen.append(path.read_text()), why.append
        )
        await trio.sleep(0.2)
        tmp = tmp_path / ".policy.yaml.tmp"
        tmp.write_text("two")
        os.replace(tmp, path)
        await wait_until(lambda: seen, timeout=3)
        path.write_text("three, polled")
        await wait_until(lambda: len(seen) >= 2, timeout=3)
        nursery.cancel_scope.cancel()
    assert seen[:2] == ["two", "three, polled"]
    assert why and "no space left" in why[0]


async def test_a_change_is_not_lost_when_a_new_watch_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watched directory is replaced, and the new watch cannot start (no inotify
    instance left): polling takes over from what was last applied, so the change that
    replaced the directory is applied."""
    d = tmp_path / "conf"
    d.mkdir()
    path = d / "policy.yaml"
    path.write_text("one")
    real_init = inotify.Inotify.__init__
    started = [0]

    def init(self: inotify.Inotify) -> None:
        started[0] += 1
        if started[0] > 1:
            raise inotify.Unavailable(errno.EMFILE, "inotify_init1: too many open files")
        real_init(self)

    monkeypatch.setattr(inotify.Inotify, "__init__", init)
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            filewatch.watch, lambda: [path], 0.05, lambda: seen.append(path.read_text())
        )
        await trio.sleep(0.2)
        new = tmp_path / "conf.new"
        new.mkdir()
        (new / "policy.yaml").write_text("two")
        os.rename(d, tmp_path / "conf.old")
        os.rename(new, d)
        await wait_until(lambda: seen, timeout=5)
        nursery.cancel_scope.cancel()
    assert seen == ["two"]
