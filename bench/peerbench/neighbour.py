"""A busy neighbour: processes that spin on the CPU for the whole benchmark, as a browser tab, a
build or another pod would on a shared machine (``bench/peers.py --neighbour N``).

Each is a plain ``python -c 'while True: pass'`` at normal priority, pinned to a CPU only when
asked (``--neighbour-cpu``; unpinned, the kernel keeps it on one core at a time). ``report`` says
what share of a core each one actually got, so a run can show the neighbour was really there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


class Neighbour:
    """``count`` busy-looping processes, started on ``__enter__`` and killed on ``__exit__``."""

    def __init__(self, count: int, cpu: int | None = None) -> None:
        self.count, self.cpu = count, cpu
        self.procs: list[subprocess.Popen] = []
        self.started = 0.0

    def __enter__(self) -> Neighbour:
        pin = None if self.cpu is None else (lambda: os.sched_setaffinity(0, {self.cpu}))
        for _ in range(self.count):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                               preexec_fn=pin))
        self.started = time.monotonic()
        return self

    def cpu_share(self) -> list[float]:
        """Each neighbour's CPU time over its wall time so far (1.0 = a whole core)."""
        tick, wall = os.sysconf("SC_CLK_TCK"), max(1e-9, time.monotonic() - self.started)
        shares = []
        for proc in self.procs:
            try:
                fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            shares.append((int(fields[11]) + int(fields[12])) / tick / wall)
        return shares

    def describe(self) -> str:
        if not self.count:
            return "neighbour: none"
        where = "unpinned" if self.cpu is None else f"pinned to CPU {self.cpu}"
        return (f"neighbour: {self.count} busy-looping process(es), {where}, normal priority "
                "(`python -c 'while True: pass'`)")

    def __exit__(self, *exc) -> None:
        shares = self.cpu_share()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        if self.count:
            print("neighbour CPU share over the run (1.0 = one core): "
                  + ", ".join(f"{s:.2f}" for s in shares), flush=True)
