"""The inference engine: continuous batching over a slot KV cache, chunked prefill,
sliding-window context, a batch-invariant sampler, and a threaded asyncio-friendly facade.

``Engine`` is imported lazily, so the plain-Python parts (scheduler, sequence, types, config)
import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.engine.config import EngineConfig
from service.engine.constraints import structured_outputs
from service.engine.stream import RequestStream
from service.engine.types import (
    EngineError,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    StructuredOutputs,
    TokenLogprob,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "InvalidRequestError",
    "QueueFullError",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "StructuredOutputs",
    "TokenLogprob",
    "structured_outputs",
]

if TYPE_CHECKING:
    from service.engine.engine import Engine


def __getattr__(name: str):
    if name == "Engine":
        from service.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
