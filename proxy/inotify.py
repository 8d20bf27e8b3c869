"""Linux inotify through ctypes, waited on by trio's own event loop (no thread).

Why not a library: watchfiles (the Rust notify crate) watches a directory for every kind
of change and runs its wait in a thread that wakes every few milliseconds to look for a
stop request. A watched directory that also holds a busy file (the decision log beside
the policy) then woke that thread on every logged request, and each wake took the GIL
from the event loop: 4% of a worker's CPU and a latency tail under load
(loadtests/RESULTS.md). Here a directory is watched only for names appearing and going
(``DIRECTORY``) and each file itself for writes (``FILE``), so the kernel reports
nothing for other files' writes, and the descriptor sits in trio's epoll set: a quiet
watch costs nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# A directory: names created, deleted or renamed in or out (an atomic save, a ConfigMap's
# ``..data`` swap), and the directory itself going away. Not IN_MODIFY: that would report
# every write to every file in it.
DIRECTORY = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
    | IN_ONLYDIR
)  # fmt: skip
# A watched file (followed through symlinks): written, closed after writing, its mode or
# link count changed, or removed.
FILE = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


@dataclass(frozen=True, slots=True)
class Event:
    wd: int
    mask: int
    name: str  # "" for an event on the watched file or directory itself


def parse(data: bytes) -> list[Event]:
    """The events in one ``read`` of an inotify descriptor (``struct inotify_event``s,
    each name NUL-padded to its length)."""
    out = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, size = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw = data[offset : offset + size].split(b"\0", 1)[0]
        offset += size
        out.append(Event(wd, mask, os.fsdecode(raw)))
    return out


class Unavailable(OSError):
    """No inotify here (another OS, no instance left, no watch left)."""


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    if name is None:
        raise Unavailable(errno.ENOSYS, "no C library found")
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        raise Unavailable(errno.ENOSYS, "inotify is not available on this system")
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


class Inotify:
    """One inotify instance: a non-blocking descriptor to wait on and read."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise Unavailable(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        """Watch ``path`` (a watch of the same inode is updated, not added twice);
        its watch descriptor. ``FileNotFoundError`` if it is not there; ``Unavailable``
        when the kernel has no watch left."""
        wd: int = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.ENOSYS):
                raise Unavailable(err, f"inotify_add_watch {path}: {os.strerror(err)}")
            raise OSError(err, os.strerror(err), path)
        return wd

    def read(self) -> list[Event]:
        """The events queued now ([] when there are none)."""
        out: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += parse(data)

    def close(self) -> None:
        os.close(self.fd)
