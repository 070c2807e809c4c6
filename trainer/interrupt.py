"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal only raises a flag; the loop checks it between optimizer steps (and between eval
batches), saves ``latest/`` and stops, so no step since the last checkpoint is lost. The handler is
then the default one again: a second Ctrl-C interrupts at once (``KeyboardInterrupt``), leaving
``latest/`` as it was (checkpoints are swapped in atomically, never half-written).

Under torchrun every rank checks the flag at the same points and the ranks agree on it with one
all-reduce (MAX), so they all stop at the same step even if the signal reached only some of them.
Reading that all-reduce's result syncs a GPU, so between steps they check only every
``check_every`` steps (the log interval, where the loop syncs anyway).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from trainer.distributed import DistContext

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Owns the SIGINT/SIGTERM handlers while a run trains; ``requested()`` says whether to stop."""

    def __init__(self, ctx: DistContext, device: torch.device, check_every: int = 1) -> None:
        self.ctx, self.device, self.check_every = ctx, device, check_every
        self.received = 0  # the signal number, 0 while none arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        signal.signal(signum, self._previous[signum])  # a second one acts at once

    def requested(self, step: int | None = None) -> int:
        """The signal to stop for (0: keep going); the same answer on every rank.

        With ``step`` (between optimizer steps), ranks of a job look only every ``check_every``.
        """
        if not self.ctx.enabled:
            return self.received
        if step is not None and step % self.check_every != 0:
            return 0
        flag = torch.tensor([self.received], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
