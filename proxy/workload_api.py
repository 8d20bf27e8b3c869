"""Credentials streamed from a SPIRE agent's Workload API (the ``spiffe`` package).

py-spiffe's ``X509Source`` keeps a gRPC stream open on its own thread and calls back on
every update. The callback never touches the proxy: it hands the update to the trio loop
(``trio.from_thread.run_sync``), where new TLS contexts are built and swapped in, exactly as
a file rotation is. Bundles are kept per trust domain (the Workload API gives the SVID's own
and the federated ones); bundle files in the config add to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio
from spiffe import X509Source

from proxy.bundle import Bundle
from proxy.config import TlsFiles
from proxy.errors import ConfigError
from proxy.spiffe_id import TrustDomain
from proxy.tls import Credentials, credentials_from, jwt_authorities_of, load_bundles


class WorkloadApiSource:
    """An X509Source, converted to :class:`Credentials` on demand."""

    def __init__(self, files: TlsFiles) -> None:
        assert files.workload_api is not None
        self.files = files
        self.address = files.workload_api
        try:
            self._source = X509Source(
                socket_path=files.workload_api, timeout_in_seconds=files.wait_for_svid
            )
        except Exception as exc:  # py-spiffe raises its own error types for each cause
            raise ConfigError(self.address, f"no X.509-SVID from the Workload API: {exc}") from exc

    def credentials(self) -> Credentials:
        context = self._source.get_x509_context()  # SVID and bundles of one update
        svid = context.default_svid
        bundles: dict[TrustDomain, Bundle] = {}
        for b in context.x509_bundle_set.bundles:
            td = TrustDomain.parse(b.trust_domain.name)
            bundles[td] = Bundle(td, tuple(b.x509_authorities))
        bundles.update(load_bundles(self.files.bundles))  # configured files add or override
        return credentials_from(
            svid.cert_chain,
            svid.private_key,
            bundles,
            jwt_authorities_of(bundles, self.files.jwt_bundles),
            f"{self.address} (SVID)",
            f"{self.address} (key)",
        )

    def follow(self, on_update: Callable[[], object]) -> None:
        """Run ``on_update`` in the trio loop (of the calling task) on every update."""
        token = trio.lowlevel.current_trio_token()

        def callback() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(on_update, trio_token=token)

        self._source.subscribe_for_updates(callback)

    def close(self) -> None:
        self._source.close()
