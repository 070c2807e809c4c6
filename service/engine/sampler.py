"""The vectorised sampler: one call turns a batch of logits into one token per row, on the device.

Per-slot sampling parameters live in device tensors, written when a sequence joins and only where
they differ from what its slot holds (never rebuilt from Python lists per step). Per row: padded
vocabulary masked, repetition / frequency / presence penalties, logit_bias, then greedy
(temperature 0) or temperature + top-k + top-p + min-p and an inverse-CDF draw whose uniform is a
counter-based hash of (the choice's seed, its draw count) (``model.sampling.counter_uniforms``).
Which operations run is decided from host-side knowledge of the rows' parameters, so a step never
waits on the device until the single device-to-host copy of its results. Every operation is
row-wise and a filter a row did not ask for leaves it bit-for-bit untouched, so a seeded row
samples the same token alone or in any batch.

Logprobs: for sampled rows, the log of the distribution actually sampled from (after penalties,
bias, temperature and filters); for greedy rows, the log-softmax of the logits after penalties
and bias (no temperature, no filters).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from model.sampling import counter_uniforms, logits_to_probs, sample_from_probs
from service.engine.sequence import Sequence
from service.engine.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class Samples:
    """One step's draws as columns: row r's token, and its logprobs when any row asked."""

    token_ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[tuple[TokenLogprob, ...] | None] | None = None


class Sampler:
    """Owns the per-slot sampling state on the device: parameters, seeds, generated-token counts
    and prompt masks (penalties), logit biases, and a host-side copy of each slot's params."""

    def __init__(self, n_slots: int, model_vocab: int, vocab_size: int, device) -> None:
        self.vocab_size = vocab_size  # the tokenizer's; ids >= it are padding, never sampled
        self.model_vocab = model_vocab
        self.device = device
        self._cpu = torch.device(device).type == "cpu"
        z = lambda dtype=torch.float32: torch.zeros(n_slots, dtype=dtype, device=device)  # noqa: E731
        self.temperature, self.top_p, self.min_p = z(), z(), z()
        self.top_k, self.seed = z(torch.long), z(torch.long)
        self.repetition, self.presence, self.frequency = z(), z(), z()
        self._counts: torch.Tensor | None = None  # (n_slots, V) generated-token counts
        self._in_prompt: torch.Tensor | None = None  # (n_slots, V) prompt token mask
        self._bias: torch.Tensor | None = None  # (n_slots, V) logit_bias
        self._params: dict[int, SamplingParams] = {}  # slot -> params of its sequence
        # slot -> the parameters its device rows above hold (None: never written)
        self._loaded: list[tuple | None] = [None] * n_slots
        self._special: set[int] = set()  # slots whose rows need more than a plain argmax

    def start(self, seq: Sequence) -> None:
        """Load a newly admitted sequence's parameters into its slot."""
        p, slot = seq.params, seq.slot
        self._params[slot] = p
        if _special(p):
            self._special.add(slot)
        row = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
               p.frequency_penalty, p.top_k)
        if self._loaded[slot] != row:  # ~30 us of small writes: skipped when the slot has them
            values = torch.tensor(row[:6], dtype=torch.float32)
            for tensor, value in zip((self.temperature, self.top_p, self.min_p, self.repetition,
                                      self.presence, self.frequency), values, strict=True):
                tensor[slot] = value
            self.top_k[slot] = p.top_k
            self._loaded[slot] = row
        if p.temperature != 0:  # a greedy row's draw is never used: its seed is never read
            self.seed[slot] = seq.seed
        if _penalised(p):
            counts, in_prompt = self._penalty_state()
            counts[slot].zero_()
            in_prompt[slot].zero_()
            prompt = torch.tensor(seq.tokens[: seq.num_prompt_tokens], device=self.device)
            in_prompt[slot, prompt] = True
        if p.logit_bias:
            bias = self._bias_state()
            bias[slot].zero_()
            ids = torch.tensor([t for t, _ in p.logit_bias], device=self.device)
            bias[slot, ids] = torch.tensor([b for _, b in p.logit_bias], device=self.device)

    def release(self, seq: Sequence) -> None:
        self._params.pop(seq.slot, None)
        self._special.discard(seq.slot)

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> Samples:
        """One token per row of ``logits`` (R, V_model), row r belonging to ``seqs[r]``."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        if not self._special:  # every live slot is plain greedy: no per-row look at params
            return Samples(self._greedy(logits))
        params = [s.params for s in seqs]
        greedy_rows = [p.temperature == 0 for p in params]
        penalised = any(_penalised(p) for p in params)
        biased = any(p.logit_bias for p in params)
        if (all(greedy_rows) and not penalised and not biased
                and all(p.logprobs is None for p in params)):
            # plain greedy rows (the common case): nothing reads the per-slot state
            return Samples(self._greedy(logits))
        if self.model_vocab > self.vocab_size:
            logits[:, self.vocab_size :] = float("-inf")  # fresh tensor from the LM head
        host = torch.tensor([*(s.slot for s in seqs), *(s.num_generated for s in seqs)],
                            pin_memory=self.device.type == "cuda")  # an asynchronous copy
        slots, counters = host.to(self.device, non_blocking=True).split(len(seqs))
        if penalised:
            logits = self._penalise(logits, slots)
        if biased:
            logits = logits + self._bias.index_select(0, slots)
        tokens = logits.argmax(dim=-1)
        probs = None
        if not all(greedy_rows):
            temperature = self.temperature.index_select(0, slots)
            top_k_max = max(p.top_k for p in params)
            probs = logits_to_probs(
                logits, torch.where(temperature > 0, temperature, 1.0),
                self.top_k.index_select(0, slots) if top_k_max else None,
                self.top_p.index_select(0, slots) if any(p.top_p < 1 for p in params) else None,
                self.min_p.index_select(0, slots) if any(p.min_p > 0 for p in params) else None,
                top_k_max=top_k_max or None,
            )
            drawn = sample_from_probs(probs, counter_uniforms(self.seed.index_select(0, slots),
                                                              counters))
            tokens = torch.where(temperature > 0, drawn, tokens) if any(greedy_rows) else drawn
        if self._counts is not None and penalised:
            self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.float),
                                    accumulate=True)
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if k is None:
            return Samples(tokens.tolist())  # the step's one device read
        return self._with_logprobs(logits, probs, tokens, greedy_rows, params, k)

    def _greedy(self, logits: torch.Tensor) -> list[int]:
        """Each row's argmax over the tokenizer's ids (padding ids never win). On the CPU through
        NumPy: its argmax is vectorised, torch's CPU argmax is not (~11x faster over 32 rows of
        GPT-2's 50,304 logits here, docs/BENCHMARKS.md); the first maximum wins in both, a NaN
        counting as the maximum."""
        if self._cpu and not logits.requires_grad:
            return logits.numpy()[:, : self.vocab_size].argmax(axis=1).tolist()
        if self.model_vocab > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return logits.argmax(dim=-1).tolist()

    def _with_logprobs(self, logits, probs, tokens, greedy_rows, params, k) -> Samples:
        logprobs = torch.log_softmax(logits, dim=-1)
        if probs is not None:  # sampled rows: the distribution they were drawn from
            sampled = torch.tensor([not g for g in greedy_rows], device=logits.device)
            logprobs = torch.where(sampled.unsqueeze(1), probs.log(), logprobs)
        chosen = logprobs.gather(1, tokens.unsqueeze(1))
        parts = [tokens.unsqueeze(1).double(), chosen.double()]
        if k:
            top = logprobs.topk(k, dim=-1)
            parts += [top.indices.double(), top.values.double()]
        rows = torch.cat(parts, dim=1).tolist()  # one device-to-host copy
        out = Samples([int(row[0]) for row in rows], [], [])
        for row, p in zip(rows, params, strict=True):
            if p.logprobs is None:
                out.logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            n = p.logprobs
            top = tuple(TokenLogprob(int(i), v) for i, v in zip(row[2 : 2 + n],
                                                                row[2 + k : 2 + k + n],
                                                                strict=True))
            out.logprobs.append(row[1])
            out.top_logprobs.append(top)
        return out

    def _penalise(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        counts = self._counts.index_select(0, slots)
        seen = self._in_prompt.index_select(0, slots) | (counts > 0)
        penalty = self.repetition.index_select(0, slots).unsqueeze(1)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)  # penalty 1.0 leaves a row bit-identical
        # OpenAI semantics: over the generated tokens only
        logits = logits - self.frequency.index_select(0, slots).unsqueeze(1) * counts
        return logits - self.presence.index_select(0, slots).unsqueeze(1) * (counts > 0)

    def _penalty_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None:
            n = self.temperature.shape[0]
            self._counts = torch.zeros(n, self.model_vocab, device=self.device)
            self._in_prompt = torch.zeros(n, self.model_vocab, dtype=torch.bool,
                                          device=self.device)
        return self._counts, self._in_prompt

    def _bias_state(self) -> torch.Tensor:
        if self._bias is None:
            n = self.temperature.shape[0]
            self._bias = torch.zeros(n, self.model_vocab, device=self.device)
        return self._bias


def _special(p: SamplingParams) -> bool:
    """Whether a row with ``p`` needs more than the argmax of its logits."""
    return p.temperature != 0 or _penalised(p) or bool(p.logit_bias) or p.logprobs is not None


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0
