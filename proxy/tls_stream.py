"""TLS on a trio stream with pyOpenSSL over memory BIOs (the model of trio's ``_ssl.py``).

The OpenSSL ``Connection`` never sees the socket: ciphertext moves between its BIOs and
the trio stream here, so the event loop stays in charge of all waiting. One task reads and
one task writes at a time (an upgraded connection pumps both ways at once).
"""

from __future__ import annotations

import contextlib

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from proxy.deadlines import INF, Deadline, clock

_BIO_CHUNK = 256 * 1024
_RECV_CHUNK = 64 * 1024
# Ciphertext moved through the memory BIOs since they were last renewed, past which they
# are renewed at the next wait (a memory BIO keeps the capacity of the most it held).
_BIO_GROWN = 16 * 1024


def _bio_empty(bio: object) -> bool:
    return int(_lib.BIO_get_mem_data(bio, _ffi.new("char **"))) == 0


def renew_bios(conn: SSL.Connection) -> bool:
    """Give OpenSSL fresh, empty memory BIOs when the current ones hold no data: a memory
    BIO keeps the capacity of the largest flight it carried (the handshake's certificate
    chains), about 4 KiB per idle connection (``loadtests/tls_idle_floor.py``).

    Relies on pyOpenSSL's private ``_ssl``, ``_into_ssl`` and ``_from_ssl`` (the
    Connection's BIOs when it has no socket; the SSL object owns them and frees the old
    ones in ``SSL_set_bio``); pinned by tests/unit/test_tls.py."""
    into, out = conn._into_ssl, conn._from_ssl
    if into is None or not _bio_empty(into) or not _bio_empty(out):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL:
        return False
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_out == _ffi.NULL:
        _lib.BIO_free(new_into)
        return False
    _lib.SSL_set_bio(conn._ssl, new_into, new_out)
    conn._into_ssl, conn._from_ssl = new_into, new_out
    return True


class TLSError(Exception):
    """The TLS layer failed; ``reason`` is OpenSSL's short reason when there is one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# What reading or writing a TLS stream raises when the peer is gone or broke it.
BROKEN = (TLSError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def openssl_reason(exc: BaseException) -> str:
    """The most specific reason string in a pyOpenSSL error (``peer did not return ...``)."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        last = args[0][-1]
        if isinstance(last, tuple) and len(last) >= 3:
            return str(last[2])
    if isinstance(exc, SSL.SysCallError):
        return "unexpected eof"
    return str(exc) or type(exc).__name__


