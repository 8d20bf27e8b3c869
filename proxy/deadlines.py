"""Deadlines for the waits on a connection's socket, checked by one task every tick
instead of a trio cancel scope per wait.

A keep-alive request waits three times: for its head, for the client to take the
response, for the upstream's answer. A trio ``CancelScope`` with a deadline around each
costs more than h11 parsing the head (callgrind: ~60,000 instructions per scope entered
and left, ~20,000 per deadline moved; loadtests/RESULTS.md, "Issue 16, third round").
Here a wait's deadline is a float on a ``Deadline``; a ``Sweeper`` task wakes every
``tick`` and wakes every wait past its deadline: it marks the ``Deadline`` expired and
calls ``trio.lowlevel.notify_closing`` on the socket the wait blocks on, which raises
``ClosedResourceError`` in that wait without closing the socket. The waiting code turns
that into its timeout (408, 504, a cut connection), and can still answer on the socket.

A deadline fires at the first tick after its time at which its wait is blocked (a task
busy at that tick is woken at a later one); the tick is a twentieth of the shortest
configured timeout, at most 250 ms (``tick_for``). A wait that never blocks, because its
bytes are always there already, is never woken: loops of such waits (a request head
read in pieces, the handshake) compare the deadline with the clock themselves.

Deadlines are times of ``clock`` (``time.perf_counter``), not ``trio.current_time()``:
the same monotonic clock less trio's offset, read by a C call instead of three Python
frames (a keep-alive request reads it about five times). Every ``Deadline.at`` and
every comparison with one uses ``clock``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import trio

INF = float("inf")
clock = time.perf_counter  # the clock of every deadline (see the module docstring)
TICK_MAX = 0.25
TICK_MIN = 0.005


def tick_for(timeouts: Iterable[float]) -> float:
    """How often deadlines are checked: a twentieth of the shortest timeout, within
    [TICK_MIN, TICK_MAX] seconds."""
    shortest = min((t for t in timeouts if t > 0), default=TICK_MAX * 20)
    return min(TICK_MAX, max(TICK_MIN, shortest / 20))


class Deadline:
    """When the wait in progress on ``sock`` must end (``INF``: no wait has one).

    Arm it before the wait (``at``, ``sock``), disarm it after (``at = INF``); when a
    wait fails with ``ClosedResourceError`` and ``expired`` is set, it timed out. Arming
    clears ``expired``. ``idle``: a wait for a next request, which a drain ends too."""

    __slots__ = ("at", "expired", "idle", "sock")

    def __init__(self) -> None:
        self.at = INF
        self.sock: trio.socket.SocketType | None = None
        self.expired = False
        self.idle = False

    def arm(self, at: float, sock: trio.socket.SocketType) -> None:
        self.at, self.sock, self.expired = at, sock, False

    def fire(self) -> None:
        """Wake the wait: ``ClosedResourceError`` in whatever waits on the socket. A task
        not blocked on it at this moment is woken at a later tick, while ``at`` has
        passed and it is still armed."""
        self.expired = True
        sock = self.sock
        if sock is not None and sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)


class Sweeper:
    """Checks the registered deadlines every ``tick`` seconds (sleeping while none is
    registered) and fires those past due."""

    def __init__(self, tick: float = TICK_MAX) -> None:
        self.tick = tick
        self._held: set[Deadline] = set()
        self._someone = trio.Event()

    def add(self, deadline: Deadline) -> None:
        self._held.add(deadline)
        if not self._someone.is_set():
            self._someone.set()

    def discard(self, deadline: Deadline) -> None:
        deadline.at = INF
        deadline.sock = None
        self._held.discard(deadline)

    def __len__(self) -> int:
        return len(self._held)

    def sweep(self, now: float) -> int:
        """Fire the deadlines due at ``now``; how many."""
        due = [d for d in self._held if d.at <= now]
        for d in due:
            d.fire()
        return len(due)

    def end_idle(self) -> int:
        """Wake every wait for a next request (a drain); how many."""
        idle = [d for d in self._held if d.idle]
        for d in idle:
            d.at = -INF
            d.fire()
        return len(idle)

    async def run(self) -> None:
        while True:
            if not self._held:
                self._someone = trio.Event()
                await self._someone.wait()
            await trio.sleep(self.tick)
            self.sweep(clock())
