"""Watching the files the proxy reloads (the policy, the SVID, key and bundles).

A change is seen through kernel notifications (inotify, by watchfiles' watcher, whose
blocking wait anyio runs in a thread under trio), within ``STEP_MS`` or two of the write.
A writer may still be writing then (an editor's save, spiffe-helper rewriting the SVID,
the key and the bundle one after the other, in place), so the reload waits until the
files have held still (same mtime, ctime, size and inode) for ``quiet`` seconds. A
half-written file that fails to parse is not swapped in by the reloader; the rest of the
write is a new event, which tries again.

What is watched is each file's directory, not the file: an atomic save renames another
file over it (a new inode, which a watch on the old one would never report) and a
Kubernetes ConfigMap swaps a ``..data`` symlink beside it. Only events for the files and
for ``..``-prefixed names pass, so a busy log file in the same directory wakes nothing.

Without inotify (no instance left, a filesystem without it) the watch falls back to
polling: a change is reloaded once it has held still for one ``quiet`` interval.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import trio
import watchfiles

STEP_MS = 20  # how often the watch thread looks at what the kernel reported
RECHECK_MS = 1000  # with no event, wake this often: the paths may have changed (SIGHUP)
DEBOUNCE_MS = 200  # at most this long gathering a burst of events before waking

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


async def poll(paths: Paths, interval: float, on_change: Callable[[], object]) -> None:
    """The fallback: call ``on_change`` once the files changed and then held still for
    one interval. ``paths`` is asked on every poll (a reload may name other files)."""
    seen = signature(paths())
    pending = False
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
    if kernel:
        try:
            while True:
                applied = await _notified(paths, quiet, on_change, applied)
        except _Unavailable as exc:
            if on_polling is not None:
                on_polling(str(exc))
    await poll(paths, quiet, on_change)


class _Unavailable(Exception):
    """The kernel watch could not start or broke: poll instead."""


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
    watched = {d for d, _ in directories}

    def ours(_change: watchfiles.Change, path: str) -> bool:
        directory, name = os.path.split(path)
        return path in names or (directory in watched and name.startswith(".."))

    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        stop = anyio.Event()

        async def stop_when_cancelled() -> None:
            # The watch thread cannot be cancelled: it looks at this event every step.
            try:
                await trio.sleep_forever()
            finally:
                stop.set()

        nursery.start_soon(stop_when_cancelled)
        changes = watchfiles.awatch(
            *sorted(watched),
            watch_filter=ours,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            rust_timeout=RECHECK_MS,
            yield_on_timeout=True,
            recursive=False,
            stop_event=stop,
        )
        try:
            while True:
                try:
                    batch = await changes.__anext__()
                except StopAsyncIteration:  # stopped: only when cancelled
                    await trio.lowlevel.checkpoint()
                    break
                except (OSError, RuntimeError) as exc:  # no inotify, or the watch broke
                    failure = exc
                    break
                now = paths()
                if _directories(now) != directories:
                    break
                # No event (a timeout): a change notified nowhere still counts.
                if batch or signature(now) != applied:
                    seen = await settle(paths, quiet)
                    if seen != applied:
                        applied = seen
                        on_change()
        finally:
            await changes.aclose()
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise _Unavailable(f"{type(failure).__name__}: {failure}")
    return applied
