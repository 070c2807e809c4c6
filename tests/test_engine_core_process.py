"""The engine core in its own process (``--engine-core process``, the default): a real
``python -m service`` whose core is SIGKILLed under load ends every live stream with an error,
says why on /health, and exits 4; a killed front end takes its core with it; the core's stats
reach the front end's /metrics; the per-step message round-trips every column; a bench's
``model_factory`` replaces the checkpoint the core would load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from deploy_support import (
    ServerProcess,
    StreamResult,
    child_env,
    core_pid,
    make_tiny_checkpoint,
    metric_value,
    process_gone,
    stream_completion,
)
from engine_support import engine, request, tiny_checkpoint

from model import load_checkpoint, save_checkpoint
from service.engine.client import CoreClient, CoreStartError
from service.engine.config import EngineConfig
from service.engine.pacing import STEPS_AHEAD
from service.engine.types import (
    EngineStats,
    Finish,
    FinishReason,
    RequestMetrics,
    TokenEvents,
    TokenLogprob,
)
from service.engine.wire import OutputCodec

pytestmark = pytest.mark.timeout(180)
STREAMS = 6


def test_killing_the_core_under_load_ends_every_stream_with_an_error_and_the_server_exits_4(
        tmp_path):
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log")
    server.start()
    try:
        server.wait_ready()
        core = core_pid(server)
        assert core != server.proc.pid
        done = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "ab", "max_tokens": 5}).json()
        assert done["usage"]["completion_tokens"] == 5, done
        # the core's per-step stats reach the front end's metrics
        assert metric_value(server.url, "gptserve_generation_tokens_total") >= 5

        results: list[StreamResult] = []
        streaming = threading.Semaphore(0)

        def stream() -> None:
            with httpx.Client(timeout=120) as client:
                results.append(stream_completion(
                    client, server.url, "ab", 1_000_000, temperature=1.0,
                    on_headers=lambda _h: streaming.release()))

        readers = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for reader in readers:
            reader.start()
        for _ in readers:
            assert streaming.acquire(timeout=60), "a stream never started"
        time.sleep(0.5)  # every stream is generating
        os.kill(core, signal.SIGKILL)

        health = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server says why before it exits
            try:
                health = httpx.get(f"{server.url}/health", timeout=2)
            except httpx.TransportError:
                break
            if health.status_code == 503:
                break
            time.sleep(0.02)
        assert health is not None and health.status_code == 503, health
        assert "killed by signal 9" in health.json()["error"]["message"], health.text

        for reader in readers:
            reader.join(60)
        assert len(results) == STREAMS
        for result in results:
            assert result.finish_reason == "error", result
            assert len(result.text) > 0, "every stream had generated before the kill"
        assert server.proc.wait(30) == 4, server.log()
        assert "exited (killed by signal 9)" in server.log()
    finally:
        server.stop()


def test_a_killed_front_end_takes_its_core_with_it(tmp_path):
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log")
    server.start()
    try:
        server.wait_ready()
        core = core_pid(server)
        assert not process_gone(core)
        server.kill()
        assert _gone_within(core, 15), "the engine core outlived its front end"
    finally:
        server.stop()


def test_one_message_per_step_round_trips_every_column():
    events = TokenEvents(
        request_ids=["a", "a", "b"], indices=[0, 1, 0], token_ids=[5, None, 7],
        crops=[0, 0, 2], prompt_cropped=[False, False, True], num_generated=[3, 2, 40],
        logprobs=[-0.5, None, -1.25],
        top_logprobs=[(TokenLogprob(5, -0.5), TokenLogprob(6, -1.0)), None, ()],
        finishes={1: Finish(FinishReason.ABORT, 4),
                  2: Finish(FinishReason.LENGTH, 9, RequestMetrics(0.01, 0.2, 0.7, 3))},
    )
    stats = EngineStats(2, 1, 0.25, 0.004, 3, 12, 3, 1, 77, recomputed_tokens=16)
    codec = OutputCodec()
    kind, payload = codec.step(events, stats)
    got, got_stats = codec.decode_step(payload)
    assert got == events and got_stats == stats
    assert isinstance(got.finishes[2].reason, FinishReason)
    assert codec.decode_step(codec.step(TokenEvents(), None)[1]) == (TokenEvents(), None)


def test_a_client_that_goes_away_frees_its_slot_in_the_core(tiny_checkpoint):
    from conftest import live_server, wait_until

    with live_server(tiny_checkpoint, engine_core="process", max_batch_size=2) as srv:
        engine = srv.state.engine
        assert engine.pid != os.getpid(), "the core should run in its own process"
        body = {"prompt": "ab", "max_tokens": 10**6, "stream": True, "n": 2}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            wait_until(lambda: engine.stats().num_running == 2, what="both choices running")
        # the client hung up: the front end aborts, the core frees both slots at once
        wait_until(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0,
                   what="the aborted choices to leave the core")
        done = httpx.post(srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "ab", "max_tokens": 3, "n": 2}).json()
        assert [c["finish_reason"] for c in done["choices"]] == ["length", "length"], done


def test_a_constraint_compiled_in_the_front_end_is_honoured_by_the_core(tiny_checkpoint):
    from conftest import live_server

    with live_server(tiny_checkpoint, engine_core="process") as srv:
        choices = ["abc", "cab", "bba"]
        for seed in range(3):
            done = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "prompt": "ab", "max_tokens": 10, "seed": seed, "temperature": 1.0, "n": 2,
                "structured_outputs": {"choice": choices}}).json()
            for choice in done["choices"]:
                assert choice["text"] in choices and choice["finish_reason"] == "stop", done
        bad = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "prompt": "ab", "max_tokens": 10, "structured_outputs": {"regex": "(unclosed"}})
        assert bad.status_code == 400 and "structured_outputs" in bad.text, bad.text


def _greedy(eng, prompt: str, max_tokens: int = 12) -> list[int]:
    """The token ids ``eng`` (started here, shut down after) generates greedily for ``prompt``."""

    async def run() -> list[int]:
        return [out.token_id async for out in eng.add_request(
            request("r", prompt, max_tokens=max_tokens, temperature=0.0))
            if out.token_id is not None]

    eng.start()
    try:
        return asyncio.run(run())
    finally:
        eng.shutdown(5)


def test_a_model_factory_is_served_instead_of_the_checkpoint_on_disk(tmp_path):
    # on disk: another seed's model; the factory (engine_support.tiny_checkpoint) builds seed 0's
    on_disk = load_checkpoint(save_checkpoint(tmp_path / "ck", tiny_checkpoint(seed=1).model,
                                              tiny_checkpoint().tokenizer.spec()))
    config = EngineConfig(device="cpu", max_batch_size=2)
    served = _greedy(CoreClient(on_disk, config, model_factory="engine_support:tiny_checkpoint"),
                     "Hello")
    assert served == _greedy(engine(tiny_checkpoint(), max_batch_size=2), "Hello"), \
        "the core did not serve the factory's model"
    assert served != _greedy(engine(on_disk, max_batch_size=2), "Hello"), \
        "the two models agree: this test cannot tell which one the core served"


def test_a_model_factory_that_is_not_module_colon_function_fails_the_start(tmp_path):
    on_disk = load_checkpoint(save_checkpoint(tmp_path / "ck", tiny_checkpoint().model,
                                              tiny_checkpoint().tokenizer.spec()))
    with pytest.raises(CoreStartError, match="model_factory must be 'module:function'"):
        CoreClient(on_disk, EngineConfig(device="cpu"), model_factory="engine_support")


def test_a_tmpdir_too_long_for_a_socket_path_still_serves(tiny_checkpoint, tmp_path, monkeypatch):
    # a UNIX socket's path holds 107 bytes: under a TMPDIR this deep the core's sockets cannot
    # live there, so they go to a short folder (before: the core failed to bind, and the server
    # said "cannot load checkpoint: File name too long")
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose
    assert tempfile.gettempdir() == str(deep)
    eng = CoreClient(load_checkpoint(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=2))
    folder = eng.core_folder
    assert len(os.fsencode(folder)) + len("/outputs-0") <= 107, folder
    assert len(_greedy(eng, "Hello")) == 12
    assert not os.path.exists(folder), "the socket folder outlived the shutdown"


def test_a_core_whose_front_end_was_killed_exits_and_removes_its_socket_folder(
        tmp_path, short_tmp_path, monkeypatch):
    # SIGKILL gives the front end no chance to clean up: the core sees its parent gone, exits,
    # and removes the folder of its sockets (before: one gptserve-core-* folder left per crash)
    monkeypatch.setenv("TMPDIR", str(short_tmp_path))  # the server's temporary files go here
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log")
    server.start()
    try:
        server.wait_ready()
        core = core_pid(server)
        assert [p.name for p in short_tmp_path.iterdir() if p.name.startswith("gptserve-core-")]
        server.kill()
        assert _gone_within(core, 30), "the core outlived its front end"
        left = [p.name for p in short_tmp_path.iterdir() if p.name.startswith("gptserve-core-")]
        assert not left, f"the killed server's core left {left}"
    finally:
        server.stop()


def test_a_core_whose_front_end_died_while_it_was_starting_exits(tmp_path, short_tmp_path,
                                                                  monkeypatch):
    # the front end is SIGKILLed as soon as its core process exists, while that core is still
    # importing: the core must still see that its front end is gone (before: it took the pid
    # it then found as its parent, init's, and idled for ever, one orphan per crash)
    monkeypatch.setenv("TMPDIR", str(short_tmp_path))
    server = ServerProcess(make_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log")
    server.start()
    try:
        deadline = time.monotonic() + 60
        while not (core := _child_core(server.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core, "the server never spawned its engine core"
        server.kill()
        assert _gone_within(core, 60), "the core outlived a front end that died while it started"
    finally:
        server.stop()
        if core and not process_gone(core):
            os.kill(core, signal.SIGKILL)


def test_a_program_that_exits_without_shutting_its_client_down_exits(tiny_checkpoint, tmp_path,
                                                                     short_tmp_path):
    # a script that starts a CoreClient and returns without ``shutdown``: at interpreter exit
    # multiprocessing joins its children after a SIGTERM, which the core ignores (its front end
    # drains it), so the program hung for ever (before); now it exits and takes its core along
    script = tmp_path / "forgets.py"
    script.write_text(
        "import os, sys\n"
        "from model import load_checkpoint\n"
        "from service.engine.client import CoreClient\n"
        "from service.engine.config import EngineConfig\n"
        "if __name__ == '__main__':\n"
        f"    eng = CoreClient(load_checkpoint({str(tiny_checkpoint)!r}), "
        "EngineConfig(device='cpu', max_batch_size=2))\n"
        "    eng.start()\n"
        "    print(eng._process.pid, flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=child_env(TMPDIR=str(short_tmp_path)))
    try:
        core = int(proc.stdout.readline())
        assert proc.wait(60) == 0, "the program failed"
    except subprocess.TimeoutExpired:
        pytest.fail("the program hung at exit: its engine core was never stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone_within(core, 10), "the core outlived its program"
    left = [p.name for p in short_tmp_path.iterdir() if p.name.startswith("gptserve-core-")]
    assert not left, f"the program's core left {left}"


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone within ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return process_gone(pid)


def _child_core(parent: int) -> int | None:
    """The pid of ``parent``'s spawned engine-core child, once it exists."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            return int(entry.name)
    return None


