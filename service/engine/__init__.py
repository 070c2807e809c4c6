"""The inference engine: continuous batching over a slot KV cache, chunked prefill,
sliding-window context, a batch-invariant sampler, and a threaded asyncio-friendly facade."""

from service.engine.config import EngineConfig
from service.engine.engine import Engine
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
    "TokenLogprob",
]
