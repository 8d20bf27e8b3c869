"""Watching the files the proxy reloads (the policy, the SVID, key and bundles).

A change is seen through kernel notifications (``proxy.inotify``: the descriptor sits
in trio's own event loop, no thread) as soon as the write lands. A writer may still be
writing then (an editor's save, spiffe-helper rewriting the SVID, the key and the bundle
one after the other, in place), so the reload waits until the files have held still
(same mtime, ctime, size and inode) for ``quiet`` seconds. A half-written file that
fails to parse is not swapped in by the reloader; the rest of the write is a new event,
which tries again.

Each file is watched for writes, and its directory for names appearing and going only:
an atomic save renames another file over it (a new inode, whose watch is then added)
and a Kubernetes ConfigMap swaps a ``..data`` symlink beside it. Only the files' names
and ``..``-prefixed names pass, and a busy log file in the same directory makes the
kernel report nothing at all (the directory is not watched for writes).

Without inotify (no instance left, a filesystem without it) the watch falls back to
polling: a change is reloaded once it has held still for one ``quiet`` interval.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from proxy import inotify

# Set (not "0") to poll instead: a network filesystem, whose remote writes inotify does
# not see. The second name is the one watchfiles read, kept for existing deployments.
FORCE_POLLING = ("SPIFFE_PEP_FORCE_POLLING", "WATCHFILES_FORCE_POLLING")
RECHECK_MS = 1000  # with no event, wake this often: the paths may have changed (SIGHUP)

Paths = Callable[[], list[Path]]
Signature = tuple[tuple[int, int, int, int] | None, ...]


def signature(paths: list[Path]) -> Signature:
    """What tells that a file changed: (mtime, ctime, size, inode), None when absent."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(out)


async def settle(paths: Paths, quiet: float) -> Signature:
    """Wait until the files have held still for ``quiet`` seconds; their signature."""
    seen = signature(paths())
    while True:
        await trio.sleep(quiet)
        now = signature(paths())
        if now == seen:
            return now
        seen = now


async def poll(
    paths: Paths,
    interval: float,
    on_change: Callable[[], object],
    applied: Signature | None = None,
) -> None:
    """The fallback: call ``on_change`` once the files changed and then held still for
    one interval. ``paths`` is asked on every poll (a reload may name other files).
    ``applied``: the signature last applied, when polling takes over from a kernel
    watch; a change it had not applied yet is then applied too."""
    seen = signature(paths())
    pending = applied is not None and seen != applied
    while True:
        await trio.sleep(interval)
        now = signature(paths())
        if now != seen:
            seen, pending = now, True
        elif pending:
            pending = False
            on_change()


async def watch(
    paths: Paths,
    quiet: float,
    on_change: Callable[[], object],
    on_polling: Callable[[str], object] | None = None,
    *,
    kernel: bool = True,
) -> None:
    """Call ``on_change`` after each change of the files ``paths`` names, once they have
    held still for ``quiet`` seconds; forever. Kernel notifications when ``kernel`` and
    available, else polling (``on_polling`` is told why)."""
    applied = signature(paths())
    forced = next((v for v in FORCE_POLLING if os.environ.get(v, "") not in ("", "0")), None)
    if kernel and forced is not None:
        kernel = False
        if on_polling is not None:
            on_polling(f"{forced} is set")
    if kernel:
        try:
            while True:
                applied = await _notified(paths, quiet, on_change, applied)
        except _Unavailable as exc:
            applied = exc.applied
            if on_polling is not None:
                on_polling(str(exc))
    await poll(paths, quiet, on_change, applied)


class _Unavailable(Exception):
    """The kernel watch could not start or broke: poll instead, from ``applied`` (the
    signature last applied), so a change seen but not applied yet is not lost."""

    def __init__(self, reason: str, applied: Signature) -> None:
        super().__init__(reason)
        self.applied = applied


def _directories(paths: list[Path]) -> tuple[tuple[str, int], ...]:
    out = set()
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            out.add((directory, os.stat(directory).st_ino))
        except OSError:
            out.add((directory, 0))
    return tuple(sorted(out))


async def _notified(
    paths: Paths, quiet: float, on_change: Callable[[], object], applied: Signature
) -> Signature:
    """Watch the directories of ``paths`` until they change (another file named, a
    directory replaced); return the signature last applied."""
    files = paths()
    directories = _directories(files)
    names = {os.path.abspath(p) for p in files}
    try:
        watcher = inotify.Inotify()
    except OSError as exc:
        raise _Unavailable(f"{type(exc).__name__}: {exc}", applied) from exc
    try:
        dirs: dict[int, str] = {}
        for directory, _ in directories:
            try:
                dirs[watcher.add(directory, inotify.DIRECTORY)] = directory
            except inotify.Unavailable as exc:
                raise _Unavailable(str(exc), applied) from exc
            except OSError:
                pass  # not there (yet): polled by the signature every RECHECK_MS

        def watch_files() -> None:
            # Again after every event: an atomic save or a ConfigMap swap puts a new
            # inode behind the name, and a watch follows the inode.
            for name in names:
                try:
                    watcher.add(name, inotify.FILE)
                except inotify.Unavailable as exc:
                    raise _Unavailable(str(exc), applied) from exc
                except OSError:
                    pass  # not there: its directory reports it appearing

        def ours(event: inotify.Event) -> bool:
            directory = dirs.get(event.wd)
            if directory is None:
                return True  # a watched file, or the queue overflowed
            if not event.name:
                return True  # the directory itself was removed or moved
            return os.path.join(directory, event.name) in names or event.name.startswith("..")

        watch_files()
        while True:
            with trio.move_on_after(RECHECK_MS / 1000):
                await trio.lowlevel.wait_readable(watcher.fd)
            batch = [e for e in watcher.read() if ours(e)]
            now = paths()
            if _directories(now) != directories:
                return applied
            # No event (a timeout): a change notified nowhere still counts.
            if batch or signature(now) != applied:
                seen = await settle(paths, quiet)
                if seen != applied:
                    applied = seen
                    on_change()
                watch_files()  # after applying: a failure here loses no change
                watcher.read()  # what the settling saw already
    finally:
        trio.lowlevel.notify_closing(watcher.fd)
        watcher.close()
