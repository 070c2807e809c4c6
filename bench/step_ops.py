"""Where a decode step's host time goes: each part of ``EngineCore.step`` timed alone.

Run (from the repository root):
    nice -n 19 python bench/step_ops.py            # one row
    nice -n 19 python bench/step_ops.py --rows 32

The model is ``bench/hostcost.py``'s stand-in (fixed logits, one intra-op thread), so a step is
host work only. ``--rows`` greedy sequences decode together; each line is the best of 5 loops of
the CPU time (``time.process_time``) of one call. The parts are timed alone, each with hot caches, so they add
up to less than the whole step; the last line times the whole step's parts inside a stepping loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

# this tree's code (not an installed copy), and the stand-in beside this script
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from hostcost import PROMPT, stand_in_engine  # noqa: E402

from service.engine.types import EngineStats, Request, SamplingParams  # noqa: E402


def per_call(fn, n: int = 2000) -> float:
    """CPU seconds of one call of ``fn``: the best of 5 loops of ``n`` calls."""
    best = float("inf")
    for _ in range(5):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c0) / n)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1, help="sequences decoding together")
    n_rows = parser.parse_args(argv).rows
    engine = stand_in_engine(n_rows)
    core = engine._core
    core.apply_threads()
    core.runner.warm_up()
    params = SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    for i in range(n_rows):
        core.add_request(Request(f"x{i}", tuple(engine.tokenizer.encode(PROMPT)), params))
    core.step()  # the prompts
    core.step()  # decoding from here on
    runner, sampler, kv = core.runner, core.sampler, core.runner.kv
    rows: list[tuple[str, float]] = []
    with torch.inference_mode():
        rows.append(("EngineCore.step(), the caller in inference mode", per_call(core.step, 300)))
        plan = core.scheduler.schedule()
        position = plan.decode[0].start
        tokens, positions = [5] * n_rows, [c.start for c in plan.decode]
        packed_rows = list(zip(range(n_rows), positions, tokens, strict=True))
        batch = runner.inputs.batch(tokens, positions)
        run = runner.execute(plan)
        argmax = run.logits.argmax(dim=-1)
        rows += [
            ("  Scheduler.schedule()", per_call(core.scheduler.schedule)),
            ("  ModelRunner.execute(plan)", per_call(lambda: runner.execute(plan))),
            ("    DecodeInputs.batch (the persistent batch)",
             per_call(lambda: runner.inputs.batch(tokens, positions))),
            ("      KVCache.slots_view (two narrow ops)",
             per_call(lambda: kv.slots_view(n_rows, position + 1))),
            ("    KVCache.pack of the same rows (the path before)",
             per_call(lambda: kv.pack(packed_rows))),
            ("    stand-in forward_packed (a view per row count)",
             per_call(lambda: runner.model.forward_packed(batch, kv))),
            ("  Sampler (all greedy)", per_call(lambda: sampler(run.logits, run.rows))),
            ("    argmax and tolist through NumPy (the sampler's)",
             per_call(lambda: sampler._greedy(run.logits))),
            ("    torch argmax (the sampler's before)", per_call(lambda: run.logits.argmax(dim=-1))),
            ("    tolist", per_call(argmax.tolist)),
            ("  EngineStats(...)",
             per_call(lambda: EngineStats(1, 0, 0.1, 0.1, 1, 0, 1, 0, 5, 0, 0, 0))),
        ]
    rows.append(("EngineCore.step(), entering inference mode itself", per_call(core.step, 300)))

    def enter_exit() -> None:
        with torch.inference_mode():
            pass

    rows.append(("  with torch.inference_mode(): pass", per_call(enter_exit)))
    print(f"{n_rows} row(s)")
    for name, seconds in rows:
        print(f"{name:56s} {seconds * 1e6:7.2f} us")
    # the same parts inside a stepping loop (cold caches between them, as when serving)
    spent: Counter[str] = Counter()
    for owner, name in ((core.scheduler, "schedule"), (runner, "execute"),
                        (core, "update_from_output")):
        fn = getattr(owner, name)

        def timed(*args, _fn=fn, _name=name):
            c0 = time.process_time()
            out = _fn(*args)
            spent[_name] += time.process_time() - c0
            return out

        setattr(owner, name, timed)
    n = 3000
    with torch.inference_mode():
        c0 = time.process_time()
        for _ in range(n):
            core.step()
        total = time.process_time() - c0
    parts = ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in spent.items())
    print(f"in a loop of {n} steps: {total / n * 1e6:.1f} us a step")
    print(f"  ({parts} us; the rest: sampling, events, stats)")


if __name__ == "__main__":
    main()
