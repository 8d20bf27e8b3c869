"""Deadlines checked by the sweeper: a wait past its deadline is woken with
ClosedResourceError on a real socket, which stays usable; a disarmed one is left alone."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.deadlines import INF, TICK_MAX, TICK_MIN, Deadline, Sweeper, clock, tick_for


@pytest.mark.parametrize(
    ("timeouts", "tick"),
    [
        ((10.0, 10.0, 60.0, 30.0, 30.0), TICK_MAX),  # the defaults: a quarter second
        ((1.0, 10.0), 0.05),  # a twentieth of the shortest
        ((0.01,), TICK_MIN),
        ((0.0, 2.0), 0.1),  # 0 is not a timeout
        ((), TICK_MAX),
    ],
)
def test_tick_for(timeouts: tuple[float, ...], tick: float) -> None:
    assert tick_for(timeouts) == pytest.approx(tick)


def _pair() -> tuple[trio.socket.SocketType, socket.socket]:
    a, b = socket.socketpair()
    return trio.socket.from_stdlib_socket(a), b


async def test_a_wait_past_its_deadline_is_woken_and_the_socket_still_works() -> None:
    ours, theirs = _pair()
    sweeper = Sweeper(0.01)
    d = Deadline()
    sweeper.add(d)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        d.arm(clock() + 0.05, ours)
        t0 = trio.current_time()
        with pytest.raises(trio.ClosedResourceError):
            await ours.recv(10)
        assert d.expired and 0.05 <= trio.current_time() - t0 < 0.5
        # Not closed: the proxy can still answer (a 408) on it.
        d.at = INF
        await ours.send(b"408")
        assert theirs.recv(10) == b"408"
        theirs.send(b"more")
        assert await ours.recv(10) == b"more"
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


async def test_a_disarmed_or_later_deadline_does_not_fire() -> None:
    ours, theirs = _pair()
    sweeper = Sweeper(0.01)
    d = Deadline()
    sweeper.add(d)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        d.arm(clock() + 0.02, ours)
        d.at = INF  # the wait ended in time
        d.arm(clock() + 5, ours)  # the next one has its own deadline
        with trio.move_on_after(0.2) as waited:
            await ours.recv(10)
        assert waited.cancelled_caught and not d.expired
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


async def test_a_deadline_left_on_a_closed_socket_never_wakes_the_one_reusing_its_number() -> None:
    ours, theirs = _pair()
    d = Deadline()
    d.arm(0.0, ours)
    number = ours.fileno()
    ours.close()
    theirs.close()
    new, peer = _pair()  # the lowest free descriptor: very likely the same number
    woken = []

    async def wait() -> None:
        with trio.move_on_after(0.2):
            try:
                await new.recv(10)
            except trio.ClosedResourceError:
                woken.append(new.fileno() == number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        d.fire()
    assert d.expired and woken == []
    d.arm(1.0, new)  # arming clears the expiry
    assert not d.expired
    new.close()
    peer.close()


async def test_a_drain_ends_only_the_waits_for_a_next_request() -> None:
    idle_sock, idle_peer = _pair()
    busy_sock, busy_peer = _pair()
    sweeper = Sweeper()
    idle, busy = Deadline(), Deadline()
    for d in (idle, busy):
        sweeper.add(d)
    idle.arm(clock() + 60, idle_sock)
    idle.idle = True
    busy.arm(clock() + 60, busy_sock)
    woken = []

    async def wait(sock: trio.socket.SocketType, name: str) -> None:
        try:
            await sock.recv(10)
        except trio.ClosedResourceError:
            woken.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, idle_sock, "idle")
        nursery.start_soon(wait, busy_sock, "busy")
        await trio.testing.wait_all_tasks_blocked()
        assert sweeper.end_idle() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["idle"]
        nursery.cancel_scope.cancel()
    for s in (idle_sock, idle_peer, busy_sock, busy_peer):
        s.close()


async def test_the_sweeper_sleeps_while_nothing_is_registered() -> None:
    sweeper = Sweeper(0.001)
    d = Deadline()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        await trio.testing.wait_all_tasks_blocked()  # parked on "someone", not ticking
        sweeper.add(d)
        d.arm(clock(), None)  # type: ignore[arg-type]
        await trio.sleep(0.05)
        assert d.expired  # woke, ticked, fired
        sweeper.discard(d)
        assert len(sweeper) == 0 and d.at == INF
        nursery.cancel_scope.cancel()


async def test_close_notify_to_a_peer_that_reads_nothing_is_bounded_by_the_deadline() -> None:
    # A client that stopped reading, its socket buffers full: the TLS close must not
    # wait for it longer than its grace, kept by the connection's deadline (no scope).
    from proxy.tls_stream import TLSStream
    from tests.unit.test_tls import _handshake_in_memory

    server, _client = _handshake_in_memory()
    raw, theirs = socket.socketpair()
    raw.setblocking(False)
    while True:  # fill the kernel's buffers on the way to the peer
        try:
            raw.send(b"x" * 65536)
        except BlockingIOError:
            break
    ours = trio.socket.from_stdlib_socket(raw)
    sweeper = Sweeper(0.01)
    d = Deadline()
    sweeper.add(d)
    tls = TLSStream(trio.SocketStream(ours), server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        t0 = trio.current_time()
        await tls.aclose(grace=0.2, deadline=d)
        assert 0.2 <= trio.current_time() - t0 < 1.0
        assert d.expired and d.at == INF and ours.fileno() == -1
        nursery.cancel_scope.cancel()
    theirs.close()
