"""The runtime configuration (ops-owned; read at start). Validates; opens no sockets.

``parse_config`` takes the file's bytes; relative paths are resolved against the
directory of the config file. Every duration has a unit; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.errors import SpiffeIdError
from proxy.schema import Reader
from proxy.spiffe_id import TrustDomain
from proxy.yamlsrc import Path as DataPath
from proxy.yamlsrc import load


@dataclass(frozen=True)
class Upstream:
    name: str
    host: str
    port: int
    url: str


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    request_head: float = 10.0
    idle: float = 60.0
    upstream_connect: float = 5.0
    upstream_response: float = 30.0
    drain: float = 30.0


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_idle_upstream_connections: int = 64


@dataclass(frozen=True)
class TlsFiles:
    svid: Path
    key: Path
    bundles: dict[TrustDomain, Path]
    jwt_bundles: dict[TrustDomain, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    tls: TlsFiles
    upstreams: dict[str, Upstream]
    policy_path: Path
    spiffe_id_header: str = "X-Client-Spiffe-Id"
    decision_log: str = "stdout"
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    source: str = "<config>"
    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    policy_watch: float | None = 1.0


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def load_config(data: bytes, filename: str, base_dir: Path) -> Config:
    doc, source = load(data, filename)
    r = Reader(source)
    if doc is None:
        raise r.fail((), "the configuration is empty")
    top = r.mapping(
        doc,
        (),
        required=["listen", "tls", "upstreams", "policy"],
        optional=[
            "identity_headers",
            "timeouts",
            "limits",
            "decision_log",
            "admin",
            "policy_watch",
        ],
    )

    def path(value: Any, where: tuple[str | int, ...]) -> Path:
        p = Path(r.string(value, where))
        return p if p.is_absolute() else (base_dir / p)

    try:
        host, port = parse_address(r.string(top["listen"], ("listen",)))
    except ValueError as exc:
        raise r.fail(("listen",), str(exc)) from None

    t = r.mapping(
        top["tls"], ("tls",), required=["svid", "key", "bundles"], optional=["jwt_bundles"]
    )

    def per_domain(key: str) -> dict[TrustDomain, Path]:
        raw = t.get(key) or {}
        r.mapping(raw, ("tls", key), optional=list(raw) if isinstance(raw, dict) else [])
        out: dict[TrustDomain, Path] = {}
        for td_text, file in raw.items():
            where: DataPath = ("tls", key, str(td_text))
            try:
                td = TrustDomain.parse(str(td_text))
            except SpiffeIdError as exc:
                raise r.fail_key(where, f"invalid trust domain {td_text!r}: {exc.reason}") from None
            out[td] = path(file, where)
        return out

    bundles = per_domain("bundles")
    if not bundles:
        raise r.fail(("tls", "bundles"), "at least one trust domain bundle is needed")
    tls = TlsFiles(
        path(t["svid"], ("tls", "svid")),
        path(t["key"], ("tls", "key")),
        bundles,
        per_domain("jwt_bundles"),
    )

    ups_raw = r.mapping(top["upstreams"], ("upstreams",), optional=list(top["upstreams"] or {}))
    if not ups_raw:
        raise r.fail(("upstreams",), "at least one upstream is needed")
    upstreams: dict[str, Upstream] = {}
    for name, spec in ups_raw.items():
        where = ("upstreams", str(name))
        u = r.mapping(spec, where, required=["url"])
        url = r.string(u["url"], (*where, "url"))
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise r.fail((*where, "url"), f"expected http://host:port with no path, got {url!r}")
        upstreams[str(name)] = Upstream(str(name), parts.hostname, parts.port or 80, url)

    spiffe_id_header = "X-Client-Spiffe-Id"
    if "identity_headers" in top:
        ih = r.mapping(
            top["identity_headers"], ("identity_headers",), optional=["spiffe_id_header"]
        )
        if "spiffe_id_header" in ih:
            spiffe_id_header = r.string(
                ih["spiffe_id_header"], ("identity_headers", "spiffe_id_header")
            )
            if not all(c.isalnum() or c == "-" for c in spiffe_id_header):
                raise r.fail(
                    ("identity_headers", "spiffe_id_header"),
                    f"not a valid header name: {spiffe_id_header!r}",
                )

    timeouts = Timeouts()
    if "timeouts" in top:
        names = list(Timeouts.__dataclass_fields__)
        tm = r.mapping(top["timeouts"], ("timeouts",), optional=names)
        timeouts = Timeouts(**{k: r.duration(v, ("timeouts", k)) for k, v in tm.items()})

    limits = Limits()
    if "limits" in top:
        names = list(Limits.__dataclass_fields__)
        lm = r.mapping(top["limits"], ("limits",), optional=names)
        limits = Limits(**{k: r.size(v, ("limits", k)) for k, v in lm.items()})

    decision_log = "stdout"
    if "decision_log" in top:
        value = r.string(top["decision_log"], ("decision_log",))
        decision_log = (
            value if value in ("stdout", "stderr") else str(path(value, ("decision_log",)))
        )

    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    if "admin" in top:
        value = r.string(top["admin"], ("admin",))
        try:
            admin = None if value == "off" else parse_address(value)
        except ValueError as exc:
            raise r.fail(("admin",), f"{exc} (or 'off')") from None
    policy_watch: float | None = 1.0
    if "policy_watch" in top:
        value = top["policy_watch"]
        policy_watch = None if value == "off" else r.duration(value, ("policy_watch",))

    return Config(
        host,
        port,
        tls,
        upstreams,
        path(top["policy"], ("policy",)),
        spiffe_id_header,
        decision_log,
        timeouts,
        limits,
        filename,
        admin,
        policy_watch,
    )
