"""Iteration-level scheduling: who runs this step, and with which tokens. Plain Python, no torch.

Every step spends one token budget (vLLM v1's "no prefill or decode phase": each running
sequence's computed tokens catch up to its tokens):
1. every sequence with one token left to compute decodes it (one budget token each);
2. sequences prefilling a prompt or re-encoding a cropped window get their next chunk, in
   admission order, while chunks fit the budget;
3. waiting sequences are admitted into free slots while their first chunk fits.
The first chunk of a step always runs, so a large chunk cannot starve. A chunk's boundaries depend
only on its own sequence (``prefill_chunk`` tokens from where it stands), never on other traffic:
that is part of batch invariance. Finished or aborted sequences leave at once, so their slots are
free for the very next step (continuous batching).

Prefix reuse (``prefix_caching``): a sequence being admitted starts from the longest prefix of its
window that a running or finished sequence's slot holds (``service.engine.slots``), so its first
chunk starts there; the plan lists the copies the runner makes before the forward. A finished
sequence's slot stays cached until a new sequence wants it. A waiting sequence whose window a
running one is still computing (at least a chunk more of it than can be reused now) waits for it
rather than compute the same tokens beside it; other groups are admitted meanwhile.

Fairness: admission is between *groups* (a group is one client request: all its prompts and
choices). A free slot goes to the waiting group with the fewest running sequences, the earliest
arrived first on a tie, so one request of many sequences cannot starve a small one behind it.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter
from typing import NamedTuple

from service.engine.sequence import Sequence, SequenceStatus
from service.engine.slots import PrefixHit, SlotAllocator, SlotCopy, common_prefix, longest_prefix
from service.engine.types import FinishReason

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerOutput", "SlotAllocator"]

_slot_of = attrgetter("seq.slot")  # a decode chunk's sort key (in C: no lambda call per row)
# a named tuple's own __new__ is Python (~0.4 us); tuple.__new__ builds the same one in ~0.2
_new_tuple = tuple.__new__


class ScheduledChunk(NamedTuple):
    """Window positions ``start..end-1`` of ``seq`` to compute this step (a named tuple: one is
    made per running sequence per step)."""

    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """True when this chunk completes the window: its last logits give the next token."""
        return self.end == self.seq.window_len

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class SchedulerOutput(NamedTuple):
    """The scheduler's decision for one step, handed to the model runner (a named tuple: one is
    made per step, and a frozen dataclass costs ~1.5 us to build here).

    ``decode``: one-token chunks that complete their window, in increasing slot order.
    ``prefill``: longer chunks (and one-token chunks that do not sample), in admission order.
    """

    decode: tuple[ScheduledChunk, ...] = ()
    prefill: tuple[ScheduledChunk, ...] = ()
    admitted: tuple[Sequence, ...] = ()
    copies: tuple[SlotCopy, ...] = ()  # reused prefixes to copy before the forward

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefill)


class Scheduler:
    """Owns the waiting queues (one FIFO per group, groups in arrival order), the running list and
    the slot allocator."""

    def __init__(self, n_slots: int, prefill_chunk: int, token_budget: int,
                 prefix_caching: bool = False) -> None:
        self.slots = SlotAllocator(n_slots)
        self.prefix_caching = prefix_caching
        self.prefill_chunk = prefill_chunk
        self.token_budget = token_budget
        self.waiting: dict[str, deque[Sequence]] = {}  # insertion order = arrival order
        self.running: list[Sequence] = []  # admission order
        self._running_per_group: dict[str, int] = {}
        self.num_waiting = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.setdefault(seq.group, deque()).append(seq)
        self.num_waiting += 1

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.num_waiting or self.running)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        budget = self.token_budget
        decode: list[ScheduledChunk] = []
        prefill: list[ScheduledChunk] = []
        catching_up: list[Sequence] = []
        for seq in self.running:  # Sequence.num_to_compute, inlined: this loop runs per row
            window_len = len(seq.tokens) - seq.window_start
            left = window_len - seq.num_computed
            if left == 1:  # ScheduledChunk(seq, window_len - 1, window_len), built in C
                decode.append(_new_tuple(ScheduledChunk, (seq, window_len - 1, window_len)))
            elif left > 1:
                catching_up.append(seq)
        budget -= len(decode)
        for seq in catching_up:
            chunk = ScheduledChunk(seq, *seq.next_chunk(self.prefill_chunk))
            if chunk.num_tokens > budget and prefill:
                break
            prefill.append(chunk)
            budget -= chunk.num_tokens
        if self.num_waiting and self.slots.num_free:
            admitted, copies = self._admit_waiting(decode, prefill, budget, now)
        else:  # the usual decode step: nobody to admit
            admitted, copies = (), ()
        if len(decode) > 1:
            decode.sort(key=_slot_of)
        return SchedulerOutput(tuple(decode), tuple(prefill), tuple(admitted), tuple(copies))

    def _admit_waiting(self, decode: list[ScheduledChunk], prefill: list[ScheduledChunk],
                       budget: int, now: float | None
                       ) -> tuple[list[Sequence], list[SlotCopy]]:
        """Admit waiting sequences into free slots while their first chunk fits ``budget``
        (their chunks join ``decode`` or ``prefill``); returns them and their prefix copies."""
        admitted: list[Sequence] = []
        copies: list[SlotCopy] = []
        deferred: set[str] = set()
        while self.num_waiting and self.slots.num_free:
            seq = self._fairest_waiting(deferred)
            if seq is None:
                break
            hit = self._reusable(seq)
            if self.prefix_caching and self._worth_waiting(seq, hit.length if hit else 0):
                deferred.add(seq.group)  # the rest of its group waits behind it (FIFO)
                continue
            start = hit.length if hit else 0
            chunk = ScheduledChunk(seq, start, min(start + self.prefill_chunk, seq.window_len))
            if chunk.num_tokens > budget and prefill:
                break
            copy = self._admit(seq, now, hit)
            if copy is not None:
                copies.append(copy)
            admitted.append(seq)
            if chunk.num_tokens == 1 and chunk.samples:
                decode.append(chunk)
            else:
                prefill.append(chunk)
            budget -= chunk.num_tokens
        return admitted, copies

    def _reusable(self, seq: Sequence) -> PrefixHit | None:
        """The longest prefix ``seq`` may start from, if prefix caching is on and one exists."""
        if not self.prefix_caching:
            return None
        return longest_prefix(seq.window(0, seq.window_len), self.running, self.slots)

    def _worth_waiting(self, seq: Sequence, reusable: int) -> bool:
        """Whether a running sequence is still computing a prefix of ``seq``'s window at least
        one chunk longer than the ``reusable`` one: ``seq`` then waits for it (a step or a few)
        rather than compute the same tokens beside it (n siblings, requests that arrive together
        with one system prompt). Only running sequences are waited for: they advance every
        step, and their chunks come before any admission's."""
        limit = seq.window_len - 1
        if limit - reusable < self.prefill_chunk:  # nothing shared could save a whole chunk
            return False
        window = seq.window(0, seq.window_len)
        for other in self.running:
            if other.num_computed < other.window_len:
                shared = common_prefix(window, other.tokens, other.window_start,
                                       min(limit, other.window_len))
                if shared - reusable >= self.prefill_chunk:
                    return True
        return False

    def _fairest_waiting(self, skip: set[str]) -> Sequence | None:
        """The head of the waiting group with the fewest running sequences (earliest on ties),
        among the groups not in ``skip``."""
        running = self._running_per_group
        best, fewest = None, None
        for group in self.waiting:  # arrival order: the first of the fewest wins
            if group in skip:
                continue
            n = running.get(group, 0)
            if fewest is None or n < fewest:
                best, fewest = group, n
                if n == 0:  # nobody has fewer: no need to look at every waiting group
                    break
        return None if best is None else self.waiting[best][0]

    def _admit(self, seq: Sequence, now: float | None, hit: PrefixHit | None) -> SlotCopy | None:
        """Give ``seq`` a slot and its reused prefix; returns the copy that prefix needs, if any.
        A cached slot that does not widen the decode batch is taken over as it is."""
        queue = self.waiting[seq.group]
        queue.popleft()
        if not queue:
            del self.waiting[seq.group]
        self.num_waiting -= 1
        copy = None
        if hit is None:
            slot = self.slots.allocate()
        elif hit.cached and hit.slot <= self.slots.width:
            self.slots.take(hit.slot)
            slot = hit.slot
        else:
            if hit.cached:
                self.slots.touch(hit.slot)  # evicted last (allocate picks it only if it must)
            slot = self.slots.allocate()
            if hit.slot != slot:
                copy = SlotCopy(hit.slot, slot, hit.length)
        seq.admit(slot, now, reused=hit.length if hit else 0)
        self.running.append(seq)
        self._running_per_group[seq.group] = self._running_per_group.get(seq.group, 0) + 1
        return copy

    def finish(self, seq: Sequence, reason: FinishReason, now: float | None = None) -> None:
        """Remove a sequence (finished, aborted or failed) and free its slot at once."""
        if seq.status is SequenceStatus.WAITING:
            queue = self.waiting[seq.group]
            queue.remove(seq)
            if not queue:
                del self.waiting[seq.group]
            self.num_waiting -= 1
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            # an error may have left the slot half written: only a clean end is kept for reuse
            keep = self.prefix_caching and reason is not FinishReason.ERROR
            self.slots.free(seq.slot, seq if keep else None)
            left = self._running_per_group[seq.group] - 1
            if left:
                self._running_per_group[seq.group] = left
            else:
                del self._running_per_group[seq.group]
        seq.finish(reason, now)

    def live(self) -> list[Sequence]:
        """Every unfinished sequence: waiting (by group), then running."""
        return [*(s for q in self.waiting.values() for s in q), *self.running]

    def find(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """The unfinished sequences of a request (of one choice when ``index`` is given)."""
        return [s for s in self.live()
                if s.request_id == request_id and (index is None or s.index == index)]
