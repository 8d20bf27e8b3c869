"""The requests of one verified client connection: a keep-alive loop that reads
request heads and runs each request through the stages

    head --canonical.build--> CanonicalRequest | Refusal
         --decide.decide--> Verdict
         --rewrite.upstream_head--> the upstream's head
         --exchange.forward / exchange.upgrade--> the response
         --audit.build_record--> the decision line

Every refusal is a value with a status and a reason code; this module only writes it
out and logs it. The bytes (reading within deadlines, writing, HTTP/1.0 keep-alive, error
replies) are ``client.ClientConnection``'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import traceback

import h11
import trio

from proxy import audit, canonical, drift, exchange, headers, http1, rewrite, svid
from proxy.canonical import CanonicalRequest, Refusal
from proxy.client import NO_REQUEST, ClientConnection
from proxy.deadlines import INF, Deadline, clock
from proxy.decide import Verdict, decide
from proxy.drift_store import ConnectionDrift
from proxy.errors import ClientGone, HttpError, SvidError, UpstreamError
from proxy.peer import Presented, reverify
from proxy.policy.evaluate import ALLOWED, Decision
from proxy.policy.model import Policy
from proxy.rewrite import Origin, OriginRefused
from proxy.runtime import Runtime
from proxy.tls import Credentials
from proxy.tls_stream import BROKEN, TLSStream

_VERDICT_KEY_MAX = 512  # requests with a longer Host + path are judged every time
STOPPED = "proxy_stopped"  # a request cut because the proxy stopped before it was done


class HttpSession(ClientConnection):
    """One verified connection's requests: the keep-alive loop, and each request through
    the stages (``client.ClientConnection`` moves its bytes)."""

    __slots__ = (
        "_drift",
        "_not_after",
        "chain",
        "creds",
        "identity",
        "peer",
        "peer_addr",
        "peer_ip",
    )

    def __init__(
        self,
        rt: Runtime,
        tls: TLSStream,
        peer: svid.PeerSvid,
        peer_ip: str,
        peer_addr: str,
        chain: Presented = (),
        creds: Credentials | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        super().__init__(rt, tls, deadline)
        self.peer = peer
        self._not_after = peer.not_after.timestamp()
        # What the peer presented and the credentials it was verified under: after a
        # rotation or bundle change the chain is verified again before the next request.
        self.chain = chain
        self.creds = creds or rt.credentials
        self.peer_ip = peer_ip
        self.peer_addr = peer_addr
        self.identity = rewrite.for_peer(rt.config, rt.credentials.own_id, peer)
        self._drift: ConnectionDrift | None = None  # judged at the first request
        rt.recent.seen(peer)

    # --- the loop -----------------------------------------------------------------------

    async def _finish_head(self) -> object:
        """The rest of a request head whose first bytes arrived, within
        ``timeouts.request_head``; None after answering 408."""
        deadline = clock() + self.rt.config.timeouts.request_head
        while True:
            event = self._head_event()
            if event is not h11.NEED_DATA:
                return event  # a request, or what run() refuses
            try:
                await self._receive(deadline)
            except trio.TooSlowError:
                await self._refuse_head(408, "request_head_timeout")
                return None

    async def run(self) -> None:
        try:
            while True:
                try:
                    event: object = h11.NEED_DATA if self.h is NO_REQUEST else self._head_event()
                    if event is h11.NEED_DATA:
                        # Idle between requests. The wait is written out here, not in a
                        # method: every idle keep-alive connection keeps the coroutine
                        # frames of its wait, and this is one less.
                        if self.rt.draining:
                            return
                        deadline = self.deadline
                        deadline.arm(clock() + self.rt.config.timeouts.idle, self._sock)
                        deadline.idle = True  # a drain ends the wait too
                        try:
                            data = await self.tls.receive_some()
                        except BROKEN:
                            return  # the idle timeout, a drain, or the client left
                        finally:
                            deadline.at = INF
                            deadline.idle = False
                        if not data and self.h is NO_REQUEST:
                            return  # it closed between requests
                        if self.h is NO_REQUEST:
                            self.h = http1.new_server_connection(
                                self.rt.config.limits.max_header_bytes
                            )
                        # End of stream after part of a pipelined head: h11 then
                        # refuses the incomplete head (400 and its line).
                        self.h.receive_data(data)
                        event = await self._finish_head()
                except h11.RemoteProtocolError as exc:
                    await self._malformed(exc)
                    return
                if event is None or not isinstance(event, h11.Request):
                    return
                # Set from the canonical request's Connection tokens in ``handle``; every
                # reply before that closes the connection anyway.
                self._http10_keepalive = False
                self._reuse_http10 = False
                self._method = event.method
                keep = await self.handle(event)
                if (
                    self._reuse_http10
                    and self.h.our_state is h11.MUST_CLOSE
                    and (self.h.their_state in (h11.DONE, h11.MUST_CLOSE))
                ):
                    self._next_cycle()
                    continue
                if not keep:
                    return
                if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                    return
                self._next_cycle()
        except ClientGone:
            pass

    async def _malformed(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        reason = "request_head_too_large" if status == 431 else "malformed_request"
        await self._refuse_head(status, reason, str(exc))

    async def _refuse_head(self, status: int, reason: str, detail: str = "") -> None:
        """A request whose head could not be read: answered, logged, connection closed."""
        ex = audit.Exchange(
            request_id=headers.request_id([]),
            peer_addr=self.peer_addr,
            reason=reason,
            status=status,
        )
        started, t0 = time.time(), time.perf_counter()
        try:
            await self.reply_error(status, reason, ex.request_id, close=True)
        finally:
            self._log(
                ex, started, t0, self.rt.policy.sha256, {"detail": detail} if detail else None
            )

    def _log(
        self,
        ex: audit.Exchange,
        started: float,
        t0: float,
        policy_sha256: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        """The decision line of a request that started at ``started`` (``time.time()``,
        and ``t0``, ``time.perf_counter()``)."""
        elapsed = time.perf_counter() - t0
        if ex.status == 0:
            # Nothing was answered: the client left (nginx's 499), the proxy stopped, or
            # it failed.
            if ex.reason in ("client_gone", "client_write_timeout"):
                ex.status = 499
            else:
                ex.status = 503 if ex.reason == STOPPED else 500
        text = audit.for_peer(self.peer).encode(
            ex, policy_sha256, audit.iso_wall(started), elapsed, extra
        )
        self.rt.decisions.write_line(text)
        self.rt.recent.add_line(text)
        d = ex.decision
        self.rt.metrics.count_request(
            (d.route_name or "") if d else "",
            ex.outcome,
            ex.reason,
            "audit" if d and d.audit else "enforce",
            elapsed,
        )

    def still_trusted(self) -> str | None:
        """None while the peer verifies against the trust store in force (checked again
        only after the credentials or bundles changed), else the reason it no longer
        does; the connection must then close."""
        creds = self.rt.credentials
        if creds is self.creds:
            return None
        try:
            peer = reverify(creds, self.chain)
        except SvidError as exc:
            self.rt.events.event(
                "peer_no_longer_trusted",
                peer_addr=self.peer_addr,
                spiffe_id=str(self.peer.spiffe_id),
                leaf_sha256=self.peer.fingerprint,
                reason=exc.reason,
                detail=exc.detail,
            )
            self.rt.metrics.handshake_failures.labels(reason="peer_no_longer_trusted").inc()
            return "peer_no_longer_trusted"
        self.creds, self.peer = creds, peer
        self._not_after = peer.not_after.timestamp()
        self.rt.recent.seen(peer)
        return None

    def verdict(
        self,
        request: CanonicalRequest,
        hop: Origin,
        policy: Policy,
        now: float,
        token: str | None,
    ) -> Verdict:
        """Stage 2: the policy's verdict on the canonical request, for this peer, at
        ``now`` (``time.time()``).

        Remembered for requests without a JWT-SVID (``decide.VerdictCache``, shared by
        all connections): a client repeating a request, on this connection or a new one,
        skips the evaluation."""
        cache = self.rt.verdicts
        cacheable = (
            token is None
            and now <= self._not_after
            and self.creds is self.rt.credentials
            # a bounded key: the cache outlives the connection, a huge Host or path
            # must not be kept in it
            and len(request.path) + len(request.host) <= _VERDICT_KEY_MAX
        )
        if cacheable:
            cache.valid_for(policy, self.creds, self.rt.upstream_rules)
            key = (request.method, request.host, request.path, request.path_params,
                   hop.spiffe_id, hop.sha256)  # fmt: skip
            hit = cache.get(self.peer, key)
            if hit is not None:
                return hit
        verdict = decide(
            policy,
            self.peer,
            request,
            dt.datetime.fromtimestamp(now, dt.UTC),
            token=token,
            origin=hop.spiffe_id,
            origin_sha256=hop.sha256,
            authorities=self.rt.credentials.jwt_authorities,
            upstreams=self.rt.upstream_rules,
        )
        if cacheable:
            cache.put(self.peer, key, verdict)
        return verdict

    def judge_drift(
        self, policy: Policy, decision: Decision, hop: Origin, ex: audit.Exchange
    ) -> Decision:
        """Subject drift under the route's ``drift:`` setting (the policy's when no route
        matched): the peer judged once per connection, an origin behind a trusted hop
        once per origin. Named on the decision line; with ``mode: deny`` an allowed
        request is refused as ``identity_drift_<kind>``."""
        route = decision.route
        config = route.drift if route is not None else policy.drift
        if config is None:
            return decision
        if self._drift is None:
            self._drift = ConnectionDrift(self.rt.drift, self.peer, self.peer_ip, policy)
        origin = None
        if hop.spiffe_id is not None:
            origin = (str(hop.spiffe_id), str(self.peer.spiffe_id), hop.sha256)
        found = self._drift.judge(
            policy,
            config,
            origin,
            peer_addr=self.peer_addr,
            request_id=ex.request_id,
            route=decision.route_name,
        )
        if not found:
            return decision
        ex.drift = tuple(dict.fromkeys(f.kind for f in found))
        if config.mode != drift.DENY or not decision.allowed:
            return decision
        kind = found[0].kind
        return Decision(
            False,
            drift.REASON_PREFIX + kind,
            route,
            f"drift.{kind} ({config.location})",
            decision.audit,
            decision.jwt,
        )

    def canonical(self, req: h11.Request, hdrs: headers.Headers) -> CanonicalRequest:
        """Stage 1: the canonical request, or an ``HttpError`` carrying the refusal."""
        result = canonical.build(req.method, req.target, hdrs, self.rt.rules, req.http_version)
        if isinstance(result, Refusal):
            raise HttpError(result.status, result.reason, result.detail)
        if result.dropped:
            self.rt.metrics.headers_dropped.labels(rule="underscore").inc(len(result.dropped))
        return result

    async def handle(self, req: h11.Request) -> bool:
        """Serve one request; return whether the connection may carry another."""
        t0 = time.perf_counter()
        started = time.time()
        self._body_started, self._body_bytes = clock(), 0
        # h11's Headers iterates in Python, item by item: read once per request.
        hdrs = http1.header_list(req)
        rid = headers.request_id(hdrs)
        ex = audit.Exchange(
            request_id=rid, peer_addr=self.peer_addr, method=req.method.decode("ascii", "replace")
        )
        policy = self.rt.policy
        extra: dict[str, str] | None = None
        try:
            lost = self.still_trusted()
            if lost is not None:
                raise HttpError(403, lost)
            ident = self.identity
            if ident.config is not self.rt.config or ident.peer is not self.peer:
                # reloaded, or the peer verified again: new identity headers
                self.identity = rewrite.for_peer(
                    self.rt.config, self.rt.credentials.own_id, self.peer
                )
            request = self.canonical(req, hdrs)
            self._http10_keepalive = (
                request.http_version == b"1.0" and b"keep-alive" in request.connection
            )
            ex.host, ex.path = request.host, request.path
            if request.dropped:
                extra = {"dropped_headers": ",".join(n.decode("latin-1") for n in request.dropped)}
            try:
                hop = self.identity.inbound_origin(request)
            except OriginRefused as exc:
                raise HttpError(exc.refusal.status, exc.refusal.reason, exc.refusal.detail) from exc
            origin = hop.spiffe_id
            ex.origin = str(origin) if origin else None
            ex.origin_sha256 = hop.sha256
            token = headers.bearer_token(request.headers, policy.jwt_header)
            ex.jwt_presented = token is not None
            verdict = self.verdict(request, hop, policy, started, token)
            decision = verdict.decision
            if policy.drift_configs:
                decision = self.judge_drift(policy, decision, hop, ex)
            ex.decision = decision
            ex.outcome = audit.ALLOW if decision.allowed else audit.DENY
            ex.reason = decision.reason
            if verdict.refusal is not None:
                r = verdict.refusal
                ex.outcome = audit.ERROR
                raise HttpError(r.status, r.reason, r.detail)
            if not decision.forward:
                # Never read the body of a refused request: answer and close if it has one.
                # A bodiless one is complete already; take its end so the connection can
                # carry the next request.
                if not request.has_body:
                    await self.next_body_event()
                # A missing or bad JWT-SVID is a credential problem (RFC 6750: 401 with
                # a Bearer challenge); everything else the policy refuses is 403.
                jwt = ex.reason.startswith("jwt_")
                ex.status = 401 if jwt else 403
                await self.reply_error(
                    ex.status, ex.reason, rid, close=request.has_body, challenge=jwt
                )
                return not request.has_body
            fwd = exchange.Forward(self, request, decision, ex, hop, policy)
            if exchange.upgrade_protocol(request) is not None:
                await exchange.upgrade(fwd)
                return False
            return await exchange.forward(fwd)
        except HttpError as exc:
            ex.status = exc.status_hint
            ex.reason = exc.reason
            await self.reply_error(exc.status_hint, exc.reason, rid, close=True)
            return False
        except UpstreamError as exc:
            ex.status = exc.status_hint
            ex.reason = exc.reason
            self.rt.metrics.upstream_errors.labels(
                upstream=ex.upstream or "", reason=exc.reason
            ).inc()
            self.rt.events.event(
                "upstream_error",
                request_id=rid,
                upstream=ex.upstream,
                reason=exc.reason,
                detail=exc.detail,
            )
            await self.reply_error(exc.status_hint, exc.reason, rid, close=True)
            return False
        except ClientGone as exc:
            if ex.reason in ("", ALLOWED):
                slow = str(exc) == "client_write_timeout"
                ex.reason = "client_write_timeout" if slow else "client_gone"
            raise
        except trio.Cancelled:
            # Only a stop cancels a request: a second SIGTERM/SIGINT, or the end of the
            # drain's grace. The line says so, not the verdict's "allowed".
            if ex.reason in ("", ALLOWED):
                ex.reason = STOPPED
            raise
        except Exception as exc:
            # A bug, not the client's fault: answer 500 if nothing was sent yet, keep the
            # traceback for the event log, and close (the connection's state is unknown).
            ex.status, ex.reason = 500, "internal_error"
            self.rt.events.event(
                "internal_error",
                request_id=rid,
                error=repr(exc),
                traceback=traceback.format_exc(),
            )
            with contextlib.suppress(Exception):
                await self.reply_error(500, ex.reason, rid, close=True)
            return False
        finally:
            self._log(ex, started, t0, policy.sha256, extra)