class TLSStream:
    """A TLS session over ``transport``; server or client side as ``conn`` was set up."""

    __slots__ = ("_closed", "_moved", "_sending", "_sent", "conn", "transport")

    def __init__(self, transport: trio.SocketStream, conn: SSL.Connection) -> None:
        self.transport = transport
        self.conn = conn
        self._closed = False
        # A reader may need to write (TLS 1.3 key updates) while another task writes: one
        # sender at a time on the socket (an upgraded connection pumps both ways at once).
        # A flag, and an event only while someone waits: contention is rare, and an idle
        # connection should not keep a lock and its parking lot.
        self._sending = False
        self._sent: trio.Event | None = None
        self._moved = 0  # ciphertext bytes through the BIOs since they were renewed

    async def _flush(self) -> None:
        while self._sending:
            if self._sent is None:
                self._sent = trio.Event()
            await self._sent.wait()
        self._sending = True
        try:
            data = self._pending()
            if data:
                self._moved += len(data)
                await self.transport.send_all(data)
        finally:
            self._sending = False
            if self._sent is not None:
                self._sent.set()
                self._sent = None

    def _pending(self) -> bytes:
        """All ciphertext OpenSSL queued. One read of the whole buffer is the common case;
        only a short read proves the buffer empty without the cost of an exception."""
        try:
            data = self.conn.bio_read(_BIO_CHUNK)
        except SSL.WantReadError:
            return b""
        if len(data) < _BIO_CHUNK:
            return data
        chunks = [data]
        while True:
            try:
                chunk = self.conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                return b"".join(chunks)
            chunks.append(chunk)
            if len(chunk) < _BIO_CHUNK:
                return b"".join(chunks)

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(_RECV_CHUNK)
        if not data:
            self.conn.bio_shutdown()
            return False
        self._moved += len(data)
        self.conn.bio_write(data)
        return True

    async def do_handshake(self, deadline: Deadline | None = None) -> None:
        """Run the handshake; raise :class:`TLSError` with OpenSSL's reason on failure.
        With an armed ``deadline``: ``ClosedResourceError`` once it has passed, and
        ``deadline.expired`` set (checked between reads too: a peer whose bytes are
        always there never blocks, and the sweeper only wakes a blocked wait)."""
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                if deadline is not None and clock() >= deadline.at:
                    deadline.expired = True
                    raise trio.ClosedResourceError("the handshake deadline passed") from None
                await self._flush()
                if not await self._fill():
                    raise TLSError("peer closed the connection during the handshake") from None
            except SSL.Error as exc:
                # Send the alert OpenSSL queued (e.g. "certificate required") before failing.
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._flush()
                raise TLSError(openssl_reason(exc)) from exc
        await self._flush()
        if renew_bios(self.conn):  # the handshake's flights were the largest
            self._moved = 0

    async def receive_some(self, max_bytes: int = _RECV_CHUNK) -> bytes:
        """Plaintext from the peer; ``b""`` at end of stream (close_notify or TCP EOF)."""
        while True:
            try:
                return self.conn.recv(max_bytes)
            except SSL.WantReadError:
                pass  # wait outside the handler: an idle connection holds no exception
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return b""
            except SSL.Error as exc:
                raise TLSError(openssl_reason(exc)) from exc
            await self._flush()
            if self._moved > _BIO_GROWN and renew_bios(self.conn):
                self._moved = 0  # before a wait that may be long: give the memory back
            data = await self.transport.receive_some(_RECV_CHUNK)  # _fill, one frame less
            if data:
                self._moved += len(data)
                self.conn.bio_write(data)
            else:
                self.conn.bio_shutdown()  # the next recv reports EOF

    async def receive_ready(self, max_bytes: int = _RECV_CHUNK, rounds: int = 4) -> bytes | None:
        """Plaintext the peer has already sent, without waiting for more: ``b""`` when
        there is none. Ciphertext already in the socket is taken in first (a record only
        partly received counts as none). ``None`` when the peer closed (close_notify or TCP
        EOF), or when records keep arriving after ``rounds`` reads with no plaintext."""
        for _ in range(rounds):
            try:
                return self.conn.recv(max_bytes)
            except SSL.WantReadError:
                pass
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return None
            except SSL.Error as exc:
                raise TLSError(openssl_reason(exc)) from exc
            if not self.transport.socket.is_readable():
                return b""
            await self._fill()  # at EOF, the next recv reports it
        return None

    async def send_all(self, data: bytes) -> None:
        if data:
            self.conn.sendall(data)
            await self._flush()

    async def abort(self) -> None:
        """Close the socket without close_notify: the peer must not take what it got for a
        complete stream (a response cut short when the upstream broke)."""
        if self._closed:
            return
        self._closed = True
        await self.transport.aclose()

    async def aclose(self, grace: float = 1.0, deadline: Deadline | None = None) -> None:
        """Send close_notify (bounded by ``grace`` seconds), then close the socket. With a
        ``deadline`` (registered with a running ``Sweeper``) the bound is kept by it
        instead of a cancel scope of its own."""
        if self._closed:
            return
        self._closed = True
        try:
            if deadline is None:
                with trio.move_on_after(grace):
                    await self._close_notify()
            else:
                deadline.arm(clock() + grace, self.transport.socket)
                try:
                    await self._close_notify()
                finally:
                    deadline.at = INF
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    async def _close_notify(self) -> None:
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        await self._flush()
