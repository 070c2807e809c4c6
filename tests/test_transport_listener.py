"""The connection cap's policy, step by step: what happens to a connection accepted at the cap.

Plain asyncio, no sockets: the connections are stand-ins that say whether they have a request in
flight and record being closed, so every step is observed, not timed. The real sockets, the file
limit and real attackers are in tests/test_http_transport.py.
"""

from __future__ import annotations

import asyncio

from service.metrics import Metrics
from service.transport.limits import TransportLimits
from service.transport.listener import Listener


class Conn:
    """A connection as the listener sees it: busy or idle since a time; closing it closes it."""

    def __init__(self, listener: Listener, idle_since: float | None) -> None:
        self.listener = listener
        self.idle_since = idle_since if idle_since is not None else 0.0
        self.evictable = idle_since is not None
        self.evicted = False
        listener._reserved += 1  # accepted
        listener.opened(self)

    def evict(self) -> None:
        self.evicted = True
        self.evictable = False

    def close(self) -> None:  # the transport's connection_lost
        self.listener.closed(self)


def _listener(cap: int) -> tuple[Listener, Metrics]:
    metrics = Metrics()
    return Listener([], None, TransportLimits(max_connections=cap), metrics), metrics


async def _settle() -> None:
    for _ in range(5):  # let any task that can run, run
        await asyncio.sleep(0)


def test_at_the_cap_the_longest_idle_connection_is_closed_for_the_new_one():
    async def scenario() -> None:
        listener, metrics = _listener(cap=3)
        busy = Conn(listener, idle_since=None)
        newer, older = Conn(listener, idle_since=20.0), Conn(listener, idle_since=10.0)
        listener._reserved += 1  # a fourth connection is accepted
        admit = asyncio.create_task(listener._make_room())
        await _settle()
        assert older.evicted and not newer.evicted and not busy.evicted
        assert not admit.done(), "admitted before the evicted connection had closed"
        older.close()
        await _settle()
        assert admit.done()
        evicted = metrics.connections_closed.labels(reason="evicted")._value.get()
        assert evicted == 1

    asyncio.run(scenario())


def test_at_the_cap_with_every_connection_busy_a_new_one_waits_for_a_close():
    async def scenario() -> None:
        listener, _ = _listener(cap=2)
        first, second = Conn(listener, idle_since=None), Conn(listener, idle_since=None)
        listener._reserved += 1
        admit = asyncio.create_task(listener._make_room())
        await _settle()
        assert not admit.done() and not first.evicted and not second.evicted
        second.close()  # a stream ends
        await _settle()
        assert admit.done(), "a slot was freed but the waiting connection was not admitted"
        assert listener.metrics.connections._value.get() == 1

    asyncio.run(scenario())
