"""Results as a readable table (the default), CSV or JSON. Pure: returns text.

Each command turns its result into ``Table`` values for text and CSV (CSV carries one
table, the command's main one, with lists joined by ``;``) and into plain data for JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    empty: str = "(none)"


def cell(value: Any, sep: str = ", ") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if sep == ", " else str(value)
    if isinstance(value, list | tuple):
        return sep.join(cell(v, sep) for v in value) or "-"
    return str(value)


def text(tables: Sequence[Table], notes: Sequence[str] = ()) -> str:
    """Tables with aligned columns (numbers right-aligned), then notes."""
    out: list[str] = []
    for t in tables:
        out.append(t.title)
        if not t.rows:
            out.append(f"  {t.empty}")
            out.append("")
            continue
        cells = [[cell(v) for v in row] for row in t.rows]
        numeric = [
            all(isinstance(row[i], int) and not isinstance(row[i], bool) for row in t.rows)
            for i in range(len(t.columns))
        ]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(t.columns)]
        out.append(_line(list(t.columns), widths, numeric))
        out.extend(_line(r, widths, numeric) for r in cells)
        out.append("")
    out.extend(notes)
    return "\n".join(out).rstrip() + "\n"


def _line(values: Sequence[str], widths: Sequence[int], numeric: Sequence[bool]) -> str:
    parts = [
        v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
    ]
    return ("  " + "  ".join(parts)).rstrip()


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if v is None else cell(v, ";") for v in row])
    return buf.getvalue()


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def render(fmt: str, tables: Sequence[Table], data: Any, notes: Sequence[str] = ()) -> str:
    """The output in ``fmt``: CSV is the first table."""
    if fmt == "json":
        return json_text(data)
    if fmt == "csv":
        return csv_text(tables[0])
    return text(tables, notes)
