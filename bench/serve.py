"""HTTP serving benchmark: streaming clients against a live server vs the engine in-process.

Run (starts its own server on the shipped weights; a random stand-in of the same shape when they
are absent):
    OMP_NUM_THREADS=2 python3 bench/serve.py --checkpoint weights/shakespeare-char
Against a server that is already running (same checkpoint and engine flags for a fair ratio):
    python3 bench/serve.py --url http://127.0.0.1:8000 --checkpoint weights/shakespeare-char

One workload (``--requests`` prompts of mixed length, ``--max-tokens`` new tokens each, greedy
by default) is served twice in the same run, alternating ``--rounds`` times:
1. over HTTP: ``--concurrency`` streaming clients (closed loop: each sends its next request when
   the previous stream ends), or Poisson arrivals at ``--rate`` requests/s (open loop), spread
   over ``--clients`` load processes (no more than streams; each its share of the streams and prompts, on raw sockets)
   so that one client process is never the limit; their CPU seconds are printed beside the
   server's (every process of its tree: the front end and its engine core, from /proc);
2. in-process: the same ``Engine`` API the server uses, driven by the same client pattern in
   this process (its CPU seconds printed too).
The two take turns within each round, in-process first in odd rounds and HTTP first in even
ones. It prints TTFT and inter-token latency (p50/p99), output tokens/s and requests/s for both,
and the ratio HTTP tokens/s / in-process tokens/s (target at 32 and 256 streams: >= 0.9) of the
best rounds and, steadier on a shared machine whose speed drifts, the median of the rounds'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hostcost import tree_cpu, tree_threads

from service.app import engine_config
from service.settings import Settings


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: Path
    url: str | None = None
    requests: int = 96
    concurrency: int = 32
    rate: float | None = None  # Poisson arrivals per second; None = closed loop
    max_tokens: int = 128
    prompt_tokens: tuple[int, int] = (16, 64)
    temperature: float = 0.0
    rounds: int = 3
    seed: int = 0


@dataclass
class Trace:
    """One request as a client saw it: send time, token arrival times, token count."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    done: float = 0.0


@dataclass(frozen=True)
class Summary:
    wall: float
    requests: int
    tokens: int
    ttft: list[float]
    itl: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall


