"""CPU threads and a busy neighbour: the engine in-process under each thread setting, on a quiet
machine and beside busy-looping processes, side by side in one run.

Run (GPT-2-small shape, fp32; the model is built in --workdir on first use, as bench/peers.py does):
    python bench/threads.py
    python bench/threads.py --checkpoint weights/shakespeare-char --neighbour 1

Each setting runs in a fresh worker process, because OpenMP's wait policy is read once, when torch
loads: ``1`` and ``2`` are fixed thread counts (``--threads``), ``auto`` is the engine's default
(every usable CPU, tuned by measured step times). The spin column is what libgomp was told:
``libgomp`` = its default (300,000 spins before sleeping), ``10000`` = gptserve's default
(``GOMP_SPINCOUNT``), ``passive`` = ``OMP_WAIT_POLICY=passive``. Each worker decodes greedily at 1
stream and at 32 (prompts of 16 tokens, ``--new-tokens`` each, ``--repeats`` times, median) and
prints tokens/s (prefill included). The neighbour is ``--neighbour`` busy-looping processes at
normal priority, unpinned, started before the workers and kept for their whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peerbench import models
from peerbench.neighbour import Neighbour

SETTINGS = (  # (threads, spin)
    ("1", "10000"),
    ("2", "libgomp"),
    ("2", "passive"),
    ("2", "10000"),
    ("auto", "10000"),
)
_WAITS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GPTSERVE_THREADS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: the GPT-2-small-shaped random model of bench/peers.py")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptserve-peers"))
    p.add_argument("--neighbour", type=int, default=1, help="busy-looping processes (default 1)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        return work(json.loads(a.worker))
    checkpoint = a.checkpoint or models.gpt2_small(a.workdir).hf
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"model: {checkpoint}; {len(os.sched_getaffinity(0))} CPUs; load average at start "
          f"{os.getloadavg()}", flush=True)
    rows = {}
    for label, count in (("quiet", 0), ("neighbour", a.neighbour)):
        with Neighbour(count) as neighbour:
            if count:
                print(neighbour.describe(), flush=True)
            for threads, spin in SETTINGS:
                job = {"checkpoint": str(checkpoint), "threads": threads,
                       "new_tokens": a.new_tokens, "repeats": a.repeats}
                rows[label, threads, spin] = run_worker(job, spin)
                print(f"{label:>9} threads={threads:<4} spin={spin:<7} "
                      + "  ".join(f"x{k}: {v:7.1f} tok/s" for k, v in rows[label, threads, spin]
                                  .items()), flush=True)
    print()
    print(table(rows))
    return 0


def run_worker(job: dict, spin: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in _WAITS}
    if spin == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    elif spin != "libgomp":
        env["GOMP_SPINCOUNT"] = spin
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"worker failed ({done.returncode}):\n{done.stderr[-2000:]}")


def work(job: dict) -> int:
    """One setting: the engine in this process, tokens/s at 1 and 32 streams."""
    from model.checkpoint import load_checkpoint
    from service.engine import Engine, EngineConfig, Request, SamplingParams

    threads = None if job["threads"] == "auto" else int(job["threads"])
    engine = Engine(load_checkpoint(job["checkpoint"]),
                    EngineConfig(max_batch_size=32, threads=threads))
    vocab = engine.vocab_size
    ids = iter(range(10**9))

    def rate(streams: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        requests = [Request(f"r{next(ids)}", tuple((i * 7 + j) % (vocab - 1) + 1
                                                   for j in range(16)), params)
                    for i in range(streams)]
        t0 = time.perf_counter()
        engine.generate(requests)
        return streams * new / (time.perf_counter() - t0)

    out = {}
    for streams in (1, 32):
        rate(streams, 4)  # warm this batch size up
        out[str(streams)] = statistics.median(rate(streams, job["new_tokens"])
                                              for _ in range(job["repeats"]))
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def table(rows: dict) -> str:
    lines = ["| machine | threads | spin | 1 stream tok/s | 32 streams tok/s |",
             "|---|---|---|---|---|"]
    for (label, threads, spin), r in rows.items():
        lines.append(f"| {label} | {threads} | {spin} | {r['1']:.1f} | {r['32']:.1f} |")
    lines.append("")
    for label in ("quiet", "neighbour"):
        auto = rows[label, "auto", "10000"]
        best = {k: max(r[k] for (lb, _, _), r in rows.items() if lb == label) for k in ("1", "32")}
        lines.append(f"{label}: default (auto, 10000) / best setting: 1 stream "
                     f"{auto['1'] / best['1']:.2f}, 32 streams {auto['32'] / best['32']:.2f}")
    for k in ("1", "32"):
        kept = rows["neighbour", "auto", "10000"][k] / rows["quiet", "auto", "10000"][k]
        was = rows["neighbour", "2", "libgomp"][k] / rows["quiet", "2", "libgomp"][k]
        lines.append(f"{k} stream(s): with the neighbour the default keeps {kept:.2f} of its quiet "
                     f"speed (2 threads with libgomp's spin, the old default, kept {was:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
