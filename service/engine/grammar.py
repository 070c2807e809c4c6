"""Structured outputs in the engine: compiled grammars, one matcher per sequence, step masks.

The grammar engine is llguidance (chosen by measurement against xgrammar and outlines-core on
both of our vocabularies: ``bench/structured.py``, docs/BENCHMARKS.md). It takes JSON schemas,
regexes, choices and Lark or GBNF grammars, and computes a token mask lazily from the current
parser state, so a schema compiles in about a millisecond and a mask costs a fraction of one.

- ``grammar_tokenizer``: our vocabulary as llguidance reads it, every token's bytes. A vocabulary
  without an end token (the char model's) gets a virtual one past its last id, so "the grammar
  may end here" still has a bit in the mask; a row whose grammar is complete ends with ``stop``.
- ``GrammarCompiler``: turns a ``StructuredOutputs`` into a checked template matcher (syntax,
  llguidance's resource limits, a first token that this vocabulary can produce), kept in a
  bounded LRU keyed by the constraint's canonical text; each sequence gets its own copy.
- ``StepMasks``: the masks of a step's constrained rows, filled on the host into a bitmask
  indexed by KV slot once the forward is launched (overlapping it on CUDA), then applied on the
  device to those rows only, in one ``masked_fill``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from service.engine.types import InvalidRequestError, StructuredOutputs

# JSON as the model writes it: no free whitespace (a model that may pad forever often does), the
# separators compact; every schema keyword llguidance does not implement is an error, not ignored
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_ERROR_CHARS = 300  # a library error message is cut to this in a 400


def grammar_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """``tokenizer``'s vocabulary for llguidance (about 0.2 s for GPT-2's 50,257 tokens)."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)))


class _Vocabulary:
    """The duck type ``llguidance.TokenizerWrapper`` reads: token bytes, the end token, and an
    encoder (llguidance tokenizes forced text with it; text the vocabulary cannot encode raises,
    and the matcher reports the constraint as impossible)."""

    def __init__(self, tokenizer) -> None:
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.eos_token_id = tokenizer.eot_id
        if self.eos_token_id is None:  # a virtual end token, never a row of the logits
            self.eos_token_id = n
            self.tokens.append(b"")
        self.bos_token_id = None
        self.special_token_ids = [self.eos_token_id]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


def grammar_text(kind: str, spec: str) -> str:
    """llguidance's grammar for a constraint; ``ValueError`` when ``spec`` does not parse."""
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        options = json.loads(spec)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in options))
    if kind == "grammar":  # Lark, or GBNF (llama.cpp's) converted to Lark
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec))
    raise ValueError(f"unknown constraint kind {kind!r}")


@dataclass(frozen=True)
class Compiled:
    """A checked grammar: its template matcher (copied per sequence, never advanced)."""

    template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


