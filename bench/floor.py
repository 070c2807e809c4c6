"""How fast can eager PyTorch run one decode step of a model on this machine? The floor under the
engine, measured side by side in one process.

For ``--rows`` sequences at position ``--position`` it times, median of interleaved rounds:

1. ``engine step``: ``EngineCore.step`` on decoding sequences (schedule, pack, the packed forward
   over the KV cache, sampling, bookkeeping), the default engine settings;
2. ``packed forward``: ``GPT.forward_packed`` alone on the same kind of batch;
3. ``minimal forward``: the same network written as the fewest eager calls that compute it
   (no cache writes, no packing, no mask: random keys and values of the right shape), greedy
   argmax at the end: what any eager-PyTorch engine pays at least;
4. ``weight products``: the minimal forward's matrix products alone, and ``prepacked products``:
   the same through oneDNN over weights reordered once (what the engine's warm-up keeps on CPU
   where it is faster), and at one row ``kernel products``: the same through the project's own
   one-row kernel (``model.cpu_gemv``), where it builds;
   at one row also the packed forward with each product forced (``packed forward, F.linear`` /
   ``oneDNN`` / ``kernel`` / ``fused kernel``, the whole network in one call of the kernel
   library): what the engine's warm-up chooses between; and ``kernel, 4 KiB
   pages``: the kernel over copies of the weights in PyTorch's own allocations, against the
   runner's huge-page arena (``model.huge_pages``);
5. ``read every weight``: one ``sum`` over each weight tensor, the bandwidth floor of a one-row
   step (every weight byte read once);
6. with ``--compile``, the minimal forward through ``torch.compile`` (Inductor, static shapes;
   ``--cpp-wrapper`` for its C++ wrapper) and the compile time.

    OMP_NUM_THREADS=1 python bench/floor.py --checkpoint weights/shakespeare-char --rows 1 32
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
from model.cpu_gemv import CpuGemv, KernelUnavailable, load_cpu_gemv  # noqa: E402
from model.kv_cache import KVCache  # noqa: E402
from service.engine import EngineConfig, Request, SamplingParams  # noqa: E402
from service.engine.core import EngineCore  # noqa: E402
from service.engine.runner import ModelRunner  # noqa: E402


def median_us(fn: Callable[[], object], reps: int, rounds: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def minimal_forward(model, rows: int, length: int, products_only: bool = False,
                    prepacked: bool = False, kernel: CpuGemv | None = None):
    """The network as the fewest eager calls (tied LM head, pre-LayerNorm, exact or tanh GELU),
    attending over random keys/values of ``length`` positions; returns a zero-argument step."""
    cfg = model.config
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh
    w = model._inference_weights()  # the parameters as the engine's forward reads them
    dtype = w.wte.dtype
    kv = [(torch.randn(rows, nh, length, hs, dtype=dtype),
           torch.randn(rows, nh, length, hs, dtype=dtype)) for _ in w.layers]
    tokens = torch.full((rows,), 1)
    positions = torch.full((rows,), length - 1)
    linear = F.linear
    if prepacked:
        packs = {id(t): torch.ops.mkldnn._reorder_linear_weight(t, rows)
                 for layer in w.layers for t in (layer[2], layer[4], layer[8], layer[10])}
        packs[id(w.wte)] = torch.ops.mkldnn._reorder_linear_weight(w.wte, rows)

        def linear(x, weight, bias=None):
            return torch.ops.mkldnn._linear_pointwise(x, packs[id(weight)], bias, "none", [], "")
    elif kernel is not None:
        def linear(x, weight, bias=None):
            return kernel.multiply(x, weight, bias)

    def step(tokens=tokens, positions=positions):
        x = F.embedding(tokens, w.wte) + F.embedding(positions, w.wpe)
        for (ln1, ln1b, wa, ba, wp, bp, ln2, ln2b, wf, bf, wf2, bf2), (k, v) in zip(
                w.layers, kv, strict=True):
            if products_only:
                linear(x, wa, ba)
                x = x + linear(x, wp, bp)
                x = x + linear(linear(x, wf, bf), wf2, bf2)
                continue
            qkv = linear(F.layer_norm(x, (C,), ln1, ln1b, 1e-5), wa, ba)
            y = F.scaled_dot_product_attention(qkv[:, :C].view(rows, nh, 1, hs), k, v)
            x = x + linear(y.view(rows, C), wp, bp)
            h = linear(F.layer_norm(x, (C,), ln2, ln2b, 1e-5), wf, bf)
            x = x + linear(F.gelu(h, approximate=w.gelu), wf2, bf2)
        return linear(F.layer_norm(x, (C,), w.ln_f, w.ln_f_bias, 1e-5), w.wte).argmax(-1)

    return step


def engine_step(checkpoint, rows: int, position: int
                ) -> tuple[Callable[[], object], Callable, ModelRunner]:
    """A default-settings engine with ``rows`` greedy sequences decoding near ``position``, and a
    packed forward of the same batch shape; returns (engine step, packed forward, its runner)."""
    config = EngineConfig(device="cpu", max_batch_size=rows)
    core = EngineCore(checkpoint.model, checkpoint.tokenizer.vocab_size, None, config, rows,
                      torch.device("cpu"), torch.float32)
    core.runner.warm_up()
    params = SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    prompt = tuple(i % checkpoint.tokenizer.vocab_size for i in range(position))
    for i in range(rows):
        core.add_request(Request(f"r{i}", prompt, params))
    while any(s.num_to_compute > 1 for s in core.scheduler.running) or core.scheduler.num_waiting:
        core.step()
    kv: KVCache = core.runner.kv
    batch = kv.pack([(s, position, 1) for s in range(rows)])
    model = core.runner.model
    return core.step, lambda: model.forward_packed(batch, kv), core.runner


def _forced_products(runner: ModelRunner, kernel: CpuGemv, packed: Callable, reps: int,
                     rounds: int) -> dict[str, float]:
    """The one-row packed forward with each matrix product forced, in interleaved rounds (the
    engine's own choice restored after)."""
    model = runner.model
    chosen = (runner.gemv, model._inference_weights().packed_for,
              model._inference_weights().one_token is not None)
    options = {"F.linear": (None, (False, False), False),
               "kernel": (kernel, (False, False), False),
               "kernel, 4 KiB pages": (kernel, (False, False), False),
               "fused kernel": (kernel, (False, False), True)}
    if runner.prepacked:
        options["oneDNN"] = (None, (True, True), False)
    times: dict[str, list[float]] = {name: [] for name in options}
    arena = [(p, p.data) for p in model.parameters()]  # the runner put them in huge pages
    small = [p.data.clone() for p, _ in arena]  # PyTorch's own allocations: 4 KiB pages
    for _ in range(rounds):
        for name, (gemv, rows, fused) in options.items():
            for (p, data), copy in zip(arena, small, strict=True):
                p.data = copy if "4 KiB" in name else data
            model._weights = None  # the forward's cached views of the parameters
            model.use_cpu_gemv(gemv, fused)
            if runner.prepacked:
                model.prepack_cpu_weights(True, rows)
            times[name].append(median_us(packed, reps, 1))
    for p, data in arena:
        p.data = data
    model._weights = None
    model.use_cpu_gemv(chosen[0], chosen[2])
    if runner.prepacked:
        model.prepack_cpu_weights(True, chosen[1])
    return {f"packed forward, {name}": statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="weights/shakespeare-char")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--position", type=int, default=60,
                   help="key positions each row attends over (keep it inside the window)")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cpp-wrapper", action="store_true")
    a = p.parse_args()
    checkpoint = load_checkpoint(a.checkpoint)
    model = checkpoint.model.eval()
    print(f"{a.checkpoint}: {model.config}; {torch.get_num_threads()} threads")
    weights = [t for layer in model._inference_weights().layers
               for t in (layer[2], layer[4], layer[8], layer[10])] + [model.transformer.wte.weight]

    def read_weights() -> None:
        for t in weights:
            t.sum()

    try:
        kernel = load_cpu_gemv()
    except KernelUnavailable as e:
        kernel = None
        print(f"one-row kernel not built: {e}")
    with torch.inference_mode():
        for rows in a.rows:
            step, packed, runner = engine_step(checkpoint, rows, a.position)
            minimal = minimal_forward(model, rows, a.position + 1)
            products = minimal_forward(model, rows, a.position + 1, products_only=True)
            # the engine's step generates tokens: keep it inside the window by timing few reps
            reps = min(a.reps, (model.config.block_size - a.position - 2) // a.rounds // 2 or 1)
            found = {"engine step": median_us(step, reps, a.rounds),
                     "packed forward": median_us(packed, a.reps, a.rounds),
                     "minimal forward": median_us(minimal, a.reps, a.rounds),
                     "weight products": median_us(products, a.reps, a.rounds)}
            if torch.backends.mkldnn.is_available():
                found["prepacked products"] = median_us(
                    minimal_forward(model, rows, a.position + 1, True, True), a.reps, a.rounds)
            if rows == 1 and kernel is not None:
                found["kernel products"] = median_us(
                    minimal_forward(model, rows, a.position + 1, True, kernel=kernel), a.reps,
                    a.rounds)
                found.update(_forced_products(runner, kernel, packed, a.reps, a.rounds))
            found["read every weight"] = median_us(read_weights, a.reps, a.rounds)
            if a.compile:
                import torch._inductor.config as inductor

                inductor.cpp_wrapper = a.cpp_wrapper
                t0 = time.perf_counter()
                compiled = torch.compile(minimal, fullgraph=True, dynamic=False)
                compiled()
                found[f"compiled minimal (compile {time.perf_counter() - t0:.1f} s)"] = (
                    median_us(compiled, a.reps, a.rounds))
            for name, us in found.items():
                print(f"rows {rows:3d}  {name:40s} {us:9.1f} us  "
                      f"({rows / us * 1e6:9.1f} tok/s)")


if __name__ == "__main__":
    main()
