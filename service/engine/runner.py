"""The model runner: the model resident on its device, its KV cache, and the step's forward.

``execute(plan)`` turns the scheduler's plan into packed forwards over the cache and returns the
logits of every sequence that samples this step. By default the whole step (every decode token
and every prefill chunk) is one packed forward (``model.GPT.forward_packed``). With
``batch_invariant`` the decode rows run as one fixed-shape batch (every slot, the whole window)
and each prefill chunk as its own forward, so a row's arithmetic never depends on which other
sequences share its step (CPU matmul kernels change their per-row results with the row count).

The n choices of a request share their prompt: a prompt chunk is computed once, by the first
choice scheduled with it (the leader), and its keys and values are copied into the other
choices' slots; they sample from the leader's logits with their own seeds. A sequence admitted
with a reused prefix (``service.engine.slots``) gets that prefix's rows copied into its slot first.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from model.cpu_gemv import CpuGemv, KernelUnavailable, load_cpu_gemv
from model.gpt import GPT
from model.kv_cache import KVCache
from service.engine.graphs import StaticDecode
from service.engine.input_batch import DecodeInputs
from service.engine.scheduler import ScheduledChunk, SchedulerOutput
from service.engine.sequence import Sequence

log = logging.getLogger(__name__)


class RunnerOutput(NamedTuple):
    """The sequences that sample this step and their next-token logits (R, V), row by row (a
    named tuple: one is made per step)."""

    rows: tuple[Sequence, ...]
    logits: torch.Tensor | None


class ModelRunner:
    """Owns the model on ``device``/``dtype`` (its weights quantized to int8 with
    ``quantization="int8"``: a copy, the caller's model is left as it is) and the preallocated
    KV cache of ``n_slots`` slots."""

    def __init__(
        self, model: GPT, n_slots: int, device: torch.device, dtype: torch.dtype,
        batch_invariant: bool = False, *, cuda_graphs: bool = False, compile: bool = False,
        prepack: bool = False, cpu_gemv: bool = False, quantization: str = "none",
    ) -> None:
        if quantization == "int8":  # from the checkpoint's own weights, before any cast
            model = model.quantize_int8()
        self.model = model.to(device=device, dtype=dtype).eval()
        if device.type == "cpu":  # before prepacking: its copies are oneDNN's own allocations
            arena = self.model.move_weights_to_huge_pages()
            if arena is not None:
                log.info("%s", arena.describe())
        # oneDNN over prepacked weights (``memory.prepacks`` decides when to try; the warm-up keeps
        # them only for the row counts where they pay)
        self.prepacked = prepack and self.model.prepack_cpu_weights()
        # the project's one-row kernel (``model.cpu_gemv``), tried by the warm-up the same way
        self.gemv = _load_gemv() if cpu_gemv and dtype == torch.float32 else None
        self.config = model.config
        self.device = device
        self.n_slots = n_slots
        self.batch_invariant = batch_invariant
        self.kv = KVCache.for_model(model.config, n_slots, device=device, dtype=dtype)
        self.static = None  # decode-only steps through bucketed static buffers
        self._warm = False
        if not batch_invariant and (compile or (cuda_graphs and device.type == "cuda")):
            self.static = StaticDecode(self.model, self.kv, cuda_graphs=cuda_graphs,
                                       compile=compile)
        # eager decode-only steps over slots 0..D-1: the persistent batch (fixed shapes for
        # batch invariance and the static buffers above have their own inputs)
        self.inputs = None if batch_invariant or self.static is not None else DecodeInputs(self.kv)

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        for copy in plan.copies:  # reused prefixes, in admission order, before anything reads them
            self.kv.copy_slot(copy.source, copy.target, 0, copy.length)
        if self.inputs is not None and not plan.prefill and plan.decode:
            # decode only (in increasing slot order): the persistent batch (a decode chunk is
            # its window's last position: the token sampled last step)
            seqs = tuple([c.seq for c in plan.decode])
            slots = None if seqs[-1].slot == len(seqs) - 1 else [s.slot for s in seqs]
            batch = self.inputs.batch([s.tokens[-1] for s in seqs],
                                      [c.start for c in plan.decode], slots)
            return RunnerOutput(seqs, self.model.forward_packed(batch, self.kv))
        leaders, followers = _share_prompts(plan.prefill)
        # a decode chunk is its window's last position: the token sampled last step
        decode = [(c.seq.slot, c.start, c.seq.tokens[-1]) for c in plan.decode]
        chunks = [(c.seq.slot, c.start, c.seq.window(c.start, c.end), c.samples) for c in leaders]
        rows = [c.seq for c in plan.decode] + [c.seq for c in leaders if c.samples]
        if self.batch_invariant:
            logits = self._invariant_forwards(decode, chunks)
        elif self.static is not None and decode and not plan.prefill:
            logits = self.static.run(decode)
        elif decode or chunks:
            logits = self.model.forward_packed(self.kv.pack(decode, chunks), self.kv)
        else:
            logits = None
        if followers:
            index = {id(c.seq): r for r, c in enumerate(plan.decode)}
            index.update({id(c.seq): len(plan.decode) + r
                          for r, c in enumerate(c for c in leaders if c.samples)})
            gather = list(range(len(rows)))
            for follower, leader in followers:
                self.kv.copy_slot(leader.seq.slot, follower.seq.slot, follower.start, follower.end)
                if follower.samples:
                    rows.append(follower.seq)
                    gather.append(index[id(leader.seq)])
            if len(gather) > len(index):
                logits = logits.index_select(
                    0, torch.tensor(gather, dtype=torch.long, device=logits.device))
        return RunnerOutput(tuple(rows), logits)

    def _invariant_forwards(self, decode, chunks) -> torch.Tensor | None:
        """Fixed shapes: decode over every slot and the whole window, each chunk alone."""
        out = []
        if decode:
            batch = self.kv.pack(decode, decode_width=self.n_slots,
                                 decode_length=self.config.block_size)
            logits = self.model.forward_packed(batch, self.kv)  # (n_slots, V): row i is slot i
            slots = torch.tensor([slot for slot, _, _ in decode], device=logits.device)
            out.append(logits.index_select(0, slots))
        for chunk in chunks:
            logits = self.model.forward_packed(self.kv.pack([], [chunk]), self.kv)
            if chunk[3]:
                out.append(logits)
        return torch.cat(out) if out else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One throwaway decode over padding rows (they write only into the scratch slot); on
        CPU, keep the prepacked weights only for the row counts where they make a full decode
        step faster here; with CUDA graphs, capture every decode bucket."""
        if self._warm:
            return
        self._warm = True
        batch = self.kv.pack([], decode_width=self.n_slots)
        self.model.forward_packed(batch, self.kv)
        if self.prepacked or self.gemv is not None:
            self._choose_products(min(self.n_slots, 32))
        if self.static is not None and self.static.cuda_graphs:
            t0 = time.perf_counter()
            n = self.static.capture_all()
            log.info("captured %d CUDA graphs for decode steps in %.1f s", n,
                     time.perf_counter() - t0)

    def _choose_products(self, width: int, reps: int = 4) -> None:
        """Time a one-row and a ``width``-row decode step with each matrix product this engine
        may use (PyTorch's ``F.linear``; oneDNN over the prepacked weights; for one row, the
        project's kernel, product by product or the whole network in one call) and keep the
        fastest for each row count, where it is at least 5% faster than ``F.linear`` (which wins
        depends on the model's width, the dtype and the CPU: docs/BENCHMARKS.md, "One-row kernel
        and huge pages" and "Where a step's time goes", has the figures)."""
        model, chosen = self.model, {}
        for rows in sorted({1, width}):
            options = {"F.linear": (None, False, False)}  # (kernel, oneDNN, fused)
            if self.prepacked:
                options["oneDNN"] = (None, True, False)
            if rows == 1 and self.gemv is not None:
                options["kernel"] = (self.gemv, False, False)
                options["fused kernel"] = (self.gemv, False, True)
            # one row: a real one (slot 0, position 0: no sequence holds a slot before the
            # warm-up, and a sequence writes a position before it reads it), as padding rows
            # attend another slot than the one they write (``KVCache.pack``) and never take
            # the fused kernel; several: padding rows, writing only into the scratch slot
            batch = self.kv.pack([(0, 0, 0)]) if rows == 1 else self.kv.pack(
                [], decode_width=rows)
            best, logits = dict.fromkeys(options, float("inf")), {}
            # interleaved (A B C A B C ...): a slow spell of a shared machine hits every option
            for rep in range(reps + 1):  # the first round warms each option up, untimed
                for name, (gemv, packed, fused) in options.items():
                    model.use_cpu_gemv(gemv, fused)
                    if self.prepacked:
                        model.prepack_cpu_weights(True, (packed, packed))
                    t0 = time.perf_counter()
                    logits[name] = model.forward_packed(batch, self.kv)
                    if rep:
                        best[name] = min(best[name], time.perf_counter() - t0)
            for name in _disagreeing(logits):  # a bad build must never reach a user's tokens
                log.warning("matrix products of a %d-row step: %s gave other logits than "
                            "F.linear; not used", rows, name)
                del best[name]
            fastest = min(best, key=best.get)
            chosen[rows] = fastest if best[fastest] < 0.95 * best["F.linear"] else "F.linear"
            log.info("matrix products of a %d-row step: %s; kept %s", rows,
                     ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in best.items()), chosen[rows])
        one, several = chosen[1] == "oneDNN", chosen[width] == "oneDNN"
        if self.prepacked:
            self.prepacked = model.prepack_cpu_weights(one or several, (one, several))
        self.gemv = self.gemv if chosen[1] in ("kernel", "fused kernel") else None
        model.use_cpu_gemv(self.gemv, fused=chosen[1] == "fused kernel")


