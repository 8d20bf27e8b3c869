"""spiffe-pep: an mTLS reverse proxy that enforces SPIFFE workload identity."""

from proxy.errors import ConfigError, PolicyError, ProxyError, SpiffeIdError, SvidError
from proxy.spiffe_id import SpiffeId, TrustDomain

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PolicyError",
    "ProxyError",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TrustDomain",
    "__version__",
]
