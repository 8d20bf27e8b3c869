"""The exception tree of spiffe-pep.

Internal errors quote the offending input so logs say what was wrong; anything that
reaches a peer is deliberately vague (see ``server.py``). Each error carries a
``status_hint`` so the HTTP shell can map a failure straight to a response.
"""

from __future__ import annotations

import re


class ProxyError(Exception):
    """Base of every error spiffe-pep raises on purpose."""

    status_hint: int = 500


class SpiffeIdError(ProxyError, ValueError):
    """A string is not a valid SPIFFE ID (or trust domain, or identity pattern)."""

    status_hint = 400

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid SPIFFE ID {value!r}: {reason}")
        self.value = value
        self.reason = reason


class BundleError(ProxyError):
    """A trust bundle (PEM or SPIFFE bundle JSON) cannot be used."""


class SvidError(ProxyError):
    """A peer's X.509-SVID breaks a rule of the X.509-SVID standard.

    ``reason`` is a short stable code for logs and metrics; ``detail`` is a sentence.
    """

    status_hint = 403

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(ProxyError):
    """A configuration or policy file is invalid. ``location`` is ``file:line:column`` (or
    a file, or an address). The text names it once: a message that already names it (a
    bundle parser's ``FILE: ...``, ``no certificate in FILE``) is not prefixed again."""

    def __init__(self, location: str, message: str) -> None:
        named = bool(location) and re.search(rf"(^|\s){re.escape(location)}($|[\s:)])", message)
        super().__init__(f"{location}: {message}" if location and not named else message)
        self.location = location
        self.message = message


class PolicyError(ConfigError):
    """The route policy is invalid."""


class HttpError(ProxyError):
    """A request cannot be served; ``status_hint`` is the status to answer with."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {detail}" if detail else ""))
        self.status_hint = status
        self.reason = reason
        self.detail = detail


class UpstreamError(ProxyError):
    """The upstream could not be reached (502) or did not answer in time (504)."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status_hint = status
        self.reason = reason
        self.detail = detail


class ClientGone(Exception):
    """The client closed or broke the connection; nothing more can be sent to it."""
