"""TLS on a trio stream with pyOpenSSL over memory BIOs (the model of trio's ``_ssl.py``).

The OpenSSL ``Connection`` never sees the socket: ciphertext moves between its BIOs and
the trio stream here, so the event loop stays in charge of all waiting. One task reads and
one task writes at a time (an upgraded connection pumps both ways at once).
"""

from __future__ import annotations

import contextlib

import trio
from OpenSSL import SSL

_BIO_CHUNK = 256 * 1024
_RECV_CHUNK = 64 * 1024


class TLSError(Exception):
    """The TLS layer failed; ``reason`` is OpenSSL's short reason when there is one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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

    def __init__(self, transport: trio.SocketStream, conn: SSL.Connection) -> None:
        self.transport = transport
        self.conn = conn
        self._closed = False
        # A reader may need to write (TLS 1.3 key updates) while another task writes: one
        # sender at a time on the socket (an upgraded connection pumps both ways at once).
        self._send_lock = trio.StrictFIFOLock()

    async def _flush(self) -> None:
        # Uncontended (nearly always), take the lock without the two scheduler round trips
        # of ``async with``; it is only ever contended on an upgraded connection.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            data = self._pending()
            if data:
                await self.transport.send_all(data)
        finally:
            self._send_lock.release()

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
        self.conn.bio_write(data)
        return True

    async def do_handshake(self) -> None:
        """Run the handshake; raise :class:`TLSError` with OpenSSL's reason on failure."""
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
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
            await self._fill()  # at EOF, bio_shutdown makes the next recv report it

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

    async def aclose(self, grace: float = 1.0) -> None:
        """Send close_notify (bounded by ``grace`` seconds), then close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(grace):
                with contextlib.suppress(SSL.Error):
                    self.conn.shutdown()
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()
