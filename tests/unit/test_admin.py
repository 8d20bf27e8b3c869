"""Which Host values the admin listener answers to (proxy.admin.host_allowed): one row per
shape, the DNS-rebinding names refused."""

from __future__ import annotations

import pytest

from proxy.admin import LOOPBACK_HOSTS, host_allowed, host_name

ROWS: list[tuple[str, bytes | None, str | None, bool]] = [
    ("ipv4_loopback", b"127.0.0.1", None, True),
    ("ipv4_loopback_with_port", b"127.0.0.1:9901", None, True),
    ("ipv6_loopback", b"[::1]", None, True),
    ("ipv6_loopback_with_port", b"[::1]:9901", None, True),
    ("localhost", b"localhost", None, True),
    ("localhost_with_port", b"localhost:9901", None, True),
    ("localhost_any_case", b"LocalHost:9901", None, True),
    ("the_address_it_arrived_on", b"10.1.2.3:9901", "10.1.2.3", True),
    ("ipv6_address_it_arrived_on", b"[fd00::7]:9901", "fd00::7", True),
    ("dns_rebinding_name", b"evil.example:9901", None, False),
    ("dns_rebinding_name_no_port", b"evil.example", None, False),
    ("rebinding_name_on_the_address", b"evil.example:9901", "10.1.2.3", False),
    ("another_address", b"10.1.2.4:9901", "10.1.2.3", False),
    ("localhost_suffix", b"localhost.evil.example", None, False),
    ("loopback_prefix", b"127.0.0.1.evil.example", None, False),
    ("other_loopback_address", b"127.0.0.2", None, False),
    ("userinfo", b"localhost@evil.example", None, False),
    ("bare_ipv6", b"::1", None, False),
    ("port_not_a_number", b"localhost:http", None, False),
    ("empty_port", b"localhost:", None, False),
    ("unclosed_bracket", b"[::1", None, False),
    ("garbage_after_bracket", b"[::1]x", None, False),
    ("empty", b"", None, False),
    ("absent", None, None, False),
    ("non_ascii", "lócalhost".encode(), None, False),
]


@pytest.mark.parametrize(
    ("host", "local", "allowed"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_host_allowed(host: bytes | None, local: str | None, allowed: bool) -> None:
    assert host_allowed(host, LOOPBACK_HOSTS, local) is allowed


def test_configured_name_is_allowed() -> None:
    names = {*LOOPBACK_HOSTS, "Pep-Admin.internal"}
    assert host_allowed(b"pep-admin.internal:9901", names)
    assert not host_allowed(b"evil.example", names)


def test_host_name_strips_port_and_brackets() -> None:
    assert host_name(b"[::1]:80") == "::1"
    assert host_name(b"Example.ORG:443") == "example.org"
