"""Iteration-level scheduling: who runs this step, and with which tokens. Plain Python, no torch.

Every step: all decoding sequences get one token each; then prefill chunks run in FIFO order
(sequences already prefilling first, then newly admitted ones) while they fit the token budget.
Finished or aborted sequences leave at once, so their slots are free for the very next step
(continuous batching). A chunk's boundaries depend only on its own sequence (``prefill_chunk``
tokens from the window start), never on the other traffic: that is part of batch invariance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from service.engine.sequence import Sequence, SequenceStatus
from service.engine.types import FinishReason


@dataclass(frozen=True)
class PrefillChunk:
    """Window positions ``start..end-1`` of ``seq`` to encode this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        """True when this chunk completes the window, so its last logits give the next token."""
        return self.end == self.seq.window_len

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SchedulerOutput:
    """The scheduler's decision for one step, handed to the model runner."""

    decode: tuple[Sequence, ...] = ()
    prefill: tuple[PrefillChunk, ...] = ()
    admitted: tuple[Sequence, ...] = field(default=())

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefill)


class SlotAllocator:
    """Which KV slots are free; always hands out the lowest free slot (keeps the busy prefix short)."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self._free = set(range(n_slots))

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.add(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.n_slots


class Scheduler:
    """Owns the waiting queue (FIFO), the running set and the slot allocator."""

    def __init__(self, n_slots: int, prefill_chunk: int, max_tokens_per_step: int) -> None:
        self.slots = SlotAllocator(n_slots)
        self.prefill_chunk = prefill_chunk
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        decode = tuple(s for s in self.running if s.status is SequenceStatus.DECODE)
        budget = self.max_tokens_per_step - len(decode)
        prefill: list[PrefillChunk] = []
        admitted: list[Sequence] = []
        for seq in self._prefill_candidates():
            start, end = seq.next_chunk(self.prefill_chunk)
            if end - start > budget and prefill:  # the first chunk always runs: no starvation
                break
            if seq.status is SequenceStatus.WAITING:
                self.waiting.popleft()
                seq.admit(self.slots.allocate(), now)
                self.running.append(seq)
                admitted.append(seq)
            prefill.append(PrefillChunk(seq, start, end))
            budget -= end - start
        return SchedulerOutput(decode, tuple(prefill), tuple(admitted))

    def _prefill_candidates(self) -> Iterator[Sequence]:
        """Sequences already prefilling (admission order), then the waiting head while slots last."""
        yield from [s for s in self.running if s.status is SequenceStatus.PREFILL]
        while self.waiting and self.slots.num_free:
            yield self.waiting[0]

    def finish(self, seq: Sequence, reason: FinishReason, now: float | None = None) -> None:
        """Remove a sequence (finished, aborted or failed) and free its slot at once."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is not SequenceStatus.FINISHED:
            self.running.remove(seq)
            self.slots.free(seq.slot)
        seq.finish(reason, now)

    def find(self, request_id: str) -> list[Sequence]:
        """Every unfinished sequence of a request (waiting or running)."""
        return [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
