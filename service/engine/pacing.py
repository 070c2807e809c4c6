"""Output pacing: the engine core stays at most ``STEPS_AHEAD`` step messages ahead of each front end.

Why: a core whose steps cost little next to the front end's work per token (a small model, a
fast GPU, ``bench/hostcost.py``'s stand-in) steps as soon as any row is ready. It then runs many
small steps, pays its per-step constant (scheduling, packing, sampling, encoding, sending) per few
rows, and piles up messages its front end has not handed to its streams yet. Kept a few steps
ahead, the core waits instead (on its input socket, so a new request or an abort still wakes it),
requests arrive meanwhile, and its next step carries every row that is ready: fewer, fuller steps
for the same tokens. A model whose steps take milliseconds never gets that far ahead (its front
end hands a step over in well under a step's time), so pacing does not slow it.

Each front end counts the step messages its event loop has handed to its streams; the core counts
the ones it sent to each front end. The counts live in ``ConsumedSteps``: one int64 per front end
in a file of the core's private socket folder, mapped by the core and by every front end. A front
end writes only its own count, the core only reads them (an aligned 8-byte store: no lock). A
front end that is not reading (not started yet, or leaving the core) has ``NOT_READING`` there,
and the core does not wait for it.
"""

from __future__ import annotations

import mmap
import os
import sys

STEPS_AHEAD = 4  # step messages a front end may leave unconsumed (docs/BENCHMARKS.md: chosen by
# measurement of bench/hostcost.py's server at 256 streams)
PACE_POLL_MS = 1  # how often a core that is STEPS_AHEAD ahead looks at the counts again
NOT_READING = -1


class ConsumedSteps:
    """Step messages consumed, per front end, shared between the core and its front ends. Made by
    the process that spawns the core (``create``), opened by path by the others; it travels by
    its path (pickled)."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._counts = memoryview(self._map).cast("q")  # (fronts,) int64

    @classmethod
    def create(cls, path: str, fronts: int) -> ConsumedSteps:
        """A new file for ``fronts`` front ends, none of them reading yet."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, NOT_READING.to_bytes(8, sys.byteorder, signed=True) * fronts)
        finally:
            os.close(fd)
        return cls(path)

    def __reduce__(self):
        return (ConsumedSteps, (self.path,))

    def __len__(self) -> int:
        return len(self._counts)

    def __getitem__(self, front: int) -> int:
        return self._counts[front]

    def __setitem__(self, front: int, count: int) -> None:
        self._counts[front] = count

    def close(self) -> None:
        self._counts.release()
        self._map.close()


def ahead(consumed: ConsumedSteps, sent: list[int]) -> bool:
    """Whether some reading front end has ``STEPS_AHEAD`` or more of the ``sent`` step messages
    unconsumed (then the core waits before its next step)."""
    for front, count in enumerate(sent):
        done = consumed[front]
        if done != NOT_READING and count - done >= STEPS_AHEAD:
            return True
    return False
