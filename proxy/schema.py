"""Small typed readers for YAML data that report errors with file:line:column.

Each reader takes the value, its data path and the :class:`~proxy.yamlsrc.Source`,
and returns the value with a precise type or raises. Unknown keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from proxy.errors import ConfigError
from proxy.yamlsrc import Path, Source, describe

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Reader:
    """Reads one document, raising the error class its source was loaded with."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.cls = source.error_cls

    def fail(self, path: Path, message: str) -> ConfigError:
        return self.source.error(path, message)

    def fail_key(self, path: Path, message: str) -> ConfigError:
        """An error about the mapping key at the end of ``path`` (points at the key)."""
        return self.cls(self.source.at((*path, "<key>")), f"{describe(path)}: {message}")

    def mapping(
        self, value: Any, path: Path, *, required: Iterable[str] = (), optional: Iterable[str] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_kind(value)}")
        required = tuple(required)
        allowed = set(required) | set(optional)
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                where = self.source.at((*path, str(key), "<key>"))
                label = describe((*path, str(key)))
                raise self.cls(where, f"{label}: unknown key {key!r} (expected one of: {hint})")
        for key in required:
            if key not in value:
                raise self.fail(path, f"missing required key {key!r}")
        return value

    def string(self, value: Any, path: Path) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {_kind(value)}")
        return value

    def string_list(self, value: Any, path: Path, *, allow_empty: bool = False) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list of strings, got {_kind(value)}")
        if not value and not allow_empty:
            raise self.fail(path, "the list is empty")
        return [self.string(v, (*path, i)) for i, v in enumerate(value)]

    def integer(self, value: Any, path: Path, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def boolean(self, value: Any, path: Path) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def duration(self, value: Any, path: Path) -> float:
        """A duration with a unit (``500ms``, ``10s``, ``5m``, ``24h``, ``7d``), in seconds."""
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match:
            raise self.fail(
                path, f"expected a duration with a unit such as 10s or 500ms, got {value!r}"
            )
        return float(match.group(1)) * _UNITS[match.group(2)]

    def size(self, value: Any, path: Path) -> int:
        """A byte size: an integer, or with a unit (``64KiB``, ``10MiB``)."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if not match:
            raise self.fail(path, f"expected a size such as 65536 or 64KiB, got {value!r}")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"{value!r}", bool: f"{value!r}"}.get(
        type(value), f"{value!r}"
    )
