"""JSON-lines writers: the decision log and the operational event log (the only log I/O)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


class JsonLines:
    """Writes one JSON object per line straight to the file descriptor (one ``write``
    each, no user-space buffer), so a crash loses no decision; with O_APPEND, lines from
    several worker processes never interleave."""

    _encode = json.JSONEncoder(separators=(",", ":")).encode
    # Called with each operational event (``event``) after it is written: the admin
    # page's memory of reloads and drift alerts (``Recent.event``).
    tap: Callable[[dict[str, Any]], None] | None = None

    def __init__(self, target: str) -> None:
        self.target = target
        self._owned = target not in ("stdout", "stderr")
        if self._owned:
            self._fd = _open(target)
        else:
            stream: TextIO = sys.stdout if target == "stdout" else sys.stderr
            stream.flush()
            self._fd = stream.fileno()

    @property
    def is_file(self) -> bool:
        """Whether this writes to a file it opened itself (not stdout or stderr)."""
        return self._owned

    def reopen(self) -> None:
        """Open the file by its path again and write there from now on (after logrotate
        renamed it, in its default ``create`` mode); the old descriptor is closed once
        the new one is open, so a failure (OSError) leaves this writing where it was."""
        if not self._owned:
            return
        fd = _open(self.target)
        old, self._fd = self._fd, fd
        os.close(old)

    def write(self, record: dict[str, Any]) -> None:
        data = (self._encode(record) + "\n").encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def event(self, event: str, **fields: Any) -> None:
        """An operational event (start-up, handshake failures, errors) with a timestamp."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        record = {"time": now, "event": event, **fields}
        self.write(record)
        if self.tap is not None:
            self.tap(record)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