def summarize(traces: list[Trace], wall: float) -> Summary:
    ttft = [t.arrivals[0] - t.sent for t in traces if t.arrivals]
    itl = [b - a for t in traces for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
    return Summary(wall, len(traces), sum(t.tokens for t in traces), ttft, itl)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# -- the two ways of serving one request ----------------------------------------------------


class _SSEReader(asyncio.Protocol):
    """One streamed completion on its own connection, read as the bytes arrive: de-chunks the
    body and counts SSE events in ``data_received`` (no stream reader, no task wake-up per line),
    parsing JSON only for the final usage chunk. The client shares this machine's CPU with the
    server, so it does as little per event as it can."""

    def __init__(self, trace: Trace, done: asyncio.Future) -> None:
        self.trace, self.done = trace, done
        self.buffer = b""
        self.head = True  # still reading the status line and headers
        self.body = b""  # de-chunked bytes not yet split into events
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer + data
        if self.head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 200 " not in status:
                self._end(RuntimeError(f"server answered {status!r}"))
                return
            self.head, buffer = False, buffer[end + 4 :]
        body, pos, finished = self.body, 0, False
        while True:  # the whole chunks in the buffer
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(buffer[pos:line_end], 16)
            if size == 0:
                finished = True
                break
            if len(buffer) < line_end + 2 + size + 2:
                break
            body += buffer[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2
        self.buffer = buffer[pos:]
        *events, self.body = body.split(b"\n\n")
        trace = self.trace
        for event in events:
            if event == b"data: [DONE]":
                continue
            if event.startswith(b"data: {") and b'"choices":[]' in event:
                trace.tokens = json.loads(event[6:])["usage"]["completion_tokens"]
            elif b'"text":""' not in event:
                trace.arrivals.append(now)
        if finished:
            self._end(None)

    def connection_lost(self, exc) -> None:
        self._end(exc or (None if self.trace.done else EOFError("the server closed early")))

    def _end(self, error: BaseException | None) -> None:
        if not self.trace.done:
            self.trace.done = time.perf_counter()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


async def http_request(base: tuple[str, int], prompt: list[int], cfg: BenchConfig) -> Trace:
    """One streamed completion over a fresh HTTP/1.1 connection (``_SSEReader`` reads it)."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "seed": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    loop = asyncio.get_running_loop()
    trace = Trace(sent=time.perf_counter())
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _SSEReader(trace, done), *base)
    transport.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await done
    return trace


def engine_request(
    engine, counter: list[int]
) -> Callable[[list[int], BenchConfig], Awaitable[Trace]]:
    from service.engine import Request, SamplingParams

    async def run(prompt: list[int], cfg: BenchConfig) -> Trace:
        counter[0] += 1
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=0)
        trace = Trace(sent=time.perf_counter())
        async for out in engine.add_request(Request(f"bench-{counter[0]}", tuple(prompt), params)):
            if out.token_id is not None:
                trace.arrivals.append(time.perf_counter())
                trace.tokens += 1
        trace.done = time.perf_counter()
        return trace

    return run


async def drive(serve_one, prompts: list[list[int]], cfg: BenchConfig) -> Summary:
    """Closed loop (``concurrency`` workers) or Poisson arrivals; returns the summary."""
    start = time.perf_counter()
    traces = await drive_traces(serve_one, prompts, cfg)
    return summarize(traces, time.perf_counter() - start)


async def drive_traces(serve_one, prompts: list[list[int]], cfg: BenchConfig) -> list[Trace]:
    traces: list[Trace] = []
    if cfg.rate is None:
        queue = list(prompts)

        async def worker() -> None:
            while queue:
                traces.append(await serve_one(queue.pop(0), cfg))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    else:
        rng = random.Random(cfg.seed)
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(serve_one(prompt, cfg)))
            await asyncio.sleep(rng.expovariate(cfg.rate))
        traces = list(await asyncio.gather(*tasks))
    return traces


# -- the load processes ---------------------------------------------------------------------


def _event_loop_runner() -> Callable:
    """uvloop's ``run`` where it is installed (it is in the server's lock: uvicorn's standard
    extra), else asyncio's: the load processes' event-loop cost per event is CPU taken from the
    server on a shared machine."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def load_process(base: tuple[str, int], prompts: list[list[int]], cfg: BenchConfig, conn,
                 go) -> None:
    """One load process (a ``spawn`` target): wait for ``go``, drive its share of the streams,
    send back its traces and the CPU seconds the drive took."""
    conn.send("ready")
    go.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    run = _event_loop_runner()
    traces = run(drive_traces(lambda pr, c: http_request(base, pr, c), prompts, cfg))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    conn.send(([(t.sent, t.arrivals, t.tokens, t.done) for t in traces], cpu))
    conn.close()


