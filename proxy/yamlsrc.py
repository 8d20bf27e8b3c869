"""YAML with source positions: every value keeps the line and column it came from.

``load(text, filename)`` returns plain Python data plus a :class:`Source` that turns a
data path such as ``("routes", 2, "allow", 0)`` into ``file:line:column``. Duplicate
mapping keys are errors (PyYAML silently keeps the last one, which hides typos in a
policy). Only the safe YAML subset is understood. Opens no files.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy.errors import ConfigError

Path = tuple[str | int, ...]


@dataclass
class Source:
    """Positions of the values of one YAML document."""

    filename: str
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    error_cls: type[ConfigError] = ConfigError

    def at(self, path: Path) -> str:
        """``file:line:column`` of ``path``, or of its nearest located ancestor."""
        for end in range(len(path), -1, -1):
            mark = self.marks.get(path[:end])
            if mark:
                return f"{self.filename}:{mark[0]}:{mark[1]}"
        return self.filename

    def error(self, path: Path, message: str) -> ConfigError:
        """An error naming the position and the data path (``routes[2].allow[0]``)."""
        where = describe(path)
        return self.error_cls(self.at(path), f"{where}: {message}" if where else message)


def describe(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def load(
    text: str | bytes, filename: str, cls: type[ConfigError] = ConfigError
) -> tuple[Any, Source]:
    """Parse one YAML document; raise :class:`ConfigError` with file:line:column."""
    source = Source(filename, error_cls=cls)
    if isinstance(text, bytes):
        _check_utf8(text, filename, cls)  # PyYAML reads the bytes: its offsets are in them
    try:
        # libyaml's C composer when PyYAML has it (10x faster on large policies), else Python.
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if node is None:
            return None, source
        # Constructing a scalar can fail too (an unknown tag such as ``!x``).
        return _convert(node, (), source, yaml.SafeLoader("")), source
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise cls(where, f"invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.reader.ReaderError as exc:  # control characters (UTF-8 is checked above)
        before = text[: exc.position]
        newline = "\n" if isinstance(before, str) else b"\n"
        line = before.count(newline) + 1  # type: ignore[arg-type]
        column = exc.position - before.rfind(newline)  # type: ignore[arg-type]
        char = exc.character
        what = f"byte 0x{char:02x}" if isinstance(char, int) else f"character {char!r}"
        raise cls(f"{filename}:{line}:{column}", f"invalid YAML: {exc.reason} ({what})") from exc
    except yaml.YAMLError as exc:
        raise cls(filename, f"invalid YAML: {' '.join(str(exc).split())}") from exc


def _check_utf8(data: bytes, filename: str, cls: type[ConfigError]) -> None:
    """An error at the first byte that is not UTF-8 (PyYAML would take a UTF-16
    byte-order mark as a reason to read UTF-16, and report a Latin-1 byte as 'byte
    0x-1')."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise cls(
            f"{filename}:1:1",
            "the file is UTF-16 (it starts with a byte-order mark): save it as UTF-8",
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - before.rfind(b"\n")
        raise cls(
            f"{filename}:{line}:{column}",
            f"not UTF-8 (byte 0x{data[exc.start]:02x}): save the file as UTF-8",
        ) from None


def _convert(node: yaml.Node, path: Path, source: Source, constructor: yaml.SafeLoader) -> Any:
    source.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)  # resolves YAML merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable) or isinstance(key, list | dict):
                raise source.error(path, "mapping keys must be plain values")
            if key in out:
                cls_ = source.error_cls
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                raise cls_(f"{source.filename}:{line}:{col}", f"duplicate key {key!r}")
            child = (*path, str(key))
            out[key] = _convert(value_node, child, source, constructor)
            # Point errors about a key at the key itself, values at the value.
            source.marks.setdefault(
                (*child, "<key>"), (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            )
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, (*path, i), source, constructor) for i, v in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)
