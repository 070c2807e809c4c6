"""The messages between the HTTP front end and the engine-core process, on two ZMQ sockets.

Front end -> core (one PUSH/PULL pair): ``(kind, payload)`` pickled, one message per admitted
request batch, abort or shutdown: rare, and their types (``Request`` with its sampling params)
grow with features, so the standard pickle keeps them whole.

Core -> front end: one message per engine step, never one per token: the step's ``TokenEvents``
(columns: request ids, choice indices, token ids, ...; finishes and logprobs when there are any)
and its ``EngineStats`` (nothing per token: the core counts its metrics into a file
the front ends read, ``service.engine.counters``), encoded as MessagePack by msgspec against those
dataclasses' own types.
msgspec round-trips a 256-row step in ~60 us here, half of pickle's time (docs/BENCHMARKS.md, "The
engine core in its own process").
Besides steps the core sends ``READY`` once (what it planned: slots, threads, window), and
``STOPPED`` or ``FAILED`` last.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import msgspec

from model.threads import ThreadPlan
from service.engine.types import EngineStats, TokenEvents

# input kinds
ADD, ABORT, SHUTDOWN = b"add", b"abort", b"shutdown"
# output kinds
READY, STEP, STOPPED, FAILED = b"ready", b"step", b"stopped", b"failed"


@dataclass(frozen=True)
class CoreInfo:
    """What the core planned once its model was loaded and warmed up (the ``READY`` message)."""

    n_slots: int
    window_shift: int
    threads: ThreadPlan
    vocab_size: int  # the model's embedding rows (checked against the front end's load)
    block_size: int
    pid: int


class OutputCodec:
    """Encodes and decodes the core's per-step messages (one encoder/decoder per process)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._step = msgspec.msgpack.Decoder(tuple[TokenEvents, EngineStats | None])
        self._info = msgspec.msgpack.Decoder(CoreInfo)

    def step(self, events: TokenEvents, stats: EngineStats | None) -> list[bytes]:
        return [STEP, self._encoder.encode((events, stats))]

    def ready(self, info: CoreInfo) -> list[bytes]:
        return [READY, self._encoder.encode(info)]

    def decode_step(self, payload: bytes) -> tuple[TokenEvents, EngineStats | None]:
        return self._step.decode(payload)

    def decode_info(self, payload: bytes) -> CoreInfo:
        return self._info.decode(payload)


def encode_input(kind: bytes, payload: Any) -> list[bytes]:
    return [kind, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)]


def decode_input(frames: list[bytes]) -> tuple[bytes, Any]:
    # the front end that spawned this core is the only peer of its private ipc socket
    return frames[0], pickle.loads(frames[1])  # noqa: S301
