"""Choose the engine's intra-op thread count from the step times it measures (plain Python).

Why measure instead of fixing a count: on a quiet 2-core VM two threads decode GPT-2-small ~1.3x
(one stream) to ~1.8x (32 streams) faster than one, but with one busy neighbour process the same
two threads wait for each other at every parallel region and one thread is 1.3-3x faster
(docs/BENCHMARKS.md, "A busy neighbour"). Neighbours come and go, so the count is re-measured:

- the tuner runs at ``current`` threads and keeps, per step shape (``key``: the engine buckets
  decode rows and prefill tokens), its last ``window`` step times (medians, not means: one slow
  step, a GC pause or a page fault, must not move the choice);
- every ``interval`` seconds it *probes* a neighbouring count on the ladder 1, 2, 4, ..., max for
  ``probe_steps`` steps (the first step after a switch is not counted: new threads warm up) and
  moves there if their median was at least ``margin`` below the recent median of the same shapes;
- a probe that loses multiplies the interval by ``backoff`` (1, 4, 16, 64 s), so a settled choice
  costs a few slower steps a minute (docs/BENCHMARKS.md, "A busy neighbour", has a probe's
  cost); one that wins, or a recent median that drifts ``drift``x away from where
  it settled (a neighbour arrived), brings the next probe forward to ``min_interval``. A neighbour
  that leaves changes nothing at one thread, so only the periodic probe finds it gone: within
  ``max_interval``.

The tuner never calls torch: the engine reads ``threads`` before each step and sets it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from statistics import median

log = logging.getLogger(__name__)


def ladder(max_threads: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_threads`` (always included)."""
    counts, n = [], 1
    while n < max_threads:
        counts.append(n)
        n *= 2
    return (*counts, max_threads)


class ThreadTuner:
    """Owns the thread count the engine's next step should use."""

    def __init__(self, max_threads: int, *, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = 1.0, max_interval: float = 64.0, backoff: float = 4.0,
                 probe_steps: int = 3, margin: float = 0.1, drift: float = 1.5,
                 window: int = 8) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.counts = ladder(max_threads)
        self.current = max_threads
        self.switches = 0  # moves of ``current`` (a metric for the logs and tests)
        self._clock = clock
        self._min, self._max, self._backoff = min_interval, max_interval, backoff
        self._interval = min_interval
        self._next_probe = clock() + min_interval
        self._probe_steps, self._margin, self._drift = probe_steps, margin, drift
        self._window = window
        self._recent: dict[Hashable, deque[float]] = {}  # key -> last step times at ``current``
        self._settled: dict[Hashable, float] = {}  # key -> the median when the choice settled
        self._trial: int | None = None
        self._trial_times: dict[Hashable, list[float]] = {}
        self._trial_seen = 0
        self._down = True  # which neighbour on the ladder the next probe tries
        self._skip = 0  # steps not to average (the first one back after a probe)

    @property
    def threads(self) -> int:
        """The count the next step should run with."""
        return self.current if self._trial is None else self._trial

    def observe(self, key: Hashable, seconds: float) -> None:
        """Account one step of shape ``key`` that took ``seconds`` at ``self.threads``."""
        if self._trial is not None:
            self._observe_trial(key, seconds)
            return
        if self._skip:
            self._skip -= 1
            return
        recent = self._recent.setdefault(key, deque(maxlen=self._window))
        recent.append(seconds)
        if len(recent) == self._window:
            now = median(recent)
            settled = self._settled.setdefault(key, now)
            if now > self._drift * settled or now * self._drift < settled:
                self._settled[key] = now  # the machine changed under us: look again soon
                self._interval = self._min
                self._next_probe = min(self._next_probe, self._clock())
        # probe from a shape with a full history: the next steps are likely of the same shape
        if len(self.counts) > 1 and len(recent) == self._window and \
                self._clock() >= self._next_probe:
            self._start_trial()

    def _start_trial(self) -> None:
        i = self.counts.index(self.current)
        lower = self.counts[i - 1] if i > 0 else None
        upper = self.counts[i + 1] if i + 1 < len(self.counts) else None
        pick = lower if (self._down and lower is not None) or upper is None else upper
        self._down = not self._down
        self._trial, self._trial_times, self._trial_seen = pick, {}, 0

    def _observe_trial(self, key: Hashable, seconds: float) -> None:
        self._trial_seen += 1
        if self._trial_seen > 1:  # the first step after a switch pays for the new team
            self._trial_times.setdefault(key, []).append(seconds)
        if self._trial_seen <= self._probe_steps:
            return
        trial, self._trial = self._trial, None
        ratios = [median(times) / median(self._recent[k])
                  for k, times in self._trial_times.items()
                  if len(self._recent.get(k, ())) >= self._probe_steps]
        now = self._clock()
        log.debug("CPU threads: probe of %d against %d: %s", trial, self.current,
                  f"{median(ratios):.2f}x the step time" if ratios else "no comparable steps")
        if ratios and median(ratios) < 1 - self._margin:
            log.info("CPU threads: %d -> %d (steps took %.2fx the time at %d)", self.current,
                     trial, median(ratios), trial)
            self.current = trial
            self.switches += 1
            self._recent = {k: deque(t, maxlen=self._window) for k, t in self._trial_times.items()}
            self._settled = {}
            self._interval = self._min
        else:  # lost, or no step to compare with: look again later
            self._skip = 1
            self._interval = min(self._max, self._interval * self._backoff)
        self._next_probe = now + self._interval
