"""The engine's settings: one frozen dataclass, validated on construction.

This is the one source of truth for every engine knob: each field carries its help text in its
metadata, and the server's command line (``service.settings``) is generated from these fields, so
a knob is never defined twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")  # int8: model.quantize (this module imports no torch)


def _knob(default, help_text: str, **meta):
    return field(default=default, metadata={"help": help_text, **meta})


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, how much KV memory it may hold, and where the model runs."""

    max_batch_size: int = _knob(
        32, "sequences decoded together (KV slots); each choice of a request is one sequence")
    max_queue: int = _knob(
        256, "sequences (prompts x n) that may wait for a slot; beyond it new requests get 503")
    max_request_sequences: int = _knob(
        64, "most sequences (prompts x n, or x best_of) one request may ask for; more is a 400")
    max_n: int = _knob(16, "largest n (and best_of) one request may ask for")
    kv_memory: int | None = _knob(
        None, "bytes for the KV cache (e.g. 2G); unset: max_batch_size windows, checked against "
        "the device's free memory before allocation", size=True)
    kv_memory_fraction: float = _knob(
        0.9, "on CUDA with kv_memory unset: at most this fraction of the free GPU memory")
    window_shift: int | None = _knob(
        None, "tokens dropped from the left when a sequence outgrows the model's context; "
        "1 reproduces nanoGPT's generate exactly; unset: half the context (llama.cpp's choice)")
    prefill_chunk: int = _knob(
        256, "a prompt or re-encoded window is prefilled in chunks of this many tokens")
    max_tokens_per_step: int | None = _knob(
        None, "token budget of one step: decode tokens first, then prefill chunks; unset: "
        "max_batch_size + prefill_chunk, at least 512")
    batch_invariant: bool = _knob(
        False, "fixed-shape steps so a seeded request samples the same tokens alone or in any "
        "batch (costs speed at low load; see docs/BENCHMARKS.md)")
    prefix_caching: bool = _knob(
        True, "start a request from the cached keys and values of the longest prefix it shares "
        "with a running or recently finished sequence (n/best_of siblings, a system prompt, a "
        "conversation's earlier turns) and prefill only the rest; off under batch_invariant")
    compile: bool = _knob(False, "torch.compile the decode step (slow start; see BENCHMARKS)")
    cuda_graphs: bool = _knob(True, "on CUDA, replay captured graphs for decode-only steps")
    device: str = _knob("auto", "auto, cpu or cuda", choices=DEVICES)
    dtype: str = _knob("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16",
                       choices=DTYPES)
    grammar_cache: int = _knob(
        256, "compiled structured-output grammars kept (least recently used dropped first)")
    grammar_timeout: float = _knob(
        10.0, "seconds a structured-output constraint may take to compile; longer is a 400")
    max_grammar_bytes: int = _knob(
        65_536, "largest structured-output constraint (JSON schema, regex, grammar) in bytes",
        size=True)
    quantization: str = _knob(
        "none", "int8: every matrix product's weight quantized to int8 at load (one scale per "
        "output channel; activations quantized per step by fbgemm's dynamic int8 GEMM), about 4x "
        "fewer weight bytes per token; CPU only, not with batch_invariant or compile (see "
        "docs/API.md); none: the weights as --dtype", choices=QUANTIZATIONS)
    cpu_kernels: bool = _knob(
        True, "on CPU in fp32, try the project's own kernels (a one-row matrix product, a "
        "one-sequence step in one call, decode attention; built at start with the system C "
        "compiler; kept only where the warm-up measures them faster than PyTorch's; see "
        "docs/BENCHMARKS.md)")
    threads: int | None = _knob(
        None, "intra-op CPU threads of the engine (fixed); unset: OMP_NUM_THREADS if set, else "
        "every CPU the process may use (its affinity, capped by its cgroup CPU quota), moved "
        "between 1 and that by measured step times so a busy neighbour core costs little")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_request_sequences", "max_n",
                     "prefill_chunk", "grammar_cache", "max_grammar_bytes"):
            _positive_int(name, getattr(self, name))
        for name in ("kv_memory", "window_shift", "max_tokens_per_step", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("batch_invariant", "prefix_caching", "compile", "cuda_graphs", "cpu_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a boolean, got "
                                 f"{getattr(self, name)!r}")
        if (not isinstance(self.grammar_timeout, (int, float)) or isinstance(self.grammar_timeout, bool)
                or not 0 < self.grammar_timeout <= 3600):
            raise ValueError(f"EngineConfig.grammar_timeout must be in (0, 3600] seconds, got "
                             f"{self.grammar_timeout!r}")
        if not isinstance(self.kv_memory_fraction, float) or not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got "
                             f"{self.kv_memory_fraction!r}")
        if self.token_budget < self.prefill_chunk:
            raise ValueError(
                f"EngineConfig.max_tokens_per_step ({self.token_budget}) must be at least "
                f"prefill_chunk ({self.prefill_chunk})"
            )
        if self.token_budget <= self.max_batch_size:
            raise ValueError(
                f"EngineConfig.max_tokens_per_step ({self.token_budget}) must exceed "
                f"max_batch_size ({self.max_batch_size}): every decoding sequence takes one"
            )
        if self.device not in DEVICES:
            raise ValueError(f"EngineConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"EngineConfig.quantization must be one of {QUANTIZATIONS}, got "
                             f"{self.quantization!r}")
        if self.quantization == "int8" and self.batch_invariant:
            raise ValueError(
                "EngineConfig.quantization='int8' cannot be batch invariant: its int8 products "
                "quantize each step's activations with one scale for all the step's rows, so a "
                "row's result depends on its neighbours; use batch_invariant with 'none'")
        if self.quantization == "int8" and self.compile:
            raise ValueError("EngineConfig.quantization='int8' runs fbgemm's int8 kernels "
                             "eagerly; torch.compile (compile=True) is not supported with it")

    @property
    def token_budget(self) -> int:
        """Tokens one step may process (``max_tokens_per_step`` or its default)."""
        if self.max_tokens_per_step is not None:
            return self.max_tokens_per_step
        return max(512, self.max_batch_size + self.prefill_chunk)

    def window_shift_for(self, block_size: int) -> int:
        """The shift in force for a model with this context: the flag, capped at half the
        context (a larger shift would forget more than it saves), default half."""
        half = max(1, block_size // 2)
        return half if self.window_shift is None else min(self.window_shift, half)

    @classmethod
    def knobs(cls) -> tuple[dataclasses.Field, ...]:
        """Every field, with its help text in ``metadata["help"]`` (the server's flags)."""
        return dataclasses.fields(cls)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