def _disagreeing(logits: dict[str, torch.Tensor]) -> list[str]:
    """The options whose logits differ from ``F.linear``'s by more than float rounding (1e-3 of
    the largest logit: another summation order moves them by ~1e-6 of it)."""
    want = logits["F.linear"]
    tol = 1e-3 * max(1.0, want.abs().max().item())
    return [name for name, got in logits.items()
            if got.shape != want.shape or not torch.allclose(got, want, rtol=0.0, atol=tol)]


def _load_gemv() -> CpuGemv | None:
    """The one-row kernel, or None (logged) where it cannot be built or loaded here."""
    try:
        return load_cpu_gemv()
    except KernelUnavailable as e:
        log.info("one-row CPU kernel not used: %s", e)
        return None


def _share_prompts(
    prefill: tuple[ScheduledChunk, ...],
) -> tuple[list[ScheduledChunk], list[tuple[ScheduledChunk, ScheduledChunk]]]:
    """Split prefill chunks into those to compute (leaders) and (follower, leader) pairs whose
    keys and values are copies: choices of one request that have generated nothing yet hold the
    same window, so the same chunk of it is computed once."""
    leaders, followers, first = [], [], {}
    for chunk in prefill:
        seq = chunk.seq
        key = (seq.request_id, chunk.start, chunk.end)
        if seq.num_generated == 0 and key in first:
            followers.append((chunk, first[key]))
            continue
        if seq.num_generated == 0:
            first[key] = chunk
        leaders.append(chunk)
    return leaders, followers
