"""The model runner: the model resident on its device, its KV cache, and two entry points.

``prefill`` encodes one chunk of one sequence's window into its slot; ``decode`` feeds the last
token of every decoding sequence at its own position, all in one batched forward over the model
package's cached forward (rows of different lengths and positions; row b is slot b).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from model.gpt import GPT
from model.kv_cache import KVCache
from service.engine.sequence import Sequence


class ModelRunner:
    """Owns the model on ``device``/``dtype`` and the preallocated KV cache of ``n_slots`` slots.

    With ``batch_invariant`` every decode runs all ``n_slots`` rows (idle rows are padding at
    position -1): one fixed shape, so CPU matmul kernels (whose per-row results change with
    the row count below ~16 rows and with threading) compute each row identically whatever the
    traffic. Without it, decode runs the occupied slot prefix rounded up to a power of two.
    Prefill runs one chunk per forward for the same reason: its shape depends only on the
    sequence's own chunk.
    """

    def __init__(
        self, model: GPT, n_slots: int, device: torch.device, dtype: torch.dtype,
        batch_invariant: bool = True,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = model.config
        self.device = device
        self.n_slots = n_slots
        self.batch_invariant = batch_invariant
        # fixed_length: every forward attends over the whole window, so shapes never depend on
        # which other sequences share a batch (see KVCache).
        self.kv = KVCache.for_model(
            model.config, n_slots, device=device, dtype=dtype, fixed_length=batch_invariant
        )

    @torch.no_grad()
    def prefill(self, tokens: list[int], start: int, slot: int) -> torch.Tensor:
        """Encode window tokens at positions ``start..``; returns the last token's logits (V,)."""
        T = len(tokens)
        idx = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, start + T, device=self.device).unsqueeze(0)  # (1, T)
        slots = torch.tensor([slot], device=self.device)
        logits, _ = self.model(
            idx, kv_cache=self.kv, positions=positions, slots=slots, last_only=True
        )
        return logits[0, -1].float()

    @torch.no_grad()
    def copy_kv(self, source: int, target: int, start: int, end: int) -> None:
        """Copy positions ``start..end-1`` of slot ``source`` into slot ``target``."""
        self.kv.copy_slot(source, target, start, end)

    @torch.no_grad()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token per sequence at position ``window_len - 1``; returns logits (len(seqs), V)."""
        slots = [s.slot for s in seqs]
        width = self.n_slots if self.batch_invariant else self._bucket(max(slots) + 1)
        idx = torch.zeros(width, 1, dtype=torch.long)
        positions = torch.full((width, 1), -1, dtype=torch.long)
        rows = torch.tensor(slots, dtype=torch.long)
        idx[rows, 0] = torch.tensor([s.tokens[-1] for s in seqs])
        positions[rows, 0] = torch.tensor([s.window_len - 1 for s in seqs])
        logits, _ = self.model(
            idx.to(self.device), kv_cache=self.kv, positions=positions.to(self.device),
            last_only=True,
        )  # (width, 1, V); row b is slot b (no gather)
        return logits[rows.to(self.device), 0].float()

    def _bucket(self, n: int) -> int:
        width = 1
        while width < n:
            width *= 2
        return min(width, self.n_slots)

    @torch.no_grad()
    def warm_up(self) -> None:
        """One throwaway decode over every slot (nothing is written: all rows are padding)."""
        width = self.n_slots
        idx = torch.zeros(width, 1, dtype=torch.long, device=self.device)
        positions = torch.full((width, 1), -1, dtype=torch.long, device=self.device)
        positions[0, 0] = 0  # a forward needs one real position; slot 0 is rewritten before use
        self.model(idx, kv_cache=self.kv, positions=positions, last_only=True)
