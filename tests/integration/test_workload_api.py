"""SVIDs and bundles streamed from a SPIFFE Workload API: an in-process server speaking
the real gRPC protocol on a unix socket (as go-spiffe's tests do), the proxy following it."""

from __future__ import annotations

import hashlib
import queue
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from spiffe._proto import workload_pb2, workload_pb2_grpc

from proxy import app, demo_upstream
from proxy.audit_sink import JsonLines
from proxy.devcerts import Issued, issue_svid
from tests.conftest import SERVER_ID, Pki
from tests.integration.harness import POLICY, Proxy, curl, server_fingerprint, tls_client


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """A SPIRE agent's FetchX509SVID: a stream of updates pushed by the test."""

    def __init__(self) -> None:
        self.updates: queue.Queue[workload_pb2.X509SVIDResponse] = queue.Queue()
        self.calls_without_header = 0

    def FetchX509SVID(self, request: Any, context: Any) -> Iterator[Any]:
        if dict(context.invocation_metadata()).get("workload.spiffe.io") != "true":
            self.calls_without_header += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        while context.is_active():
            try:
                yield self.updates.get(timeout=0.1)
            except queue.Empty:
                continue


def response(svid: Issued, bundle_der: bytes, federated: dict[str, bytes]) -> Any:
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=SERVER_ID,
                x509_svid=b"".join(
                    c.public_bytes(Encoding.DER) for c in (svid.cert, *svid.parents)
                ),
                x509_svid_key=svid.key.private_bytes(
                    Encoding.DER, PrivateFormat.PKCS8, NoEncryption()
                ),
                bundle=bundle_der,
            )
        ],
        federated_bundles=federated,
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeAgent, str]]:
    fake = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(fake, server)
    address = f"unix://{tmp_path}/agent.sock"
    server.add_insecure_port(address)
    server.start()
    yield fake, address
    server.stop(grace=None)


async def test_svid_and_bundles_from_the_workload_api_and_rotation(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, agent: tuple[FakeAgent, str]
) -> None:
    fake, address = agent
    first = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
    root_der = pki.root.cert.public_bytes(Encoding.DER)
    partner_der = pki.partner_root.cert.public_bytes(Encoding.DER)
    fake.updates.put(response(first, root_der, {"spiffe://partner.org": partner_der}))

    upstream = await nursery.start(demo_upstream.serve, "127.0.0.1", 0)
    (tmp_path / "policy.yaml").write_text(POLICY)
    cfg = tmp_path / "spiffe-pep.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        tls: {{workload_api: "{address}"}}
        upstreams:
          app: {{url: "http://127.0.0.1:{upstream}"}}
          dead: {{url: "http://127.0.0.1:9"}}
        decision_log: {tmp_path}/decisions.jsonl
        policy: policy.yaml
        admin: off
        """)
    )
    rt = await trio.to_thread.run_sync(  # X509Source blocks until the first update
        lambda: app.build_runtime(
            app.read_config(cfg), events=JsonLines(str(tmp_path / "events.jsonl"))
        )
    )
    started = await nursery.start(app.serve, rt)
    proxy = Proxy(started["listen"][0][1], upstream, rt, tmp_path, pki)
    assert fake.calls_without_header == 0  # py-spiffe sent the security header

    # The SVID from the agent serves; the federated bundle (partner.org) is per domain.
    assert (await curl(proxy, "/orders")).status == 200
    assert (await curl(proxy, "/payments/1", cert="partner")).status == 200
    r = await curl(proxy, "/orders", cert="confused")  # partner's CA minting example.org
    assert r.returncode != 0
    ctx = tls_client(pki)
    fp1 = await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx)
    assert fp1 == hashlib.sha256(first.cert.public_bytes(Encoding.DER)).hexdigest()

    # The agent rotates the SVID: new handshakes present the new one.
    second = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
    fake.updates.put(response(second, root_der, {"spiffe://partner.org": partner_der}))
    with trio.fail_after(10):
        while await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx) == fp1:
            await trio.sleep(0.05)
    assert (
        await trio.to_thread.run_sync(server_fingerprint, proxy.port, ctx)
        == hashlib.sha256(second.cert.public_bytes(Encoding.DER)).hexdigest()
    )
    assert (await curl(proxy, "/orders")).status == 200
    reloads = [e for e in proxy.events() if e["event"] == "credentials_reloaded"]
    assert reloads and reloads[-1]["trigger"] == "workload_api"

    # The agent drops the federation: partner.org's workloads are refused from then on.
    third = issue_svid(pki.intermediate, [SERVER_ID], dns=["localhost"], ips=["127.0.0.1"])
    fake.updates.put(response(third, root_der, {}))
    with trio.fail_after(10):
        while (await curl(proxy, "/payments/1", cert="partner")).returncode == 0:
            await trio.sleep(0.05)
