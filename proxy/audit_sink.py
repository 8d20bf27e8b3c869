"""JSON-lines writers: the decision log and the operational event log (the only log I/O)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, TextIO


class JsonLines:
    """Writes one JSON object per line and flushes it, so a crash loses no decision."""

    def __init__(self, target: str) -> None:
        self._owned = target not in ("stdout", "stderr")
        self._out: TextIO = (
            open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            if self._owned
            else (sys.stdout if target == "stdout" else sys.stderr)
        )

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()

    def event(self, event: str, **fields: Any) -> None:
        """An operational event (start-up, handshake failures, errors) with a timestamp."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.write({"time": now, "event": event, **fields})

    def close(self) -> None:
        if self._owned:
            self._out.close()
