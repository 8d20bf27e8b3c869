"""Envoy's ``X-Forwarded-Client-Cert`` format: elements separated by ``,``, each a list
of ``Key=value`` pairs separated by ``;``. A value holding ``,``, ``;``, ``=`` or ``"``
is double-quoted, with ``"`` and ``\\`` escaped by a backslash. Keys in Envoy's order:
By, Hash, Cert, Chain, Subject, URI, DNS.
"""

from __future__ import annotations

from collections.abc import Iterable

_SPECIAL = frozenset(',;="\\')
KEY_ORDER = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")


def quote(value: str) -> str:
    if not _SPECIAL.intersection(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_element(pairs: Iterable[tuple[str, str]]) -> str:
    """One XFCC element: ``By=...;Hash=...;URI=...``."""
    return ";".join(f"{key}={quote(value)}" for key, value in pairs)