def test_a_core_steps_ahead_of_the_loop_that_reads_it_waits_and_resumes(tiny_checkpoint):
    # started on the event loop, the client reads the core's socket there: while the loop is
    # blocked the core may send STEPS_AHEAD step messages, then it waits; the loop's first read
    # takes exactly those (one token each), and the stream goes on to its end
    eng = CoreClient(load_checkpoint(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=2))

    async def run() -> tuple[list[int], list]:
        eng.start()
        assert eng._receiver is None, "started on a loop, the client should need no thread"
        stream = eng.add_request(request("r", "ab", max_tokens=100, temperature=0.0))
        time.sleep(2.0)  # (blocking the loop) an unpaced core takes dozens of steps meanwhile
        sizes, outs = [], []
        async for batch in stream.batches():
            sizes.append(sum(t is not None for t in batch.token_ids))
            outs.extend(batch.events())
        return sizes, outs

    try:
        sizes, outs = asyncio.run(run())
    finally:
        eng.shutdown(5)
    assert sizes[0] == STEPS_AHEAD, f"the loop's first read took {sizes[0]} tokens, not " \
        f"{STEPS_AHEAD}: the core did not wait for its front end"
    assert sum(sizes) == 100, "the core did not resume"
    assert outs[-1].finish_reason == FinishReason.LENGTH


