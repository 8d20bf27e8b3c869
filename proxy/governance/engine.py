"""Reading decision logs: the governance commands' only I/O (with ``commands.py``).

Inputs are any number of files (rotated, gzip-compressed, told by their first bytes
rather than their names) or ``-`` for standard input, which is first copied to a
temporary file so DuckDB can read it in parallel like any other. DuckDB runs the
statements of ``sql.py`` and hands back rows; the logic lives in the pure modules.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb

from proxy.governance import records as R
from proxy.governance import sql

_GZIP_MAGIC = b"\x1f\x8b"


class LogError(Exception):
    """An input that cannot be read (missing file, permission)."""


@dataclass(frozen=True)
class Inputs:
    plain: tuple[str, ...]
    gzipped: tuple[str, ...]

    @property
    def source(self) -> str:
        return sql.source(self.plain, self.gzipped)


def _classify(paths: Iterable[str]) -> Inputs:
    plain: list[str] = []
    gzipped: list[str] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as exc:
            raise LogError(f"cannot read {path}: {exc.strerror}") from exc
        (gzipped if head == _GZIP_MAGIC else plain).append(path)
    return Inputs(tuple(plain), tuple(gzipped))


@contextmanager
def inputs(paths: Sequence[str]) -> Iterator[Inputs]:
    """The inputs named on the command line; ``-`` is standard input (spooled)."""
    spool = None
    try:
        named = []
        for path in paths:
            if path == "-":
                if spool is None:
                    fd, spool = tempfile.mkstemp(prefix="spiffe-pep-stdin-")
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
                named.append(spool)
            else:
                named.append(path)
        yield _classify(named)
    finally:
        if spool is not None:
            os.unlink(spool)


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    # Row order never matters here: aggregating without keeping it needs less memory.
    con.execute("SET preserve_insertion_order = false")
    return con


def _rows(query: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of decision lines, and every line counted by kind."""
    con = _connect()
    try:
        cursor = con.execute(query)
        names = [d[0] for d in cursor.description or ()]
        kinds: dict[str, int] = {}
        out = []
        for row in cursor.fetchall():
            item = dict(zip(names, row, strict=True))
            kind = item["kind"]
            if kind == R.REQUEST:
                out.append(item)
            kinds[kind] = kinds.get(kind, 0) + int(item["n"])
        return out, kinds
    except duckdb.Error as exc:
        raise LogError(f"reading the logs failed: {exc}") from exc
    finally:
        con.close()


def request_groups(
    src: Inputs,
    cutoff: str | None = None,
    revoked_sha256: Iterable[str] = (),
    lifetime_limits: Iterable[float] = (),
) -> tuple[list[R.RequestGroup], R.InputStats]:
    rows, kinds = _rows(sql.request_groups(src.source, cutoff, revoked_sha256, lifetime_limits))
    return [R.RequestGroup.from_row(r) for r in rows], R.InputStats.of(kinds)


def usage(src: Inputs, cutoff: str | None = None) -> tuple[list[R.UsageRow], R.InputStats]:
    rows, kinds = _rows(sql.usage(src.source, cutoff))
    return [R.UsageRow.from_row(r) for r in rows], R.InputStats.of(kinds)
