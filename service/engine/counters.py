"""The engine core's cumulative counts: what ``/metrics`` shows of the engine, kept where it
happens.

The core adds to them as it works (per step: a few additions into one buffer; per finished choice:
its latencies, and its inter-token gaps bucketed with NumPy in one pass per step) and never resets
them; ``service/metrics.py`` renders them at scrape time. Nothing about them crosses a socket:
no Prometheus call per step in the front end, no inter-token time per token on the wire.

They live in one flat float64 buffer (integers are exact up to 2**53): in memory for an in-process
core, in a file for a core process, mapped by the core, which writes, and by its front ends, which
read (as ``pacing.ConsumedSteps`` is). Each value is one aligned 8-byte store, so a reader sees
every series go up step by step, never back (a histogram's sum may be a step ahead of or behind
its buckets). A file outlives its core's death and stays readable after it is removed.

A histogram keeps one count per bucket (not cumulative; the last one is ``+Inf``) and its sum;
a value lands in the first bucket whose upper bound is >= it, as ``prometheus_client`` puts it.
"""

from __future__ import annotations

import bisect
import mmap
import os

import numpy as np

FILE_SUFFIX = ".counters"  # a core process's counts file: <its socket folder's name>.counters
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)  # sequences in one step

# cumulative counts, in buffer order
COUNTERS = ("prompt_tokens", "generation_tokens", "recomputed_tokens", "prefix_cache_queries",
            "prefix_cache_hits", "crops")
# histograms and their buckets' upper bounds, in buffer order after the counters
HISTOGRAMS = {
    "step_time": LATENCY_BUCKETS,
    "batch_size": BATCH_BUCKETS,
    "time_to_first_token": LATENCY_BUCKETS,
    "inter_token_latency": LATENCY_BUCKETS,
    "e2e_latency": LATENCY_BUCKETS,
    "queue_time": LATENCY_BUCKETS,
}


def _layout() -> tuple[dict[str, int], int]:
    """Each series' first index in the buffer (a histogram: its buckets, then its sum), and the
    buffer's length in float64s."""
    where, at = {}, 0
    for name in COUNTERS:
        where[name], at = at, at + 1
    for name, bounds in HISTOGRAMS.items():
        where[name], at = at, at + len(bounds) + 2
    return where, at


AT, SIZE = _layout()


def _histogram(name: str) -> tuple[int, tuple, int]:
    """Where a histogram's buckets begin, its bounds, and where its sum is."""
    return AT[name], HISTOGRAMS[name], AT[name] + len(HISTOGRAMS[name]) + 1


_STEP, _BATCH = _histogram("step_time"), _histogram("batch_size")
_QUEUE, _TTFT, _E2E = (_histogram("queue_time"), _histogram("time_to_first_token"),
                       _histogram("e2e_latency"))
_ITL = AT["inter_token_latency"]
_ITL_BOUNDS = np.array(LATENCY_BUCKETS)
_ITL_BUCKETS = len(LATENCY_BUCKETS) + 1


class CoreCounters:
    """One core's counts, over a buffer of ``SIZE`` float64s: ``values`` (a memoryview, for the
    core's scalar additions) and ``array`` (NumPy, for its bucket additions and for readers).
    ``in_memory()`` for an in-process core; ``create(path)`` by whoever spawns a core process,
    ``open(path, writable=True)`` by the core, ``open(path)`` (read-only) by its front ends."""

    def __init__(self, buffer, path: str | None = None) -> None:
        self.path = path
        self._buffer = buffer
        self.values = memoryview(buffer).cast("d")
        self.array = np.frombuffer(buffer, dtype=np.float64)
        if len(self.array) != SIZE:
            raise ValueError(f"{path}: {len(self.array)} counters, expected {SIZE}")

    @classmethod
    def in_memory(cls) -> CoreCounters:
        return cls(bytearray(SIZE * 8))

    @classmethod
    def create(cls, path: str) -> None:
        """Write a file of zeros at ``path``, whole before its name appears (readers may list its
        folder at any time)."""
        partial = f"{path}.new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(SIZE * 8))
        finally:
            os.close(fd)
        os.rename(partial, path)

    @classmethod
    def open(cls, path: str, writable: bool = False) -> CoreCounters:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(buffer, path)

    # ---- the core's side ----------------------------------------------------------------------

    def add_step(self, step_time: float, batch_size: int, prompt_tokens: int,
                 generation_tokens: int, recomputed_tokens: int, prefix_cache_queries: int,
                 prefix_cache_hits: int, crops: int) -> None:
        """Count one engine step (a step with no sequence counts its time, not its batch)."""
        v = self.values
        if prompt_tokens:
            v[0] += prompt_tokens  # COUNTERS order
            v[3] += prefix_cache_queries
            v[4] += prefix_cache_hits
        v[1] += generation_tokens
        if recomputed_tokens:
            v[2] += recomputed_tokens
        if crops:
            v[5] += crops
        # the two histograms' ``_observe``, inlined (this runs every step)
        v[_STEP[0] + bisect.bisect_left(LATENCY_BUCKETS, step_time)] += 1
        v[_STEP[2]] += step_time
        if batch_size:
            v[_BATCH[0] + bisect.bisect_left(BATCH_BUCKETS, batch_size)] += 1
            v[_BATCH[2]] += batch_size

    def add_finished(self, seqs, now: float) -> None:
        """Count the latencies of choices the core finished (``Sequence``: its arrival, admission,
        token and finish times), every inter-token gap of all of them in one NumPy pass."""
        observe = self._observe
        times: list[float] = []  # every choice's token times, one after another
        seams = []  # where one choice's times end and the next one's begin (a gap to drop)
        total = 0.0  # the gaps' sum: each choice's first-to-last token time
        for seq in seqs:
            arrival = seq.request.arrival_time
            admitted = seq.admitted_at
            observe(_QUEUE, (admitted if admitted is not None else now) - arrival)
            own = seq.token_times
            if own:
                observe(_TTFT, own[0] - arrival)
                if len(own) > 1:
                    if times:
                        seams.append(len(times) - 1)
                    times += own
                    total += own[-1] - own[0]
            observe(_E2E, (seq.finished_at or now) - arrival)
        if times:
            self._observe_gaps(times, seams, total)

    def _observe(self, histogram: tuple[int, tuple, int], value: float) -> None:
        at, bounds, sum_at = histogram
        values = self.values
        values[at + bisect.bisect_left(bounds, value)] += 1
        values[sum_at] += value

    def _observe_gaps(self, times: list[float], seams: list[int], total: float) -> None:
        """Bucket the gaps between consecutive ``times`` but those at ``seams``."""
        t = np.array(times)
        gaps = t[1:] - t[:-1]
        if seams:
            gaps[seams] = -1.0  # into the first bucket, and taken out of it below
        counts = np.bincount(np.searchsorted(_ITL_BOUNDS, gaps), minlength=_ITL_BUCKETS)
        counts[0] -= len(seams)
        self.array[_ITL:_ITL + _ITL_BUCKETS] += counts
        self.values[_ITL + _ITL_BUCKETS] += total

    # ---- readers ------------------------------------------------------------------------------

    def snapshot(self) -> np.ndarray:
        """A copy of every count now."""
        return self.array.copy()


def counter(snapshot: np.ndarray, name: str) -> float:
    return float(snapshot[AT[name]])


def histogram(snapshot: np.ndarray, name: str) -> tuple[list[float], float]:
    """A histogram's per-bucket counts (the last one ``+Inf``) and its sum."""
    at, n = AT[name], len(HISTOGRAMS[name]) + 1
    return snapshot[at:at + n].tolist(), float(snapshot[at + n])