def test_a_core_steps_ahead_of_its_event_loop_waits_for_it_and_resumes(tiny_checkpoint):
    # started with no loop, a receiver thread reads the core's messages; the event loop is
    # blocked right after the request: the core may send STEPS_AHEAD step messages (their
    # stats reach the receiver thread at once), then it waits for the loop
    eng = CoreClient(load_checkpoint(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=2))
    steps: list[EngineStats] = []
    first_steps = threading.Event()

    def listener(stats: EngineStats) -> None:
        steps.append(stats)
        if len(steps) >= STEPS_AHEAD:
            first_steps.set()

    eng.add_stats_listener(listener)

    async def run() -> tuple[int, list[int]]:
        stream = eng.add_request(request("r", "ab", max_tokens=100, temperature=0.0))
        assert first_steps.wait(60), f"the core took {len(steps)} step(s), never {STEPS_AHEAD}"
        time.sleep(0.5)  # (blocking the loop) an unpaced core takes dozens more steps meanwhile
        while_blocked = len(steps)
        outs = [out async for out in stream]
        return while_blocked, outs

    eng.start()
    try:
        while_blocked, outs = asyncio.run(run())
    finally:
        eng.shutdown(5)
    assert while_blocked == STEPS_AHEAD, \
        f"the core took {while_blocked} steps while its front end consumed none"
    assert [o.token_id is not None for o in outs].count(True) == 100, "the core did not resume"
    assert outs[-1].finish_reason == FinishReason.LENGTH


