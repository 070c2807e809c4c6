"""The engine's settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, how much KV memory it may hold, and where the model runs.

    - ``max_batch_size``: concurrent sequences (KV slots); each of a request's ``n`` choices
      is its own sequence.
    - ``max_queue``: requests that may wait for a slot before ``add_request`` raises
      ``QueueFullError``.
    - ``kv_memory``: bytes for the KV cache; ``None`` = ``max_batch_size`` full windows. A
      smaller budget lowers the slot count below ``max_batch_size``.
    - ``window_shift``: tokens dropped from the left each time a sequence's context outgrows the
      model's ``block_size``; 1 reproduces nanoGPT's ``generate`` exactly, larger trades
      exactness for speed (see docs/BENCHMARKS.md ``## Engine``). Capped at ``block_size // 2``
      for small models (``Engine.window_shift`` holds the value in force).
    - ``prefill_chunk``: a prompt (or re-encoded window) is prefilled in chunks of this many
      tokens, one chunk per sequence per step, so decode streams keep flowing.
    - ``max_tokens_per_step``: token budget per step; decode tokens count first, then prefill
      chunks in FIFO order while they fit (one chunk always runs, so prefill cannot starve).
    - ``batch_invariant``: decode always runs all slots as one fixed-shape batch, so a row's
      arithmetic never depends on the other rows (a seeded request gives the same tokens alone
      or in any batch). False decodes only the occupied slot prefix (faster at low load).
    """

    max_batch_size: int = 32
    max_queue: int = 256
    kv_memory: int | None = None
    window_shift: int = 64
    prefill_chunk: int = 128
    max_tokens_per_step: int = 512
    device: str = "auto"
    dtype: str = "auto"
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "window_shift", "prefill_chunk",
                     "max_tokens_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.kv_memory is not None and (
            not isinstance(self.kv_memory, int) or isinstance(self.kv_memory, bool)
            or self.kv_memory < 1
        ):
            raise ValueError(
                f"EngineConfig.kv_memory must be a positive byte count or None, got "
                f"{self.kv_memory!r}"
            )
        if self.max_tokens_per_step < self.prefill_chunk:
            raise ValueError(
                f"EngineConfig.max_tokens_per_step ({self.max_tokens_per_step}) must be at least "
                f"prefill_chunk ({self.prefill_chunk})"
            )
        if self.device not in DEVICES:
            raise ValueError(f"EngineConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
