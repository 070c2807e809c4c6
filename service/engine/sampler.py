"""The vectorised sampler: one call turns a batch of logits into one token per row.

Per row: padded vocabulary masked, repetition / frequency / presence penalties, logit_bias, then
greedy (temperature 0) or temperature + top-k + top-p + min-p and an inverse-CDF draw from the
row's own ``torch.Generator`` (the model package's pure ``logits_to_probs`` and
``sample_from_probs``). Every operation is row-wise and a filter a row did not ask for leaves it
bit-for-bit untouched, so a seeded row samples the same token alone or in any batch.

Logprobs: for sampled rows, the log of the distribution actually sampled from (after penalties,
bias, temperature and filters); for greedy rows, the log-softmax of the logits after penalties
and bias (no temperature, no filters).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from model.sampling import draw_uniforms, logits_to_probs, sample_from_probs, seeded_generator
from service.engine.sequence import Sequence
from service.engine.types import TokenLogprob


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] | None = None


class Sampler:
    """Owns the per-slot penalty state (generated-token counts, prompt masks) and each
    sequence's generator (seeded choices use ``seed + index``)."""

    def __init__(self, n_slots: int, model_vocab: int, vocab_size: int, device) -> None:
        self.vocab_size = vocab_size  # the tokenizer's; ids >= it are padding, never sampled
        self.device = device
        self.counts = torch.zeros(n_slots, model_vocab, device=device)
        self.in_prompt = torch.zeros(n_slots, model_vocab, dtype=torch.bool, device=device)
        self.generators: dict[int, torch.Generator] = {}

    def start(self, seq: Sequence) -> None:
        """Reset the slot's state for a newly admitted sequence."""
        self.counts[seq.slot].zero_()
        self.in_prompt[seq.slot].zero_()
        prompt = torch.tensor(seq.tokens[: seq.num_prompt_tokens], device=self.device)
        self.in_prompt[seq.slot, prompt] = True
        seed = seq.params.seed
        self.generators[seq.seq_id] = seeded_generator(None if seed is None else seed + seq.index)

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampledToken]:
        """One token per row of ``logits`` (R, V_model), row r belonging to ``seqs[r]``."""
        params = [s.params for s in seqs]
        logits = logits.float().clone()
        logits[:, self.vocab_size :] = float("-inf")
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits = self._penalise(logits, params, slots)
        if any(p.logit_bias for p in params):
            bias = torch.zeros_like(logits)
            for r, p in enumerate(params):
                for token_id, value in p.logit_bias:
                    bias[r, token_id] = value
            logits = logits + bias

        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1) if any(
            p.logprobs is not None and p.temperature == 0 for p in params) else None
        sampled = [r for r, p in enumerate(params) if p.temperature > 0]
        if sampled:
            rows = torch.tensor(sampled, device=self.device)
            f = lambda name, dtype: torch.tensor(  # noqa: E731
                [getattr(params[r], name) for r in sampled], dtype=dtype, device=self.device)
            probs = logits_to_probs(
                logits[rows], f("temperature", torch.float32), f("top_k", torch.long),
                f("top_p", torch.float32), f("min_p", torch.float32),
            )
            gens = [self.generators[seqs[r].seq_id] for r in sampled]
            tokens[rows] = sample_from_probs(probs, draw_uniforms(gens, device=self.device))
            if any(params[r].logprobs is not None for r in sampled):
                logprobs = logprobs if logprobs is not None else torch.empty_like(logits)
                logprobs[rows] = probs.log()
        self.counts[slots, tokens] += 1
        return self._results(tokens, logprobs, params)

    def _penalise(self, logits, params, slots) -> torch.Tensor:
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(r != 1.0 for r in rep):
            counts = self.counts[slots]
            seen = self.in_prompt[slots] | (counts > 0)
            penalty = torch.tensor(rep, device=self.device).unsqueeze(1)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, scaled, logits)
        if any(pres) or any(freq):  # OpenAI semantics: over the generated tokens only
            counts = self.counts[slots]
            logits = logits - torch.tensor(freq, device=self.device).unsqueeze(1) * counts
            logits = logits - torch.tensor(pres, device=self.device).unsqueeze(1) * (counts > 0)
        return logits

    def _results(self, tokens, logprobs, params) -> list[SampledToken]:
        token_list = tokens.tolist()
        out = []
        for r, (token, p) in enumerate(zip(token_list, params, strict=True)):
            if p.logprobs is None:
                out.append(SampledToken(token))
                continue
            row = logprobs[r]
            top = ()
            if p.logprobs > 0:
                values, ids = row.topk(p.logprobs)
                top = tuple(TokenLogprob(int(i), float(v)) for i, v in zip(ids, values, strict=True))
            out.append(SampledToken(token, float(row[token]), top))
        return out
