"""JSON-lines writers: the decision log and the operational event log (the only log I/O)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Any, TextIO


class JsonLines:
    """Writes one JSON object per line straight to the file descriptor (one ``write``
    each, no user-space buffer), so a crash loses no decision; with O_APPEND, lines from
    several worker processes never interleave."""

    _encode = json.JSONEncoder(separators=(",", ":")).encode

    def __init__(self, target: str) -> None:
        self._owned = target not in ("stdout", "stderr")
        if self._owned:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        else:
            stream: TextIO = sys.stdout if target == "stdout" else sys.stderr
            stream.flush()
            self._fd = stream.fileno()

    def write(self, record: dict[str, Any]) -> None:
        data = (self._encode(record) + "\n").encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def event(self, event: str, **fields: Any) -> None:
        """An operational event (start-up, handshake failures, errors) with a timestamp."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.write({"time": now, "event": event, **fields})

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
