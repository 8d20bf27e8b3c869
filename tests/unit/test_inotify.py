"""Reading inotify's event records (``struct inotify_event``, names NUL-padded)."""

from __future__ import annotations

import struct

import pytest

from proxy.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW, Event, parse


def record(wd: int, mask: int, name: bytes = b"", pad: int = 0) -> bytes:
    raw = name + b"\0" * pad if name or pad else b""
    return struct.pack("iIII", wd, mask, 0, len(raw)) + raw


@pytest.mark.parametrize(
    ("data", "events"),
    [
        (b"", []),
        (record(3, IN_CLOSE_WRITE), [Event(3, IN_CLOSE_WRITE, "")]),
        (record(1, IN_MOVED_TO, b"policy.yaml", 5), [Event(1, IN_MOVED_TO, "policy.yaml")]),
        (
            record(1, IN_MOVED_TO, b"..data", 10) + record(2, IN_CLOSE_WRITE),
            [Event(1, IN_MOVED_TO, "..data"), Event(2, IN_CLOSE_WRITE, "")],
        ),
        (record(-1, IN_Q_OVERFLOW), [Event(-1, IN_Q_OVERFLOW, "")]),
        (record(1, IN_MOVED_TO, b"caf\xc3\xa9", 3), [Event(1, IN_MOVED_TO, "café")]),
        (record(1, IN_MOVED_TO, b"x", 3)[:10], []),  # a truncated record is not read
    ],
)
def test_parse(data: bytes, events: list[Event]) -> None:
    assert parse(data) == events
