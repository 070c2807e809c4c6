"""Which int8 weight-only matmul is fastest on this CPU? Every candidate PyTorch ships, against
fp32, on GPT-2-small's four weight shapes, at 1 row (one decoding stream) and 32 rows.

Candidates, each ``y = x @ dequant(W).T`` with W int8 per output channel:

1. ``fp32``: ``F.linear`` over the fp32 weight (MKL/oneDNN), the baseline;
2. ``fp32-packed``: oneDNN's matmul over the weight reordered once (what an fp32 engine uses at
   several rows, ``model.gpt._linear``);
3. ``int8pack``: ``torch.ops.aten._weight_int8pack_mm`` (gpt-fast's int8 path: fp32/bf16
   activations, int8 weight, per-channel scale, dequantised inside the kernel);
4. ``dynamic-fbgemm`` / ``dynamic-onednn``: ``torch.ao`` dynamic quantization
   (``quantized.linear_dynamic``: the activations quantized to uint8 per call, int8 x uint8 GEMM,
   one engine each);
5. ``dequant``: ``F.linear(x, W.float() * scale)`` in eager PyTorch (the naive path).

Each figure is the median of interleaved rounds (candidates alternate within a round), in
microseconds per call, with the rate of weight bytes it implies (bytes of the weight in its
format / time: the memory-bound figure that matters at one row). A weight this size stays in the
CPU's caches between calls (but for the LM head's), so these rates overstate what a whole decode
step reads from memory: ``--engine`` measures that.

With ``--engine CHECKPOINT`` (e.g. the peers' /tmp/gptserve-peers/gpt2-small-seed0), then the
whole engine on one stream, fp32 against ``quantization="int8"`` (interleaved rounds), and where
a one-row int8 decode step's time goes (``torch.profiler``, the step's operators by self time).

    nice -n 19 python bench/int8.py --threads 2
    nice -n 19 python bench/int8.py --threads 2 --shapes none \
        --engine /tmp/gptserve-peers/gpt2-small-seed0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.quantize import int8_weight_bytes  # noqa: E402
from service.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402

SHAPES = {  # GPT-2 small: (in, out) of each weight a decode step multiplies by
    "c_attn": (768, 2304),
    "c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
    "lm_head": (768, 50257),
}


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w ~= q * scale[:, None]``."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def candidates(w: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """Name -> (function of x, bytes of weight it reads)."""
    q, scale = quantize(w)
    bias = torch.zeros(w.shape[0])
    out = {
        "fp32": (lambda x: F.linear(x, w), w.numel() * 4),
        "int8pack": (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale), q.numel()),
        "dequant": (lambda x: F.linear(x, q.float() * scale[:, None]), q.numel()),
    }
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        out["fp32-packed"] = (
            lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            w.numel() * 4)
    for engine in ("fbgemm", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long),
                                        0, torch.qint8)
        prepacked = torch.ops.quantized.linear_prepack(qw, bias)
        out[f"dynamic-{engine}"] = (
            lambda x, p=prepacked, e=engine: _with_engine(
                e, lambda: torch.ops.quantized.linear_dynamic(x, p, True)), q.numel())
    return out


def _with_engine(engine: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    torch.backends.quantized.engine = engine
    return fn()


def time_us(fn: Callable[[], object], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, or 'none'")
    p.add_argument("--engine", type=Path, help="checkpoint for the whole-engine comparison")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; us per call (median of {args.rounds} "
          "interleaved rounds), GB/s of weight bytes read, speed-up over fp32")
    with torch.inference_mode():
        for name in [s for s in args.shapes.split(",") if s != "none"]:
            k, n = SHAPES[name]
            w = torch.randn(n, k) * 0.02
            fns = candidates(w)
            for rows in args.rows:
                x = torch.randn(rows, k)
                ref = F.linear(x, w)
                reps = max(3, int(2e5 / (n * k / 1e3)))  # ~ the same time per shape
                times = {c: [] for c in fns}
                for fn, _ in fns.values():
                    for _ in range(3):
                        fn(x)
                for _ in range(args.rounds):
                    for c, (fn, _) in fns.items():
                        times[c].append(time_us(lambda fn=fn, x=x: fn(x), reps))
                base = statistics.median(times["fp32"])
                for c, (fn, nbytes) in fns.items():
                    us = statistics.median(times[c])
                    err = (fn(x) - ref).abs().max().item() / ref.abs().max().item()
                    print(f"{name:>10} {k}->{n} rows {rows:>2}  {c:>15}: {us:9.1f} us "
                          f"{nbytes / us / 1e3:6.1f} GB/s  x{base / us:5.2f}  rel.err {err:.1e}")
    if args.engine:
        engine_one_stream(args.engine, args.threads, args.rounds, args.new_tokens)


def engine_one_stream(checkpoint: Path, threads: int, rounds: int, new_tokens: int) -> None:
    """Tokens/s of one greedy stream, fp32 and int8 engines resident side by side, rounds
    interleaved; then a profile of the int8 engine's one-row decode step."""
    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    fp32_bytes = 4 * (12 * cfg.n_layer * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd)
    engines = {q: Engine(ck, EngineConfig(quantization=q, threads=threads, device="cpu"))
               for q in ("none", "int8")}
    prompt = tuple(range(100, 116))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates: dict[str, list[float]] = {q: [] for q in engines}
    for eng in engines.values():
        eng.generate([Request("warm", prompt, SamplingParams(max_tokens=4, temperature=0.0))])
    for r in range(rounds):
        for q, eng in engines.items():
            t0 = time.perf_counter()
            eng.generate([Request(f"r{r}", prompt, params)])
            rates[q].append(new_tokens / (time.perf_counter() - t0))
    print(f"\nengine, one stream, {new_tokens} new tokens after a 16-token prompt, {threads} "
          f"threads, {rounds} interleaved rounds (median [range] tok/s; weight bytes per token)")
    for q, weights in (("none", fp32_bytes), ("int8", int8_weight_bytes(cfg))):
        med = statistics.median(rates[q])
        print(f"  {q:>5}: {med:7.1f} [{min(rates[q]):.1f}-{max(rates[q]):.1f}] tok/s, "
              f"{weights / 1e6:6.1f} MB/token = {weights * med / 1e9:5.1f} GB/s read")
    print(f"  int8 / fp32: {statistics.median(rates['int8']) / statistics.median(rates['none']):.2f}"
          " (ratio of medians)")
    runner = engines["int8"]._core.runner
    batch = runner.kv.pack([(0, 20, 5)])  # one decoding row at position 20
    with torch.inference_mode():
        for _ in range(3):
            runner.model.forward_packed(batch, runner.kv)
        with torch.profiler.profile() as prof:
            for _ in range(10):
                runner.model.forward_packed(batch, runner.kv)
    print("\nint8 one-row decode step, 10 steps (torch.profiler, by self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
