"""Decode-only steps over static input buffers, ready for CUDA graphs and ``torch.compile``.

A decode step's shapes are bucketed: the batch width (slots ``0..W-1``, padded) and the number of
key positions attention reads (``L``) are rounded up to powers of two, so a handful of shapes
covers every step. Per bucket, the step's inputs live in static tensors (token, position, cache
row and context length per slot) that the host fills with one copy; the attention mask is
computed from the lengths inside the captured region. On CUDA each bucket's forward is captured
once into a CUDA graph (nano-vllm and vLLM do the same) and replayed; elsewhere, or with graphs
off, the same function runs eagerly, or compiled with ``torch.compile`` when asked.

The logits come back for every slot of the bucket (row i is slot i); the runner picks the rows
that hold sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.gpt import GPT
from model.kv_cache import DecodeGroup, KVCache, PackedBatch


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), capped at ``limit``."""
    size = floor
    while size < n:
        size *= 2
    return min(size, limit)


@dataclass
class _Bucket:
    """One (width, length) shape: its static inputs, its batch view and its runnable."""

    inputs: torch.Tensor  # (4, W) int64: tokens, positions, cache rows, context lengths
    batch: PackedBatch
    run: Callable[[], torch.Tensor]


class StaticDecode:
    """Owns the static buffers and captured graphs (or compiled functions) of decode steps."""

    def __init__(self, model: GPT, kv: KVCache, *, cuda_graphs: bool, compile: bool) -> None:
        self.model, self.kv = model, kv
        self.device = kv.data.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.forward = torch.compile(model.forward_packed, fullgraph=True) if compile else (
            model.forward_packed)
        self._key_pos = torch.arange(kv.max_len, device=self.device)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = None  # CUDA graphs share one memory pool
        # the step's inputs are staged in one host buffer kept for the engine's lifetime (pinned
        # on CUDA, so the copy into a bucket's inputs is asynchronous; written through NumPy): a
        # width-W step uses its first 4W entries as a contiguous (4, W) block (tokens, positions,
        # cache rows, context lengths), then the decode rows' slots
        n = kv.n_slots
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(5 * n, dtype=torch.long, pin_memory=cuda)
        self._host_np = self._host.numpy()
        self._host_blocks = {}  # width -> its (4, W) block, as a tensor view
        self._padding = np.zeros((4, n), dtype=np.int64)
        self._padding[2] = kv.scratch_slot * kv.max_len  # padding rows write into scratch
        self._padding[3] = 1  # and see one key
        self._row0 = np.arange(n, dtype=np.int64) * kv.max_len

    def run(self, decode: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Logits (D, V) of the decode rows ``(slot, position, token)`` (increasing slots)."""
        width = bucket(decode[-1][0] + 1, self.kv.n_slots)
        length = bucket(max(pos for _, pos, _ in decode) + 1, self.kv.max_len, floor=16)
        b = self._buckets.get((width, length)) or self._make(width, length)
        d, block = len(decode), 4 * width
        host = self._host_np[:block].reshape(4, width)  # a view: the block is contiguous
        host[:] = self._padding[:, :width]
        slots = [s for s, _, _ in decode]
        positions = np.array([p for _, p, _ in decode], dtype=np.int64)
        host[0, slots] = [t for _, _, t in decode]
        host[1, slots] = positions
        host[2, slots] = self._row0[slots] + positions
        host[3, slots] = positions + 1
        self._host_np[block : block + d] = slots
        inputs = self._host_blocks.get(width)
        if inputs is None:
            inputs = self._host_blocks[width] = self._host[:block].view(4, width)
        # the host buffer is next written after this step's sampled tokens were read back, so
        # an asynchronous copy out of it has finished by then
        b.inputs.copy_(inputs, non_blocking=True)
        index = self._host[block : block + d].to(self.device, non_blocking=True)
        logits = b.run()  # (W, V): row i is slot i
        return logits.index_select(0, index)

    def capture_all(self) -> int:
        """Make every (width, length) bucket now, widest first, and return how many: with CUDA
        graphs each is a capture (a forward and more), and one made while serving stalls every
        stream of that step, so they are all made at start-up (vLLM and nano-vllm capture their
        batch sizes at start-up too)."""
        n_slots, max_len = self.kv.n_slots, self.kv.max_len
        widths = sorted({bucket(w, n_slots) for w in range(1, n_slots + 1)}, reverse=True)
        lengths = sorted({bucket(n, max_len, floor=16) for n in range(1, max_len + 1)})
        for width in widths:
            for length in lengths:
                if (width, length) not in self._buckets:
                    self._make(width, length)
        return len(widths) * len(lengths)

    def _make(self, width: int, length: int) -> _Bucket:
        inputs = torch.zeros((4, width), dtype=torch.long, device=self.device)
        inputs[2] = self.kv.scratch_slot * self.kv.max_len  # until filled: padding rows only
        inputs[3] = 1
        mask = torch.zeros((width, 1, 1, length), dtype=self.kv.data.dtype, device=self.device)
        keys, values = self.kv.slots_view(width, length)
        batch = PackedBatch(
            tokens=inputs[0], positions=inputs[1], write_index=inputs[2], logit_rows=None,
            decode=DecodeGroup(width, length, mask, keys, values), chunks=(),
        )
        key_pos = self._key_pos[:length]

        def step() -> torch.Tensor:
            visible = (key_pos < inputs[3].unsqueeze(1)).view(width, 1, 1, length)
            mask.copy_(torch.where(visible, 0.0, float("-inf")))
            return self.forward(batch, self.kv)

        run = step
        if self.cuda_graphs:
            run = self._capture(step)
        b = self._buckets[(width, length)] = _Bucket(inputs, batch, run)
        return b

    def _capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Capture ``step`` into a CUDA graph (after a warm-up run on a side stream, as
        ``torch.cuda.graphs`` requires); replaying it reruns the same kernels on the buffers."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # padding rows only touch the scratch slot
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
