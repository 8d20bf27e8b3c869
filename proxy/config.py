"""The runtime configuration (ops-owned; read at start). Validates; opens no sockets.

``parse_config`` takes the file's bytes; relative paths are resolved against the
directory of the config file. Every duration has a unit; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy import canonical, override, xfcc
from proxy.errors import SpiffeIdError
from proxy.policy.patterns import IdentityPattern, read_patterns
from proxy.schema import Reader
from proxy.spiffe_id import TrustDomain
from proxy.yamlsrc import Path as DataPath
from proxy.yamlsrc import load


@dataclass(frozen=True)
class Upstream:
    """An upstream, optionally over mTLS (``https://``): the proxy presents its own SVID
    and requires the upstream's SVID to match ``expect``."""

    name: str
    host: str
    port: int
    url: str
    tls: bool = False
    expect: tuple[IdentityPattern, ...] = ()
    server_name: str | None = None
    client_cert_headers: bool = False  # RFC 9440 Client-Cert / Client-Cert-Chain
    assertion_header: str | None = None
    assertion_ttl: float = 30.0
    path_params: bool = False  # ``path_params: keep``: forward ;parameters (else refuse them)
    case_insensitive: bool = False  # ``case_insensitive_paths``: routes match folded paths

    @property
    def rules(self) -> canonical.UpstreamRules:
        return canonical.UpstreamRules(self.path_params, self.case_insensitive)


@dataclass(frozen=True)
class IdentityHeaders:
    xfcc: str = "sanitize_set"
    xfcc_fields: tuple[str, ...] = ("By", "Hash", "URI")
    spiffe_id_header: str = "X-Client-Spiffe-Id"
    trusted_forwarders: tuple[IdentityPattern, ...] = ()


@dataclass(frozen=True)
class HttpRules:
    """The ``http:`` section: what of a client's request head reaches an upstream."""

    underscores_in_headers: str = "drop"  # drop | pass | refuse
    remove_headers: tuple[str, ...] = canonical.DEFAULT_REMOVE
    upgrade_protocols: tuple[str, ...] = ("websocket",)
    method_override_params: tuple[str, ...] = ("_method",)


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    request_head: float = 10.0
    idle: float = 60.0
    upstream_connect: float = 5.0
    upstream_response: float = 30.0
    drain: float = 30.0
    # After SIGTERM: go on accepting (readyz 503 "draining", every response with
    # Connection: close) this long, so a load balancer stops sending first; then drain.
    shutdown_grace: float = 0.0
    tunnel_idle: float = 600.0  # an Upgrade tunnel with no byte either way is closed
    client_write: float = 30.0  # a client that takes no byte of a response this long is cut
    max_connection_age: float = 3600.0  # keep-alive: close after the request in progress


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_idle_upstream_connections: int = 64
    max_connections: int = 10_000
    max_body_bytes: int | None = None  # None: no limit
    max_handshakes: int = 1_000  # TLS handshakes (and PROXY headers) in flight
    max_handshakes_per_source: int = 32  # the same, per client address
    min_body_rate: int = 1024  # bytes/s a request body must average after request_head


@dataclass(frozen=True)
class TlsFiles:
    """Where the proxy's SVID, key and bundles come from: files (spiffe-helper's layout),
    or a SPIRE agent's Workload API (``workload_api``), with files adding bundles."""

    svid: Path | None
    key: Path | None
    bundles: dict[TrustDomain, Path]
    jwt_bundles: dict[TrustDomain, Path] = field(default_factory=dict)
    watch: float | None = 1.0  # reload once the files held still this long; None: SIGHUP only
    workload_api: str | None = None  # unix:///path or tcp://ip:port
    # How long start-up waits for the SVID: files not written yet (spiffe-helper starts
    # beside the proxy), or the Workload API's first answer. 0: fail at once.
    wait_for_svid: float = 30.0

    @property
    def files(self) -> list[Path]:
        own = [self.svid, self.key] if self.svid and self.key else []
        return [*own, *self.bundles.values(), *self.jwt_bundles.values()]


AUTO_WORKERS = 0  # ``workers: auto``: resolved at start (``proxy.cpus``), not here


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    tls: TlsFiles
    upstreams: dict[str, Upstream]
    policy_path: Path
    identity: IdentityHeaders = field(default_factory=IdentityHeaders)
    decision_log: str = "stdout"
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    source: str = "<config>"
    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    policy_watch: float | None = 0.05  # reload once the policy held still this long
    assertion_key: Path | None = None
    proxy_protocol: bool = False
    workers: int = 1  # AUTO_WORKERS ("auto" in YAML): one per CPU the process may use
    http: HttpRules = field(default_factory=HttpRules)
    admin_hosts: tuple[str, ...] = ()  # Host names the admin listener answers, beside loopback
    event_log: str = "stderr"  # operational events: stdout, stderr or a file path
    # What subject-drift detection learned (SQLite, shared by workers). None: kept in
    # each process's memory only.
    drift_store: Path | None = None

    def canonical_rules(self) -> canonical.Rules:
        """How this proxy canonicalises requests (``proxy.canonical``)."""
        owned = {canonical.spelling(self.identity.spiffe_id_header)}
        owned |= {
            canonical.spelling(u.assertion_header)
            for u in self.upstreams.values()
            if u.assertion_header
        }
        return canonical.Rules(
            owned=frozenset(owned),
            remove=frozenset(canonical.spelling(h) for h in self.http.remove_headers),
            underscores=self.http.underscores_in_headers,
            path_params=any(u.path_params for u in self.upstreams.values()),
            max_header_bytes=self.limits.max_header_bytes,
            max_body_bytes=self.limits.max_body_bytes,
            upgrades=frozenset(p.lower().encode("ascii") for p in self.http.upgrade_protocols),
            # as PHP registers them, the form override_param compares in
            override_params=frozenset(
                override.php_names(n)[1] for n in self.http.method_override_params
            ),
        )

    def upstream_rules(self) -> dict[str, canonical.UpstreamRules]:
        return {name: u.rules for name, u in self.upstreams.items()}

    @property
    def spiffe_id_header(self) -> str:
        return self.identity.spiffe_id_header


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _header_name(r: Reader, value: Any, where: DataPath) -> str:
    name = r.string(value, where)
    if not all(c.isalnum() or c == "-" for c in name):
        raise r.fail(where, f"not a valid header name: {name!r}")
    return name


def _upstream(r: Reader, name: str, spec: Any) -> Upstream:
    where: DataPath = ("upstreams", name)
    u = r.mapping(
        spec,
        where,
        required=["url"],
        optional=[
            "tls",
            "client_cert_headers",
            "assertion",
            "path_params",
            "case_insensitive_paths",
        ],
    )
    url = r.string(u["url"], (*where, "url"))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise r.fail((*where, "url"), f"expected http(s)://host:port with no path, got {url!r}")
    tls = parts.scheme == "https"
    expect: tuple[IdentityPattern, ...] = ()
    server_name = None
    if tls:
        if "tls" not in u:
            raise r.fail(where, "an https upstream needs tls: {expect: <SPIFFE ID or pattern>}")
        t = r.mapping(u["tls"], (*where, "tls"), required=["expect"], optional=["server_name"])
        raw = t["expect"] if isinstance(t["expect"], list) else [t["expect"]]
        expect = read_patterns(r, raw, (*where, "tls", "expect"))
        if "server_name" in t:
            server_name = r.string(t["server_name"], (*where, "tls", "server_name"))
    elif "tls" in u:
        raise r.fail((*where, "tls"), "tls settings need an https:// url")
    cch = (
        r.boolean(u["client_cert_headers"], (*where, "client_cert_headers"))
        if "client_cert_headers" in u
        else False
    )
    header, ttl = None, 30.0
    if "assertion" in u:
        a = r.mapping(u["assertion"], (*where, "assertion"), optional=["header", "ttl"])
        header = _header_name(
            r, a.get("header", "X-Spiffe-Pep-Assertion"), (*where, "assertion", "header")
        )
        if "ttl" in a:
            ttl = r.duration(a["ttl"], (*where, "assertion", "ttl"))
            if not 0 < ttl <= 60:
                raise r.fail((*where, "assertion", "ttl"), "an assertion lives at most 60s")
    params = u.get("path_params", "refuse")
    if params not in ("refuse", "keep"):
        raise r.fail(
            (*where, "path_params"), f"path_params is 'refuse' (default) or 'keep', got {params!r}"
        )
    folded = (
        r.boolean(u["case_insensitive_paths"], (*where, "case_insensitive_paths"))
        if "case_insensitive_paths" in u
        else False
    )
    return Upstream(
        name,
        parts.hostname,
        parts.port or (443 if tls else 80),
        url,
        tls,
        expect,
        server_name,
        cch,
        header,
        ttl,
        params == "keep",
        folded,
    )


def _http(r: Reader, value: Any) -> HttpRules:
    if value is None:
        return HttpRules()
    base: DataPath = ("http",)
    h = r.mapping(
        value,
        base,
        optional=[
            "underscores_in_headers",
            "remove_headers",
            "upgrade_protocols",
            "method_override_params",
        ],
    )
    mode = h.get("underscores_in_headers", "drop")
    if mode not in canonical.UNDERSCORES:
        raise r.fail(
            (*base, "underscores_in_headers"),
            f"underscores_in_headers is one of {', '.join(canonical.UNDERSCORES)}; got {mode!r}",
        )
    remove: tuple[str, ...] = canonical.DEFAULT_REMOVE
    if "remove_headers" in h:
        where: DataPath = (*base, "remove_headers")
        items = r.string_list(h["remove_headers"], where, allow_empty=True)
        remove = tuple(_header_name(r, name, (*where, i)) for i, name in enumerate(items))
    upgrades: tuple[str, ...] = ("websocket",)
    if "upgrade_protocols" in h:
        where = (*base, "upgrade_protocols")
        items = r.string_list(h["upgrade_protocols"], where, allow_empty=True)
        upgrades = tuple(_header_name(r, p, (*where, i)) for i, p in enumerate(items))
    overrides: tuple[str, ...] = ("_method",)
    if "method_override_params" in h:
        where = (*base, "method_override_params")
        overrides = tuple(r.string_list(h["method_override_params"], where, allow_empty=True))
    return HttpRules(str(mode), remove, upgrades, overrides)


def _identity_headers(r: Reader, value: Any) -> IdentityHeaders:
    if value is None:
        return IdentityHeaders()
    base: DataPath = ("identity_headers",)
    ih = r.mapping(
        value, base, optional=["xfcc", "xfcc_fields", "spiffe_id_header", "trusted_forwarders"]
    )
    out = IdentityHeaders()
    mode = ih.get("xfcc", out.xfcc)
    if mode not in xfcc.MODES:
        raise r.fail((*base, "xfcc"), f"xfcc must be one of {', '.join(xfcc.MODES)}; got {mode!r}")
    fields = out.xfcc_fields
    if "xfcc_fields" in ih:
        fields = tuple(r.string_list(ih["xfcc_fields"], (*base, "xfcc_fields")))
        for i, f in enumerate(fields):
            if f not in xfcc.FIELDS:
                raise r.fail(
                    (*base, "xfcc_fields", i),
                    f"unknown XFCC field {f!r} (known: {', '.join(xfcc.FIELDS)})",
                )
    header = (
        _header_name(r, ih["spiffe_id_header"], (*base, "spiffe_id_header"))
        if "spiffe_id_header" in ih
        else out.spiffe_id_header
    )
    trusted = read_patterns(r, ih.get("trusted_forwarders", []), (*base, "trusted_forwarders"))
    return IdentityHeaders(str(mode), fields, header, trusted)


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
            "event_log",
            "admin",
            "policy_watch",
            "assertion_key",
            "proxy_protocol",
            "workers",
            "http",
            "admin_hosts",
            "drift_store",
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
        top["tls"],
        ("tls",),
        optional=[
            "svid",
            "key",
            "bundles",
            "jwt_bundles",
            "watch",
            "workload_api",
            "wait_for_svid",
        ],
    )
    workload_api = None
    if "workload_api" in t:
        workload_api = r.string(t["workload_api"], ("tls", "workload_api"))
        if not workload_api.startswith(("unix://", "tcp://")):
            raise r.fail(
                ("tls", "workload_api"),
                f"expected unix:///path/agent.sock or tcp://ip:port, got {workload_api!r}",
            )
        for key in ("svid", "key"):
            if key in t:
                raise r.fail(
                    ("tls", key), "the SVID comes from the Workload API: no svid/key files"
                )
    else:
        for key in ("svid", "key", "bundles"):
            if key not in t:
                raise r.fail(("tls",), f"missing required key {key!r} (or use workload_api)")

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
    if not bundles and workload_api is None:
        raise r.fail(("tls", "bundles"), "at least one trust domain bundle is needed")
    tls = TlsFiles(
        path(t["svid"], ("tls", "svid")) if "svid" in t else None,
        path(t["key"], ("tls", "key")) if "key" in t else None,
        bundles,
        per_domain("jwt_bundles"),
        None
        if t.get("watch", "1s") in (False, "off")
        else r.duration(t.get("watch", "1s"), ("tls", "watch")),
        workload_api,
        r.duration(t["wait_for_svid"], ("tls", "wait_for_svid")) if "wait_for_svid" in t else 30.0,
    )

    ups_raw = r.mapping(top["upstreams"], ("upstreams",), optional=list(top["upstreams"] or {}))
    if not ups_raw:
        raise r.fail(("upstreams",), "at least one upstream is needed")
    upstreams = {str(name): _upstream(r, str(name), spec) for name, spec in ups_raw.items()}
    identity = _identity_headers(r, top.get("identity_headers"))
    assertion_key = (
        path(top["assertion_key"], ("assertion_key",)) if "assertion_key" in top else None
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
        sizes = {k: r.size(v, ("limits", k)) for k, v in lm.items() if k != "max_body_bytes"}
        for k in ("max_connections", "max_handshakes", "max_handshakes_per_source"):
            if sizes.get(k) == 0:
                raise r.fail(("limits", k), f"{k} must be at least 1")
        body = lm.get("max_body_bytes")
        limits = Limits(**sizes)
        if body not in (None, False, "off"):
            limits = dataclasses.replace(
                limits, max_body_bytes=r.size(body, ("limits", "max_body_bytes"))
            )

    def log(key: str, default: str) -> str:
        if key not in top:
            return default
        value = r.string(top[key], (key,))
        return value if value in ("stdout", "stderr") else str(path(value, (key,)))

    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    # YAML 1.1 reads a bare `off` as false: both mean "disabled".
    if "admin" in top:
        if top["admin"] in (False, "off"):
            admin = None
        else:
            try:
                admin = parse_address(r.string(top["admin"], ("admin",)))
            except ValueError as exc:
                raise r.fail(("admin",), f"{exc} (or off)") from None
    policy_watch: float | None = Config.policy_watch
    if "policy_watch" in top:
        value = top["policy_watch"]
        policy_watch = None if value in (False, "off") else r.duration(value, ("policy_watch",))

    decision_log = log("decision_log", "stdout")
    return Config(
        host,
        port,
        tls,
        upstreams,
        path(top["policy"], ("policy",)),
        identity,
        decision_log,
        timeouts,
        limits,
        filename,
        admin,
        policy_watch,
        assertion_key,
        r.boolean(top["proxy_protocol"], ("proxy_protocol",)) if "proxy_protocol" in top else False,
        _workers(r, top.get("workers", "auto")),
        _http(r, top.get("http")),
        tuple(
            h.lower()
            for h in r.string_list(top.get("admin_hosts", []), ("admin_hosts",), allow_empty=True)
        ),
        event_log=log("event_log", "stderr"),
        drift_store=_drift_store(top, decision_log, path),
    )


def _drift_store(top: dict[str, Any], decision_log: str, path: Any) -> Path | None:
    """``drift_store``: a path, or ``memory``; by default ``drift.sqlite`` beside the
    decision log when that is a file, else memory."""
    if "drift_store" not in top:
        if decision_log in ("stdout", "stderr"):
            return None
        return Path(decision_log).parent / "drift.sqlite"
    value = top["drift_store"]
    if value in (False, "off", "memory"):
        return None
    return Path(path(value, ("drift_store",)))


def _workers(r: Reader, value: Any) -> int:
    if value == "auto":
        return AUTO_WORKERS
    return r.integer(value, ("workers",), minimum=1)
