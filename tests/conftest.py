"""Shared fixtures: tiny checkpoints, live servers, and a fake engine with the real interface."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from model.tokenizer import CharTokenizer
from service.engine.types import (
    EngineStats,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)

ALPHABET = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZé€"


@dataclass(frozen=True)
class _ModelConfig:
    block_size: int = 32


class FakeStream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = n

    def put(self, out: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.open == 0:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finish_reason is not None:
            self.open -= 1
        return out


class FakeEngine:
    """Emits token (previous + 1) mod vocab each step; same interface as service.engine.Engine."""

    def __init__(
        self, tokenizer=None, *, max_batch_size: int = 4, max_queue: int = 8, step_s: float = 0.002
    ) -> None:
        self.tokenizer = tokenizer or CharTokenizer(list(ALPHABET))
        self.vocab_size = self.tokenizer.vocab_size
        self.eos_token_id = None
        self.model_config = _ModelConfig()
        self.device, self.dtype = "cpu", "float32"
        self.max_batch_size, self.max_queue, self.step_s = max_batch_size, max_queue, step_s
        self.ready = False
        self._lock = threading.Lock()
        self._waiting: list = []
        self._running: dict = {}
        self._aborted: set[str] = set()
        self._listeners: list = []
        self._stop = threading.Event()
        self._stopped = False
        self._stats = EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopped = True
        self._stop.set()
        self._thread.join(timeout)

    def add_stats_listener(self, fn) -> None:
        self._listeners.append(fn)

    def stats(self) -> EngineStats:
        return self._stats

    def add_request(self, request) -> FakeStream:
        if self._stopped:
            raise EngineStoppedError("stopped")
        request.params.validate(self.vocab_size)
        if not request.prompt_token_ids:
            raise InvalidRequestError("prompt", "empty")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError("full")
            stream = FakeStream(asyncio.get_running_loop(), request.params.n)
            self._waiting.append((request, stream, time.monotonic()))
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def _loop(self) -> None:
        step = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with self._lock:
                while self._waiting and len(self._running) < self.max_batch_size:
                    req, stream, t = self._waiting.pop(0)
                    self._running[req.request_id] = [
                        req,
                        stream,
                        t,
                        [[] for _ in range(req.params.n)],
                    ]
                for rid in list(self._aborted):
                    self._aborted.discard(rid)
                    for i, item in enumerate(self._waiting):
                        if item[0].request_id == rid:
                            self._waiting.pop(i)
                            for k in range(item[0].params.n):
                                item[1].put(
                                    RequestOutput(rid, k, None, finish_reason=FinishReason.ABORT)
                                )
                            break
                    if rid in self._running:
                        req, stream, _, outs = self._running.pop(rid)
                        for k in range(req.params.n):
                            stream.put(
                                RequestOutput(rid, k, None, finish_reason=FinishReason.ABORT)
                            )
                gen = 0
                for rid, (req, stream, _t, outs) in list(self._running.items()):
                    for k in range(req.params.n):
                        prev = (outs[k] or list(req.prompt_token_ids))[-1]
                        tok = (prev + 1 + k) % self.vocab_size
                        outs[k].append(tok)
                        gen += 1
                        done = len(outs[k]) >= req.params.max_tokens
                        lp = None if req.params.logprobs is None else -0.5
                        top = (
                            None
                            if req.params.logprobs is None
                            else tuple(
                                TokenLogprob((tok + j) % self.vocab_size, -0.5 - j)
                                for j in range(req.params.logprobs)
                            )
                        )
                        total = len(req.prompt_token_ids) + len(outs[k])
                        crops = max(0, total - self.model_config.block_size)
                        stream.put(
                            RequestOutput(
                                rid,
                                k,
                                tok,
                                lp,
                                top,
                                FinishReason.LENGTH if done else None,
                                len(req.prompt_token_ids),
                                len(outs[k]),
                                crops=crops,
                                prompt_cropped=len(req.prompt_token_ids)
                                > self.model_config.block_size,
                                metrics=RequestMetrics(0.0, 0.001, (0.001,), 0.01)
                                if done
                                else None,
                            )
                        )
                    if all(len(o) >= req.params.max_tokens for o in outs):
                        self._running.pop(rid)
                step += 1
                self._stats = EngineStats(
                    len(self._running),
                    len(self._waiting),
                    len(self._running) / self.max_batch_size,
                    time.perf_counter() - t0,
                    len(self._running),
                    0,
                    gen,
                    0,
                    step,
                )
            self.ready = True
            for fn in self._listeners:
                fn(self._stats)
            time.sleep(self.step_s)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, run in a thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def state(self):
        return self.app.state.server

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.state.ready):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not become ready")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def save_tiny_checkpoint(
    path,
    *,
    chars: str = ALPHABET,
    block_size: int = 32,
    n_layer: int = 2,
    n_embd: int = 32,
    seed: int = 0,
):
    """A random char-level GPT saved as a native checkpoint (tiny: fast on a busy CPU)."""
    import torch

    from model import GPT, GPTConfig, save_checkpoint

    torch.manual_seed(seed)
    tokenizer = CharTokenizer(list(chars))
    config = GPTConfig(
        block_size=block_size,
        vocab_size=tokenizer.vocab_size,
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
    )
    return save_checkpoint(path, GPT(config), tokenizer.spec(), {"note": "random test model"})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a random 2-layer char model with a 32-token window (shared by the session)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def live_server(checkpoint, **overrides) -> LiveServer:
    """A real uvicorn server loading ``checkpoint`` through the app's own lifespan."""
    from service.app import create_app
    from service.settings import Settings

    options = {
        "model_name": "tiny",
        "device": "cpu",
        "max_batch_size": 8,
        "max_queue": 16,
        "shutdown_timeout": 5.0,
    }
    options.update(overrides)
    return LiveServer(create_app(Settings(checkpoint=checkpoint, **options)))


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
