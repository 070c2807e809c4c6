"""Shared fixtures: tiny checkpoints and live uvicorn servers on free loopback ports."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from model.tokenizer import CharTokenizer

ALPHABET = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZé€"


class LiveServer:
    """A real server for ``app`` (made by ``create_app``) on a free loopback port, run in a
    thread: the production server (``service.server.build_server``: uvicorn with the guarded
    protocol, our listener and connection cap, and the drain), not a plain ``uvicorn.Server``."""

    def __init__(self, app, *, wait_ready: bool = True) -> None:
        from service.server import build_server
        from service.transport.sockets import bind

        self.app = app
        self.wait_ready = wait_ready
        [self.sock] = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        limits = app.state.server.settings.transport
        self.server = build_server(app, [self.sock], limits)
        self.server.config.timeout_graceful_shutdown = 2
        self.loop = None  # the server's event loop, once running
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        factory = self.server.config.get_loop_factory() or asyncio.new_event_loop
        self.loop = factory()  # uvloop when installed, like uvicorn.run
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def num_tasks(self) -> int:
        """Asyncio tasks alive in the server's loop (leak checks)."""

        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)

    @property
    def state(self):
        return self.app.state.server

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and (self.state.ready or not self.wait_ready)):
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


def save_tiny_bpe_checkpoint(path, *, block_size: int = 32):
    """A random one-layer model over GPT-2's BPE vocabulary (50,257 tokens, padded to 50,304)."""
    import torch

    from model import GPT, GPTConfig, TiktokenTokenizer, save_checkpoint

    torch.manual_seed(0)
    tokenizer = TiktokenTokenizer.by_name("gpt2")
    config = GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)
    return save_checkpoint(path, GPT(config), tokenizer.spec())


def token_events(request_id: str, tokens: list[int], finish: bool = False):
    """One step's ``TokenEvents`` for ``tokens``, all of choice 0 of ``request_id`` (the last one
    finishing it by length when ``finish``)."""
    from service.engine.types import Finish, FinishReason, TokenEvents

    n = len(tokens)
    events = TokenEvents([request_id] * n, [0] * n, list(tokens), [0] * n, [False] * n,
                         list(range(1, n + 1)), cached_tokens=[0] * n)
    if finish:
        events.finishes[n - 1] = Finish(FinishReason.LENGTH, 3)
    return events


def pytest_collection_modifyitems(items):
    """Give every test its own node id. Schemathesis names each operation's test
    ``test_x[POST /v1/completions]`` but, with no callspec, pytest 9 gives them all the function's
    node id; pytest-xdist's ``--dist loadfile`` (the README's test command) keys its queue by node
    id, so it ran one of the nine and left the rest out, without an error."""
    for item in items:
        label = getattr(item, "operation_label", None)  # schemathesis' items: "POST /v1/completions"
        if label is not None and item.id.params is None:
            item._id = item.id.with_params(label)  # pytest 9 keeps a node's id in ``_id``


@pytest.fixture
def short_tmp_path():
    """An empty folder with a short path, removed after the test: the TMPDIR of a server process,
    whose engine core makes its Unix sockets there when the path fits (at most 107 bytes a path;
    pytest's ``tmp_path`` under pytest-xdist, /tmp/pytest-of-USER/pytest-N/popen-gwK/TEST-NAME/,
    leaves too few, and the core would fall back to /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="gptserve-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a random 2-layer char model with a 32-token window (shared by the session)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def live_server(checkpoint, **overrides) -> LiveServer:
    """A real uvicorn server loading ``checkpoint`` through the app's own lifespan.

    Its engine runs on a thread of the test's process (``engine_core="thread"``: tests reach into
    ``srv.state.engine`` and the start is quick); ``engine_core="process"`` gives the default's
    engine-core process, which every ``python -m service`` test (``ServerProcess``) runs too."""
    from service.app import create_app
    from service.settings import Settings

    options = {
        "engine_core": "thread",
        "model_name": "tiny",
        "device": "cpu",
        "max_batch_size": 8,
        "max_queue": 16,
        "shutdown_timeout": 5.0,
    }
    options.update(overrides)
    return LiveServer(create_app(Settings.create(checkpoint=checkpoint, **options)))


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_engine_thread_left_behind():
    """Fail the test that leaves a running engine thread behind: a leaked engine with work
    steps forever and slows every later test (CI once took 48 minutes because of one)."""
    before = {t for t in threading.enumerate() if t.name == "engine"}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [t for t in threading.enumerate() if t.name == "engine" and t not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"{len(left)} engine thread(s) still running after the test"