class GrammarCompiler:
    """Owns the vocabulary's llguidance tokenizer and a bounded cache of compiled grammars.

    Thread-safe: the API compiles on worker threads, the engine thread takes copies (and compiles
    on a miss, e.g. for the offline ``LLM`` or after an eviction).
    """

    def __init__(self, tokenizer, cache_size: int = 256, max_bytes: int = 65_536) -> None:
        self._source = tokenizer
        self.cache_size = cache_size
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use
        self._cache: OrderedDict[tuple[str, str], Compiled] = OrderedDict()
        self.compiles = 0  # grammars compiled (cache misses), for tests and stats
        self._pool: ThreadPoolExecutor | None = None  # the API's compiles, off the event loop

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = grammar_tokenizer(self._source)
            return self._tokenizer

    @property
    def mask_words(self) -> int:
        """int32 words of one row's bitmask (the virtual end token included)."""
        return (self.tokenizer.vocab_size + 31) // 32

    def submit(self, structured: StructuredOutputs) -> Future:
        """``compile`` on one of the compiler's own worker threads (a done future on a hit)."""
        with self._lock:
            hit = self._cache.get(structured.key)
            if hit is None and self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        if hit is not None:
            done: Future = Future()
            done.set_result(hit)
            return done
        return self._pool.submit(self.compile, structured)

    def compile(self, structured: StructuredOutputs) -> Compiled:
        """The constraint's checked grammar, from the cache or compiled now (blocking: the API
        calls this on a worker thread); ``InvalidRequestError`` naming ``structured.param``."""
        with self._lock:
            hit = self._cache.get(structured.key)
            if hit is not None:
                self._cache.move_to_end(structured.key)
                return hit
        compiled = self._compile(structured)
        with self._lock:
            self._cache[structured.key] = compiled
            self.compiles += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, s: StructuredOutputs) -> Compiled:
        size = len(s.spec.encode())
        if size > self.max_bytes:
            raise InvalidRequestError(
                s.param, f"{s.param}: the {s.kind} constraint is {size} bytes; at most "
                f"{self.max_bytes} are accepted (--max-grammar-bytes)")
        try:
            text = grammar_text(s.kind, s.spec)
        except Exception as err:  # noqa: BLE001 (the library's parse errors are ValueError/Rust)
            raise _invalid(s, "is not valid", err) from None
        tokenizer = self.tokenizer
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise _invalid(s, "is not valid", matcher.get_error())
        words = (tokenizer.vocab_size + 31) // 32
        mask = torch.zeros(1, words, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
        real = _unpack(mask)[0, : self._source.vocab_size]  # the virtual end token is not one
        if matcher.is_error() or not real.any():
            raise InvalidRequestError(
                s.param, f"{s.param}: no output of this model can satisfy the {s.kind} "
                "constraint: its first token is impossible on this vocabulary"
                + (f" ({_short(matcher.get_error())})" if matcher.is_error() else ""))
        return Compiled(matcher)


def _invalid(s: StructuredOutputs, what: str, err: object) -> InvalidRequestError:
    return InvalidRequestError(s.param, f"{s.param}: the {s.kind} constraint {what}: "
                                        f"{_short(err)}")


def _short(err: object) -> str:
    text = str(err).strip().replace("\n", " ")
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + "..."


def _unpack(words: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """(R, W) int32 bitmask -> (R, W * 32) bool, bit j of word i = token 32 i + j allowed
    (``shifts``: ``arange(32)`` on the words' device)."""
    if shifts is None:
        shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()


class StepMasks:
    """Owns the host bitmask (one row per KV slot) of the constrained rows' masks: ``apply``
    fills the masks of a step's constrained rows and applies them to its logits. It runs after
    the forward is launched, so on CUDA the host work overlaps the kernels; on CPU the forward
    has every core already (a mask thread only waited for one: measured in docs/BENCHMARKS.md).
    Unconstrained rows are never read or written."""

    def __init__(self, n_slots: int, words: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size  # the tokenizer's; the virtual end token has no logit
        self.device = device
        self.host = torch.zeros(n_slots, words, dtype=torch.int32,
                                pin_memory=device.type == "cuda")
        self._row_bytes = words * 4
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def apply(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """Mask the constrained rows of ``logits`` (R, V_model), row r being ``rows[r]``."""
        index, slots = [], []
        host, size = self.host, self._row_bytes
        for r, seq in enumerate(rows):
            if seq.matcher is not None:
                seq.matcher.unsafe_compute_mask_ptr(host[seq.slot].data_ptr(), size)
                index.append(r)
                slots.append(seq.slot)
        if not index:
            return logits
        words = host[slots] if len(slots) > 1 else host[slots[0]].unsqueeze(0)
        words = words.to(self.device, non_blocking=True)
        v = min(self.vocab_size, logits.shape[1])
        banned = ~_unpack(words, self._shifts)[:, :v]
        if len(index) == len(rows):
            logits[:, :v].masked_fill_(banned, float("-inf"))
            return logits
        at = torch.tensor(index, device=logits.device)
        part = logits.index_select(0, at)
        part[:, :v].masked_fill_(banned, float("-inf"))
        return logits.index_copy(0, at, part)