def test_a_front_end_that_is_not_reading_does_not_hold_the_core_back(tmp_path):
    # front end 1 of 2 never joins: its step messages queue unread, front end 0's requests finish
    config = EngineConfig(device="cpu", max_batch_size=2)
    on_disk = load_checkpoint(save_checkpoint(tmp_path / "ck", tiny_checkpoint().model,
                                              tiny_checkpoint().tokenizer.spec()))
    served = _greedy(CoreClient(on_disk, config, fronts=2), "Hello", max_tokens=50)
    assert len(served) == 50, served



def test_two_threads_shutting_down_one_client_at_once_both_return_and_the_core_exits(
        tiny_checkpoint):
    # a reload retires an engine on one thread while the reloader's stop shuts it down on
    # another: both calls must return, the core must exit and the stream end, and the client's
    # sockets be closed once (two threads closing one ZMQ socket abort the whole process inside
    # libzmq: the ``pfd.revents & POLLIN`` assertion)
    eng = CoreClient(load_checkpoint(tiny_checkpoint), EngineConfig(device="cpu", max_batch_size=2))
    eng.start()
    assert eng._receiver is not None, "started with no loop, the client reads on a thread"
    core = eng._process
    outs: list = []
    streaming = threading.Event()

    async def consume() -> None:
        stream = eng.add_request(request("r", "ab", max_tokens=1_000_000, temperature=1.0))
        async for out in stream:
            outs.append(out)
            streaming.set()

    consumer = threading.Thread(target=asyncio.run, args=(consume(),))
    consumer.start()
    assert streaming.wait(60), "the request never produced a token"
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def shut() -> None:
        start.wait()
        try:
            eng.shutdown(None)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    callers = [threading.Thread(target=shut) for _ in range(2)]
    for caller in callers:
        caller.start()
    start.wait()
    for caller in callers:
        caller.join(30)
    consumer.join(30)
    assert not any(c.is_alive() for c in callers), "a shutdown call never returned"
    assert not errors, errors
    assert not consumer.is_alive(), "the stream never ended"
    assert outs[-1].finish_reason == FinishReason.ABORT
    core.join(10)
    assert not core.is_alive(), "the core did not exit"
