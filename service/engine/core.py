"""The synchronous engine: one ``step`` = schedule, run the model, sample, update from the output.

No threads here: the threaded facade (``service.engine.engine.Engine``) drives this from its
loop, and tests and benchmarks drive it directly through ``run``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import NamedTuple

import msgspec
import torch

from model.gpt import GPT
from model.sampling import choice_seed, random_seed
from model.threads import ThreadPlan
from model.tuner import ThreadTuner
from service.engine.config import EngineConfig
from service.engine.counters import CoreCounters
from service.engine.grammar import GrammarCompiler, StepMasks
from service.engine.memory import prepacks
from service.engine.runner import ModelRunner
from service.engine.sampler import Sampler, Samples
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.sequence import Sequence
from service.engine.types import (
    EngineStats,
    Finish,
    FinishReason,
    InvalidRequestError,
    Request,
    RequestMetrics,
    RequestOutput,
    TokenEvents,
)


class StepResult(NamedTuple):  # one per step: a named tuple is cheaper to build
    outputs: TokenEvents  # the step's events, as columns (one row per sequence)
    stats: EngineStats


class EngineCore:
    """Owns the scheduler, the model runner and the sampler, and every live ``Sequence``.

    ``grammars`` compiles structured-output constraints (None: a request with one is refused);
    a constrained sequence holds its own matcher, and ``masks`` masks its rows each step.
    ``counters``: the cumulative counts ``/metrics`` shows (in memory unless given: a core
    process writes them into a file its front ends read).
    """

    def __init__(
        self, model: GPT, vocab_size: int, eos_token_id: int | None, config: EngineConfig,
        n_slots: int, device: torch.device, dtype: torch.dtype, threads: ThreadPlan | None = None,
        grammars: GrammarCompiler | None = None, counters: CoreCounters | None = None,
    ) -> None:
        block_size = model.config.block_size
        self.window_shift = config.window_shift_for(block_size)
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.runner = ModelRunner(model, n_slots, device, dtype, config.batch_invariant,
                                  cuda_graphs=config.cuda_graphs, compile=config.compile,
                                  prepack=prepacks(config, device, dtype),
                                  cpu_gemv=config.cpu_kernels and prepacks(config, device, dtype),
                                  quantization=config.quantization)
        # batch invariance wants a chunk's boundaries to depend on its own sequence alone: a
        # reused prefix would move them (siblings still share a prompt chunk computed together)
        self.scheduler = Scheduler(n_slots, config.prefill_chunk, config.token_budget,
                                   config.prefix_caching and not config.batch_invariant)
        self.sampler = Sampler(n_slots, model.config.vocab_size, vocab_size, device)
        self.grammars = grammars
        self._masks: StepMasks | None = None  # made with the first constrained request
        self._n_slots, self._device = n_slots, device
        self._seq_ids = itertools.count()
        self.total_steps = 0
        self.counters = counters or CoreCounters.in_memory()
        # entered by ``step`` when its caller is not in inference mode (one thread steps a core;
        # the mode is never already on when it is entered, so the object is never nested)
        self._inference_mode = torch.inference_mode()
        self.threads = threads  # None: leave torch's thread count alone
        self.tuner = ThreadTuner(threads.threads) if threads and threads.adaptive else None

    def apply_threads(self) -> None:
        """Run the calling thread's intra-op work on the planned (or tuned) thread count; an
        OpenMP thread count belongs to the thread that sets it, so every stepping thread calls
        this (each step does)."""
        if self.threads is None:
            return
        wanted = self.tuner.threads if self.tuner else self.threads.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def add_request(self, request: Request) -> None:
        """Queue every choice of an already validated request. Choice i of a seeded request
        draws with ``choice_seed(seed, i)`` (reproducible); an unseeded one with a random seed."""
        seed = request.params.seed
        compiled = self._grammar(request)
        for index in range(request.params.n):
            seq = Sequence(
                next(self._seq_ids), request, index, self.block_size, self.window_shift,
                random_seed() if seed is None else choice_seed(seed, index),
            )
            if compiled is not None:
                seq.matcher = compiled.matcher()
            self.scheduler.add(seq)

    def _grammar(self, request: Request):
        """The request's compiled constraint (a cache hit when the API compiled it), or None."""
        structured = request.params.structured
        if structured is None:
            return None
        if self.grammars is None:
            raise InvalidRequestError(structured.param, f"{structured.param}: this engine has "
                                      "no grammar compiler")
        if self._masks is None:
            self._masks = StepMasks(self._n_slots, self.grammars.mask_words, self.sampler.vocab_size,
                                    self._device)
        return self.grammars.compile(structured)

    def abort(self, request_id: str, index: int | None = None) -> TokenEvents:
        """Finish the live choices of a request (choice ``index`` only, when given) with
        ``abort``; their slots are free at once. Their latencies are not counted: whoever asked
        ended them (a stop string, a client gone) and counts that end."""
        return self._end(self.scheduler.find(request_id, index), FinishReason.ABORT, False)

    def abort_all(self, reason: FinishReason) -> TokenEvents:
        """Finish every live choice with ``reason`` (a drain's deadline, a failed step): the
        core ends them, so their latencies count."""
        return self._end(self.scheduler.live(), reason, True)

    def _end(self, seqs: list[Sequence], reason: FinishReason, counted: bool) -> TokenEvents:
        now = time.monotonic()
        for seq in seqs:
            self._finish(seq, reason, now)
        if counted and seqs:
            self.counters.add_finished(seqs, now)
        return _events(seqs, [None] * len(seqs),
                       {r: _finish_info(seq, now) for r, seq in enumerate(seqs)})

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def idle_stats(self, last: EngineStats) -> EngineStats:
        """The load now, between steps (after aborts or a failed step): ``last`` with the live
        counts and no per-step work (the per-step counts feed counters: never count them twice)."""
        scheduler = self.scheduler
        return msgspec.structs.replace(
            last, num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.slots.usage, batch_size=0, prompt_tokens=0,
            generation_tokens=0, crops=0, recomputed_tokens=0, prefix_cache_queries=0,
            prefix_cache_hits=0,
        )

    def step(self) -> StepResult:
        """Schedule, run the model, sample, and update every sequence from the output, in
        inference mode (a loop that runs in it already saves entering it per step: ~5 us of a
        ~27 us one-row step on the CPU, docs/BENCHMARKS.md)."""
        if torch.is_inference_mode_enabled():
            return self._step()
        with self._inference_mode:  # made once: a new one per step costs ~1.6 us more
            return self._step()

    def _step(self) -> StepResult:
        self.apply_threads()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        # an admitted sequence encodes its prompt's window (computed or reused from the prefix
        # cache); prefill chunks of a sequence that has generated re-encode a cropped window
        prompt_tokens = 0
        for seq in plan.admitted:
            self.sampler.start(seq)
            prompt_tokens += seq.window_len
        run = self.runner.execute(plan)
        # constrained rows: their masks are computed once the forward is launched
        masks = self._masks
        logits = run.logits if masks is None or not run.rows else masks.apply(run.logits,
                                                                               run.rows)
        sampled = self.sampler(logits, run.rows) if run.rows else Samples([])
        outputs, crops = self.update_from_output(plan, run.rows, sampled)
        self.total_steps += 1
        elapsed = time.perf_counter() - t0
        if self.tuner is not None:
            self.tuner.observe(_shape(len(plan.decode), plan.num_prefill_tokens), elapsed)
        batch_size = len(plan.decode) + len(plan.prefill)
        recomputed = (sum(c.num_tokens for c in plan.prefill if c.seq.num_generated)
                      if plan.prefill else 0)
        queries = prompt_tokens if self.scheduler.prefix_caching else 0
        hits = sum(seq.num_cached_tokens for seq in plan.admitted) if plan.admitted else 0
        self.counters.add_step(elapsed, batch_size, prompt_tokens, len(run.rows), recomputed,
                               queries, hits, crops)
        stats = EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.scheduler.slots.usage,
            step_time=elapsed,
            batch_size=batch_size,
            prompt_tokens=prompt_tokens,
            generation_tokens=len(run.rows),
            crops=crops,
            total_steps=self.total_steps,
            recomputed_tokens=recomputed,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )
        return StepResult(outputs, stats)

    def update_from_output(self, plan: SchedulerOutput, rows: tuple[Sequence, ...],
                           sampled: Samples) -> tuple[TokenEvents, int]:
        """A step's bookkeeping, in one place: the computed chunks advance their sequences, each
        sampled token is appended, stopped sequences finish (freeing their slots for the next
        step, their latencies counted), full windows are cropped. Returns the step's events and
        how many crops it made."""
        for chunk in plan.decode:
            chunk.seq.num_computed = chunk.end
        for chunk in plan.prefill:
            chunk.seq.num_computed = chunk.end
        now = time.monotonic()
        eos = self.eos_token_id
        finishes: dict[int, Finish] = {}
        finished: list[Sequence] = []
        crops = sum(seq.prompt_cropped for seq in plan.admitted) if plan.admitted else 0
        for r, (seq, token) in enumerate(zip(rows, sampled.token_ids, strict=True)):
            tokens, params = seq.tokens, seq.params
            tokens.append(token)
            seq.token_times.append(now)
            ended = None if seq.matcher is None else seq.advance_grammar(token, eos)
            if ended is not None:  # the grammar is complete (or stuck): nothing may follow
                self._finish(seq, ended, now)
                finishes[r] = _finish_info(seq, now)
                finished.append(seq)
            # Sequence.check_stop's three tests, inlined (this loop runs per row); it names
            # the reason when one holds
            elif (len(tokens) - seq.num_prompt_tokens >= params.max_tokens
                    or (token == eos and not params.ignore_eos)
                    or token in params.stop_token_ids):
                self._finish(seq, seq.check_stop(eos), now)
                finishes[r] = _finish_info(seq, now)
                finished.append(seq)
            elif len(tokens) - seq.window_start > seq.block_size:
                crops += seq.crop_if_full()
        if finished:
            self.counters.add_finished(finished, now)
        events = _events(rows, sampled.token_ids, finishes)
        events.logprobs, events.top_logprobs = sampled.logprobs, sampled.top_logprobs
        return events, crops

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        if seq.slot is not None:
            self.sampler.release(seq)
        seq.matcher = None
        self.scheduler.finish(seq, reason, now)

    def run(self, requests: Iterable[Request], arrival_steps: Iterable[int] | None = None
            ) -> dict[str, list[RequestOutput]]:
        """Serve ``requests`` to completion; request i joins before step ``arrival_steps[i]``.

        Returns every output event, per request id, in order.
        """
        requests = list(requests)
        arrivals = list(arrival_steps) if arrival_steps is not None else [0] * len(requests)
        pending = sorted(zip(arrivals, range(len(requests)), strict=True))
        events: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        step = 0
        while pending or self.has_work():
            while pending and pending[0][0] <= step:
                self.add_request(requests[pending.pop(0)[1]])
            if self.has_work():
                for out in self.step().outputs.events():
                    events[out.request_id].append(out)
            step += 1
        return events


