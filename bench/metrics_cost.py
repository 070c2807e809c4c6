"""What the metrics cost per engine step and per finished choice, this tree vs a baseline tree.

Run (from the repository root):
    nice -n 19 python bench/metrics_cost.py --baseline /tmp/gptserve-46c2ba1
    nice -n 19 python bench/metrics_cost.py --shares OLD.prof NEW.prof OLD.core NEW.core

The first form times, in a fresh process per tree (thread CPU time, in-process), the calls the
server makes for metrics: per engine step (a baseline's ``Metrics.observe_step``, prometheus_client
calls in the front end; this tree's ``CoreCounters.add_step``, in the core) and per finished
choice of 128 tokens (a baseline's core ``_metrics``, its inter-token gaps on the wire, and the
front end's ``observe_finished``; this tree's core ``add_finished`` and the front end's
``observe_finished``). The second form reads cProfile stats written by ``bench/hostcost.py
--profile`` (the event loop's, and the core's with suffix ``.core``) and prints the share of their
own time spent in the metrics code.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent.parent
TOKENS = 128  # per finished choice


def per_call(fn, n: int) -> float:
    """Microseconds of thread CPU time per call of ``fn``."""
    for _ in range(n // 20):
        fn()
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n * 1e6


def worker() -> None:
    """Time this tree's metrics calls (run with ``PYTHONPATH`` = the tree)."""
    from service.engine.types import EngineStats
    from service.metrics import Metrics

    metrics = Metrics()
    times = [100.0 + 0.004 * i for i in range(TOKENS)]
    seq = SimpleNamespace(request=SimpleNamespace(arrival_time=99.9), admitted_at=99.95,
                          token_times=times, finished_at=times[-1])
    try:
        from service.engine.counters import CoreCounters
    except ImportError:  # a tree from before the core's counts: the front end's observations
        from service.engine.types import RequestMetrics

        stats = EngineStats(256, 0, 0.5, 0.004, 256, 0, 256, 0, 77)
        gaps = tuple(b - a for a, b in itertools.pairwise(times))
        timings = RequestMetrics(0.05, 0.15, gaps, 0.66)
        rows = [
            ("per step, front end: Metrics.observe_step", per_call(
                lambda: metrics.observe_step(stats), 20000)),
            (f"per choice, core: its {TOKENS - 1} gaps (core._metrics' pairwise)", per_call(
                lambda: tuple(b - a for a, b in itertools.pairwise(times)), 5000)),
            ("per choice, front end: observe_finished", per_call(
                lambda: metrics.observe_finished("length", timings, TOKENS), 5000)),
        ]
    else:
        counters = CoreCounters.in_memory()
        rows = [
            ("per step, core: CoreCounters.add_step", per_call(
                lambda: counters.add_step(0.004, 256, 0, 256, 0, 0, 0, 0), 20000)),
            ("per choice, core: add_finished, one a step", per_call(
                lambda: counters.add_finished([seq], 100.6), 5000)),
            ("per choice, core: add_finished, four a step (/4)", per_call(
                lambda: counters.add_finished([seq] * 4, 100.6), 5000) / 4),
            ("per choice, front end: observe_finished", per_call(
                lambda: metrics.observe_finished("length", TOKENS), 5000)),
        ]
    for name, us in rows:
        print(f"  {name:<52} {us:7.2f} us", flush=True)


def shares(paths: list[str]) -> None:
    """The share of each profile's own time spent in the metrics code (with what it calls)."""
    for path in paths:
        stats = pstats.Stats(path).stats
        total = sum(entry[2] for entry in stats.values())
        metrics = 0.0
        rows = []
        for (file, _line, func), (_cc, _nc, _own, cumulative, callers) in stats.items():
            top = file.endswith(("service/metrics.py", "service/engine/counters.py"))
            scrape = func in ("render", "collect")  # once a scrape, not a step or a token
            if top and not scrape and not any(c[0] == file for c in callers):  # entry points
                rows.append((f"{Path(file).name}:{func}", cumulative))
                metrics += cumulative
            elif file.endswith("service/engine/core.py") and func == "_metrics":
                rows.append(("core.py:_metrics", cumulative))
                metrics += cumulative
        print(f"{path}: {metrics / total:.1%} of {total:.1f} s in the metrics code")
        for name, seconds in sorted(rows, key=lambda r: -r[1])[:6]:
            print(f"  {name:<40} {seconds / total:6.1%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a worktree of the baseline commit")
    parser.add_argument("--shares", nargs="+", help="cProfile stats files to read")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker()
    elif args.shares:
        shares(args.shares)
    else:
        for tree in [t for t in (args.baseline, HERE) if t is not None]:
            print(tree.name, flush=True)
            subprocess.run([sys.executable, __file__, "--worker"], cwd=tree, check=True,
                           env={**os.environ, "PYTHONPATH": str(tree)})


if __name__ == "__main__":
    main()
