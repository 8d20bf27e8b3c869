"""JSON-lines writers: the decision log and the operational event log (the only log I/O)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
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

    def __init__(self, target: str, fields: dict[str, Any] | None = None) -> None:
        """``fields`` go on every event line (a worker's name)."""
        self.target = target
        self.fields = dict(fields or {})
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
        self.write_line(self._encode(record))

    def write_line(self, line: str) -> None:
        """One line of JSON, already encoded (ASCII)."""
        data = (line + "\n").encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def event(self, event: str, **fields: Any) -> None:
        """An operational event (start-up, handshake failures, errors) with a timestamp."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        record = {"time": now, "event": event, **self.fields, **fields}
        self.write(record)
        if self.tap is not None:
            self.tap(record)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)


def _traceback(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> str:
    return "".join(traceback.format_exception(tp, value, tb))


class _EventHandler(logging.Handler):
    """A library's log record (py-spiffe, grpc) as a ``log`` event."""

    def __init__(self, events: JsonLines) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {
                "logger": record.name,
                "level": record.levelname,
                "message": record.getMessage(),
            }
            if record.exc_info and record.exc_info[0] is not None:
                fields["traceback"] = _traceback(*record.exc_info)
            self.events.event("log", **fields)
        except Exception:  # a log line must never take the process down
            self.handleError(record)


def python_output_as_events(events: JsonLines) -> None:
    """What Python itself would print as text on stderr, as JSON events instead, so the
    event stream holds nothing but JSON lines: an uncaught exception (``crashed``, also
    in a thread), an exception nobody could raise (``unraisable``), a warning
    (``warning``) and a library's log record at WARNING or above (``log``)."""

    def excepthook(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        events.event(
            "crashed", error=f"{tp.__name__}: {value}", traceback=_traceback(tp, value, tb)
        )

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        value = args.exc_value or args.exc_type()
        events.event(
            "crashed",
            thread=args.thread.name if args.thread else None,
            error=f"{args.exc_type.__name__}: {value}",
            traceback=_traceback(args.exc_type, value, args.exc_traceback),
        )

    def unraisablehook(u: Any) -> None:
        events.event(
            "unraisable",
            error=f"{type(u.exc_value).__name__}: {u.exc_value}",
            message=u.err_msg,
            object=repr(u.object),
        )

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        events.event(
            "warning", category=category.__name__, message=str(message), at=f"{filename}:{lineno}"
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    warnings.showwarning = showwarning
    root = logging.getLogger()
    root.handlers = [_EventHandler(events)]
    root.setLevel(logging.WARNING)