def _shape(decode_rows: int, prefill_tokens: int) -> tuple[int, int]:
    """A step's shape for the thread tuner: decode rows and prefill tokens, each by power of
    two (steps of one shape cost about the same)."""
    return decode_rows.bit_length(), prefill_tokens.bit_length()


def _events(seqs, token_ids: list, finishes: dict[int, Finish]) -> TokenEvents:
    """The columns of one event per sequence (``token_ids[r]`` is ``seqs[r]``'s new token)."""
    return TokenEvents(
        request_ids=[s.request_id for s in seqs],
        indices=[s.index for s in seqs],
        token_ids=token_ids,
        crops=[s.crops for s in seqs],
        prompt_cropped=[s.prompt_cropped for s in seqs],
        num_generated=[len(s.tokens) - s.num_prompt_tokens for s in seqs],
        finishes=finishes,
        cached_tokens=[s.num_cached_tokens for s in seqs],
    )


def _finish_info(seq: Sequence, now: float) -> Finish:
    return Finish(seq.finish_reason, seq.num_prompt_tokens, _metrics(seq, now))


def _metrics(seq: Sequence, now: float) -> RequestMetrics:
    """The choice's timings (its inter-token gaps go to the core's counters, not here)."""
    arrival = seq.request.arrival_time
    times = seq.token_times
    return RequestMetrics(
        queue_time=(seq.admitted_at if seq.admitted_at is not None else now) - arrival,
        time_to_first_token=times[0] - arrival if times else None,
        e2e_latency=(seq.finished_at or now) - arrival,
        num_tokens=len(times),
    )
