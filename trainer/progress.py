"""What a person watching a run sees: the step bar with its ETA, and progress through an eval.

On a terminal both are tqdm bars; when stderr is a file or a pipe (``nohup``, CI), the step bar
redraws at most every 30 s and an eval prints plain lines instead of a bar.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

NON_TTY_INTERVAL_S = 30.0


class TrainClock:
    """Wall time spent training: from one optimizer step's end to the next one's, except across
    work that is not training (an eval, a checkpoint), which ``restart`` leaves out. So the ETA
    and tokens/s exclude evals, while a GPU sync at logging time still counts as training.

    A process's first step is left out too: it pays one-time costs (lazy imports, kernel
    selection, allocator warm-up) that would inflate the ETA (nanoGPT skips early steps for MFU).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0  # steps timed, the warm-up step excluded
        self._warm = False
        self._mark = time.perf_counter()

    def lap(self) -> None:
        """Call after each optimizer step."""
        now = time.perf_counter()
        if self._warm:
            self.seconds += now - self._mark
            self.steps += 1
        self._warm = True
        self._mark = now

    def restart(self) -> None:
        """Call after anything that is not training; its time is not counted."""
        self._mark = time.perf_counter()

    def eta(self, steps_left: int) -> float | None:
        return None if self.steps == 0 else steps_left * self.seconds / self.steps


class ProgressBar:
    """A tqdm bar over optimizer steps: the last logged loss, tokens/s and MFU, and an ETA from
    training time alone (tqdm's own ETA would count evals and checkpoints)."""

    def __init__(self, start: int, total: int, clock: TrainClock, enabled: bool) -> None:
        self.position, self.total = start, total
        self.clock = clock
        self._stats = ""
        self._postfix = ""
        self._bar = tqdm(
            total=total,
            initial=start,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if _isatty() else NON_TTY_INTERVAL_S,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def step(self) -> None:
        self.position += 1
        eta = self.clock.eta(self.total - self.position)
        parts = [self._stats] if self._stats else []
        if eta is not None:
            parts.append(f"eta {_clock(eta)}")
        self._postfix = ", ".join(parts)
        self._bar.set_postfix_str(self._postfix, refresh=False)
        self._bar.update(1)

    def show(self, loss: float, tokens_per_s: float | None, mfu: float | None) -> None:
        """The latest logged metrics, shown from the next step on."""
        self._stats = f"loss {loss:.4f}"
        if tokens_per_s is not None and mfu is not None:
            self._stats += f", {tokens_per_s:,.0f} tok/s, mfu {100 * mfu:.1f}%"

    @property
    def postfix(self) -> str:
        """What the bar shows after the counts: the logged metrics and the ETA."""
        return self._postfix

    def write(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)  # above the bar, unbuffered under nohup

    def close(self) -> None:
        self._bar.close()


class EvalProgress:
    """Progress through one evaluation's batches: a transient bar on a terminal, else a start
    line and a line every 30 s, so a long eval (the one at step 0 above all) shows life."""

    def __init__(self, step: int, total: int, enabled: bool) -> None:
        self.step, self.total, self.done = step, total, 0
        self._bar = None
        self._lines = enabled and not _isatty()
        if enabled and _isatty():
            self._bar = tqdm(total=total, desc=f"eval step {step}", unit="batch", leave=False)
        elif self._lines:
            _print(f"eval step {step}: {total} batches")
        self._last_line = time.perf_counter()

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._lines and time.perf_counter() - self._last_line >= NON_TTY_INTERVAL_S:
            self._last_line = time.perf_counter()
            _print(f"eval step {self.step}: {self.done}/{self.total} batches")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _print(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _isatty() -> bool:
    return sys.stderr.isatty()
