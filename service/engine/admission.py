"""How many sequences are live against the engine's capacity: one count, in one process or shared.

Admission is exact: a request is accepted while every live sequence, its own included, fits the
slots plus the queue. With one front end the count is a plain integer guarded by the front end's
own lock (``LocalCount``). With several API-server processes feeding one engine core
(``--api-servers N``) the count lives in a file every process maps, under a file lock
(``SharedCount``), so the capacity holds across every front end: the first sequence over it is
refused wherever it arrives, and a sequence freed in one front end can be taken by any other.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Protocol

_INT = struct.Struct("q")


class LiveCount(Protocol):
    """Sequences live against the capacity (taken at admission, given back when they end)."""

    def take(self, wanted: int, capacity: int) -> int | None:
        """Count ``wanted`` more if they fit ``capacity``; None when taken, else the live count
        that left no room (for the 503's message)."""

    def give(self, count: int) -> None:
        """Stop counting ``count`` sequences (finished or aborted)."""

    @property
    def value(self) -> int:
        """Sequences counted now."""


class LocalCount:
    """The count of a single front end (its callers hold the front end's lock)."""

    def __init__(self) -> None:
        self._value = 0

    def take(self, wanted: int, capacity: int) -> int | None:
        if self._value + wanted > capacity:
            return self._value
        self._value += wanted
        return None

    def give(self, count: int) -> None:
        self._value -= count

    @property
    def value(self) -> int:
        return self._value


class SharedCount:
    """The count shared by every API-server process of one engine core: eight bytes of a file in
    the core's private folder, mapped by each process, under an exclusive ``flock`` of that file.
    It travels by its path (pickled to a front end at spawn, or later by a live reload), so any
    process can join it. Threads of one process must hold a lock of their own around it (the
    front end calls it holding its ``_cond``): a ``flock`` excludes processes, not threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __reduce__(self):
        return (SharedCount, (self.path,))

    def take(self, wanted: int, capacity: int) -> int | None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            live = _INT.unpack_from(self._map)[0]
            if live + wanted > capacity:
                return live
            _INT.pack_into(self._map, 0, live + wanted)
            return None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def give(self, count: int) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _INT.pack_into(self._map, 0, _INT.unpack_from(self._map)[0] - count)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def value(self) -> int:
        return _INT.unpack_from(self._map)[0]