def _print_threads(server_pid: int, before: dict, after: dict) -> None:
    """The server's threads that used CPU in the round: process (the front end, or a child:
    the engine core), thread (``main``: the event loop, or the core's loop) and CPU seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = []
    for (pid, tid), (comm, ticks) in after.items():
        used = (ticks - before.get((pid, tid), (comm, 0))[1]) / tick
        if used >= 0.05:
            process = "front end" if pid == server_pid else f"child {pid}"
            busy.append((process, "main" if tid == pid else f"{comm} {tid}", used))
    print("  server threads (CPU s): " + ", ".join(
        f"{process} {name} {used:.1f}" for process, name, used in sorted(busy)), flush=True)


def drive_http(base: tuple[str, int], prompts: list[list[int]], cfg: BenchConfig, clients: int,
               server_pid: int | None) -> tuple[Summary, list[float], float | None]:
    """The workload over HTTP from ``clients`` load processes: the summary, each load process's
    CPU seconds and the server tree's (None for a server this bench did not start); prints
    the server's busy threads (CPU s of each, by process)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with an engine thread
    go = context.Event()
    if cfg.rate is None:  # closed loop: a load process without a stream would drop its prompts
        clients = max(1, min(clients, cfg.concurrency))
    shares = []
    for i in range(clients):
        concurrency = cfg.concurrency // clients + (i < cfg.concurrency % clients)
        rate = cfg.rate / clients if cfg.rate else None
        share = BenchConfig(**{**cfg.__dict__, "concurrency": concurrency, "rate": rate,
                               "seed": cfg.seed + i, "requests": len(prompts[i::clients])})
        shares.append((prompts[i::clients], share))
    pipes, procs = [], []
    for share_prompts, share in shares:
        ours, theirs = context.Pipe()
        proc = context.Process(target=load_process, args=(base, share_prompts, share, theirs, go),
                               name="serve-bench-load", daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    for conn in pipes:
        conn.recv()  # "ready": imported and waiting
    server0 = tree_cpu(server_pid) if server_pid else None
    threads0 = tree_threads(server_pid) if server_pid else {}
    start = time.perf_counter()
    go.set()
    traces: list[Trace] = []
    load_cpu = []
    for conn in pipes:
        rows, cpu = conn.recv()
        traces += [Trace(sent, arrivals, tokens, done) for sent, arrivals, tokens, done in rows]
        load_cpu.append(cpu)
    wall = max(t.done for t in traces) - start
    server_cpu = tree_cpu(server_pid) - server0 if server_pid else None
    if server_pid:
        _print_threads(server_pid, threads0, tree_threads(server_pid))
    for proc in procs:
        proc.join(30)
    return summarize(traces, wall), load_cpu, server_cpu


# -- setup ------------------------------------------------------------------------------------


def make_prompts(tokenizer, cfg: BenchConfig) -> list[list[int]]:
    """Mixed-length prompts cut from the corpus (GPTSERVE_TEST_CORPUS) or random vocab ids."""
    rng = random.Random(cfg.seed)
    low, high = cfg.prompt_tokens
    corpus = os.environ.get("GPTSERVE_TEST_CORPUS")
    ids: list[int] = []
    if corpus and Path(corpus).is_file():
        try:
            ids = tokenizer.encode(Path(corpus).read_text(encoding="utf-8")[:100_000])
        except ValueError:
            ids = []
    prompts = []
    for _ in range(cfg.requests):
        n = rng.randint(low, high)
        if len(ids) > n:
            start = rng.randrange(len(ids) - n)
            prompts.append(ids[start : start + n])
        else:
            prompts.append([rng.randrange(tokenizer.vocab_size) for _ in range(n)])
    return prompts


def checkpoint_or_stand_in(path: Path, tmp: Path) -> tuple[Path, str]:
    if path.exists():
        return path, str(path)
    import torch

    from model import GPT, CharTokenizer, GPTConfig, save_checkpoint

    torch.manual_seed(0)
    chars = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    config = GPTConfig(block_size=128, vocab_size=len(chars), n_layer=4, n_head=4, n_embd=192)
    out = save_checkpoint(tmp / "stand-in", GPT(config), CharTokenizer(chars).spec())
    return out, f"random stand-in {config} ({path} not found)"


def start_server(checkpoint: Path, settings: Settings, extra: list[str]
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--max-batch-size",
        str(settings.engine.max_batch_size),
        "--max-queue",
        str(settings.engine.max_queue),
        "--device",
        settings.engine.device,
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 120 s")


def print_table(cfg: BenchConfig, http: Summary, local: Summary) -> None:
    rows = [
        ("output tokens/s", f"{http.tokens_per_s:,.0f}", f"{local.tokens_per_s:,.0f}"),
        ("requests/s", f"{http.requests_per_s:.2f}", f"{local.requests_per_s:.2f}"),
        (
            "TTFT p50 / p99 (ms)",
            f"{pct(http.ttft, 50) * 1e3:.1f} / {pct(http.ttft, 99) * 1e3:.1f}",
            f"{pct(local.ttft, 50) * 1e3:.1f} / {pct(local.ttft, 99) * 1e3:.1f}",
        ),
        (
            "ITL p50 / p99 (ms)",
            f"{pct(http.itl, 50) * 1e3:.1f} / {pct(http.itl, 99) * 1e3:.1f}",
            f"{pct(local.itl, 50) * 1e3:.1f} / {pct(local.itl, 99) * 1e3:.1f}",
        ),
        ("tokens generated", f"{http.tokens}", f"{local.tokens}"),
    ]
    print(f"| {'':22} | {'HTTP (SSE clients)':>20} | {'in-process engine':>20} |")
    print(f"|{'-' * 24}|{'-' * 22}|{'-' * 22}|")
    for name, a, b in rows:
        print(f"| {name:22} | {a:>20} | {b:>20} |")
    ratio = http.tokens_per_s / local.tokens_per_s
    print(f"\nHTTP / in-process output tokens/s (best rounds): {ratio:.3f} (target >= 0.9)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("weights/shakespeare-char"))
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (open loop)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3, help="alternations of HTTP and in-process")
    p.add_argument("--clients", type=int, default=4,
                   help="load processes driving the HTTP streams (each its share)")
    p.add_argument("--server-args", default="",
                   help="more flags for the server it starts, e.g. '--engine-core thread'")
    args = p.parse_args(argv)

    from model import load_checkpoint
    from service.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, label = checkpoint_or_stand_in(args.checkpoint, Path(tmp))
        cfg = BenchConfig(
            checkpoint=checkpoint,
            url=args.url,
            requests=args.requests,
            concurrency=args.concurrency,
            rate=args.rate,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            rounds=args.rounds,
        )
        settings = Settings.create(
            checkpoint=checkpoint,
            device="cpu",
            max_batch_size=max(32, cfg.concurrency),
            max_queue=max(256, cfg.requests),
        )
        engine = Engine(load_checkpoint(checkpoint), engine_config(settings))
        prompts = make_prompts(engine.tokenizer, cfg)
        loaders = args.clients if cfg.rate else max(1, min(args.clients, cfg.concurrency))
        mode = (
            f"Poisson {cfg.rate}/s"
            if cfg.rate
            else f"closed loop, {cfg.concurrency} concurrent streams"
        )
        print(
            f"checkpoint: {label}\nworkload: {cfg.requests} requests, {mode}, prompts "
            f"{cfg.prompt_tokens[0]}-{cfg.prompt_tokens[1]} tokens, {cfg.max_tokens} new "
            f"tokens, temperature {cfg.temperature}; torch threads "
            f"{os.environ.get('OMP_NUM_THREADS', 'default')}; {cfg.rounds} round(s), best "
            f"of each reported; HTTP load from {loaders} processes\n"
        )
        extra = args.server_args.split()
        proc, url = (None, cfg.url) if cfg.url else start_server(checkpoint, settings, extra)
        try:
            best_http = best_local = None
            counter = [0]
            ratios: list[float] = []

            async def run_all() -> tuple[Summary, Summary]:
                nonlocal best_http, best_local
                engine.start()
                base = (httpx.URL(url).host, httpx.URL(url).port)
                serve_http = lambda pr, c: http_request(base, pr, c)  # noqa: E731
                serve_local = engine_request(engine, counter)
                warm = BenchConfig(**{**cfg.__dict__, "requests": 4, "max_tokens": 8})
                await drive(serve_http, prompts[:4], warm)
                await drive(serve_local, prompts[:4], warm)
                server_pid = proc.pid if proc is not None else None
                for r in range(cfg.rounds):
                    # the order alternates (local, HTTP; HTTP, local; ...): a machine that speeds
                    # up or slows down over the run favours neither side
                    if r % 2:
                        http, load_cpu, server_cpu = await asyncio.to_thread(
                            drive_http, base, prompts, cfg, args.clients, server_pid)
                    cpu0 = time.process_time()
                    local = await drive(serve_local, prompts, cfg)
                    local_cpu = time.process_time() - cpu0
                    if not r % 2:
                        http, load_cpu, server_cpu = await asyncio.to_thread(
                            drive_http, base, prompts, cfg, args.clients, server_pid)
                    ratios.append(http.tokens_per_s / local.tokens_per_s)
                    server = "" if server_cpu is None else f"server {server_cpu:.1f} CPU s, "
                    loads = ", ".join(f"{c:.1f}" for c in load_cpu)
                    print(
                        f"round {r + 1}: HTTP {http.tokens_per_s:,.0f} tok/s ({server}load "
                        f"processes {loads} CPU s), in-process {local.tokens_per_s:,.0f} tok/s "
                        f"({local_cpu:.1f} CPU s), ratio {ratios[-1]:.3f}", flush=True
                    )
                    if best_http is None or http.tokens_per_s > best_http.tokens_per_s:
                        best_http = http
                    if best_local is None or local.tokens_per_s > best_local.tokens_per_s:
                        best_local = local
                return best_http, best_local

            http, local = asyncio.run(run_all())
            print()
            print_table(cfg, http, local)
            print(f"median of the per-round ratios: {statistics.median(ratios):.3f}")
        finally:
            engine.shutdown(5)
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
