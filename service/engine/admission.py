"""How many sequences are live against the engine's capacity: one count, in one process or shared.

Admission is exact: a request is accepted while every live sequence, its own included, fits the
slots plus the queue. With one front end the count is a plain integer guarded by the front end's
own lock (``LocalCount``). With several API-server processes feeding one engine core
(``--api-servers N``) the count lives in shared memory with a process-shared lock
(``SharedCount``), so the capacity holds across every front end: the first sequence over it is
refused wherever it arrives, and a sequence freed in one front end can be taken by any other.
"""

from __future__ import annotations

import multiprocessing
from typing import Protocol


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
    """The count shared by every API-server process of one engine core. Made by the process that
    spawns the others and handed to them at spawn (``multiprocessing`` shares the memory and the
    lock); each front end's own sequences are given back by that front end."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._lock = context.Lock()
        self._value = context.RawValue("q", 0)

    def take(self, wanted: int, capacity: int) -> int | None:
        with self._lock:
            live = self._value.value
            if live + wanted > capacity:
                return live
            self._value.value = live + wanted
            return None

    def give(self, count: int) -> None:
        with self._lock:
            self._value.value -= count

    @property
    def value(self) -> int:
        return self._value.value
