"""Host cost: what the engine and the server spend per token when the model itself costs nothing.

Run (from the repository root; builds a worktree of the baseline commit in /tmp if it is absent):
    nice -n 19 python bench/hostcost.py
    nice -n 19 python bench/hostcost.py --baseline-commit 1446e4f --streams 1 32 256 1024 --repeat 2
    nice -n 19 python bench/hostcost.py --skip-engine --repeat 2     # the server figures only
    nice -n 19 python bench/hostcost.py --skip-engine --cores process --baseline-commit 7f37a13 \
        --baseline-core process --repeat 2                           # two process cores

The model is a bench-only stand-in (``StandIn``): a GPT-2-vocabulary network whose packed forward
returns fixed logits (no matmuls, no attention), so every second a step takes is host work:
scheduling, packing, the sampler's argmax over the vocabulary, bookkeeping, and (over HTTP) the
front end's detokenization, SSE framing and socket writes. Two figures, for the baseline tree and
this one side by side, each measured in fresh processes that import only that tree:
1. **engine host time per token, in-process**: the engine driven synchronously (``Engine.steps``
   here, ``Engine.iterate`` in a baseline without it) serving ``S`` greedy requests of
   ``--max-tokens`` tokens together (S = 1, 32, 256, 1024), CPU seconds of the process / tokens;
2. **server CPU per streamed token over HTTP** at ``--http-streams`` streams: the server runs the
   stand-in engine behind the production server (``service.server.serve``), for this tree with
   each engine core of ``--cores`` (``thread``: ``Engine``; ``process``: ``CoreClient``, whose
   spawned core builds the stand-in through ``CoreSpec.model_factory``, a bench/test-only hook)
   and for the baseline with ``--baseline-core`` (a thread by default: 1446e4f has no process
   core; ``process`` compares two trees' engine-core processes); ``--clients`` load processes
   keep the streams busy (closed loop, raw sockets, one connection per request) and print their
   own CPU; the server's
   CPU (every process of the server's tree, read from /proc/<pid>/stat) over the load window /
   tokens the clients received. Below each figure: the engine's steps and mean rows a step
   (from /metrics), the tokens per SSE event, and each busy thread's CPU per token (from
   /proc/<pid>/task/<tid>/stat); ``--profile FILE`` adds a cProfile of the event loop (and
   one of a process core's loop, in FILE with the suffix ``.core``).
   ``--step-ms MS`` makes each stand-in step sleep that long (no CPU): with the real model's
   tens of ms a step every client keeps up, so each token is its own SSE event, the regime of
   ``bench/serve.py`` at 256 streams, with the model's CPU taken out.
It prints both trees' figures and the ratio new / baseline (the target is at most 1/3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TOKEN = 262  # " the" in GPT-2's BPE: the stand-in's argmax, never eos
PROMPT = "The quick brown fox jumps over the lazy dog"
THREAD_NAMES = "/tmp/hostcost-threads-{pid}.json"
STEP_MS = "GPTSERVE_BENCH_STEP_MS"  # --step-ms, handed to the workers (and the core) by env


# ---- the stand-in engine (runs inside a worker process, importing the tree under test) --------

def stand_in_checkpoint():
    """A ``Checkpoint`` over a GPT-2-vocabulary model whose forward returns fixed logits (the
    engine-core process builds its model with this: ``CoreSpec.model_factory``)."""
    import torch

    from model.checkpoint.common import Checkpoint
    from model.config import GPTConfig
    from model.gpt import GPT
    from model.tokenizer import TiktokenTokenizer

    class StandIn(GPT):
        """Fixed logits (argmax ``TOKEN``) for every row asked for: a forward that costs ~0."""

        def __init__(self, config: GPTConfig) -> None:
            super().__init__(config)
            self._fixed = torch.zeros(1, config.vocab_size)
            self._fixed[0, TOKEN] = 1.0
            self._views: dict[int, torch.Tensor] = {}  # row count -> the first rows of _fixed

            self._sleep = float(os.environ.get(STEP_MS, "0")) / 1000

        def forward_packed(self, batch, kv_cache):
            if self._sleep:  # a paced step: the model's time without its CPU (--step-ms)
                time.sleep(self._sleep)
            # the row count from shapes and the logits a view made once per count: a tensor's
            # len() and a slice per step cost ~3 us here, as much as the engine's own step work
            rows = (batch.tokens if batch.logit_rows is None else batch.logit_rows).shape[0]
            logits = self._views.get(rows)
            if logits is None:
                if self._fixed.shape[0] < rows:  # contiguous rows: an argmax over a stride-0
                    self._views.clear()  # view is slow
                    self._fixed = self._fixed[:1].expand(rows, -1).contiguous()
                logits = self._views[rows] = self._fixed[:rows]
            return logits

        def prepack_cpu_weights(self, on: bool = True, rows=(False, True)) -> bool:
            return False

    # one intra-op thread: the stand-in's only kernel (the argmax) is tiny, and on a busy small
    # box OpenMP's idle threads cost more than it (bench only; the server's threads are not ours)
    torch.set_num_threads(1)
    tokenizer = TiktokenTokenizer.by_name("gpt2")
    # the model's vocabulary is GPT-2's first 512 ids (bytes and the commonest merges): the
    # sampler's argmax over it costs ~0, as it would on a GPU; the tokenizer is GPT-2's whole
    config = GPTConfig(block_size=256, vocab_size=512, n_layer=1, n_head=1, n_embd=8)
    return Checkpoint(StandIn(config), tokenizer, config, "gptserve",
                      HERE / "weights" / "shakespeare-char")


def stand_in_config(slots: int, max_queue: int = 256):
    from service.engine.config import EngineConfig

    fields = EngineConfig.__dataclass_fields__  # one intra-op thread where the tree has the knob
    threads = {"threads": 1} if "threads" in fields else {}
    return EngineConfig(max_batch_size=slots, max_queue=max_queue, device="cpu",
                        dtype="float32", max_request_sequences=64, **threads)


def stand_in_engine(slots: int, core: str = "thread", core_profile: Path | None = None):
    """An unstarted engine serving the stand-in: on a thread of this process (``Engine``) or in
    an engine-core process (``CoreClient``, which builds the model from ``model_factory``;
    ``core_profile``: where that core writes a cProfile of its loop)."""
    if core == "process":
        from service.engine.client import CoreClient

        profile = {} if core_profile is None else {"profile": str(core_profile)}
        return CoreClient(stand_in_checkpoint(), stand_in_config(slots), log_level="warning",
                          model_factory="bench.hostcost:stand_in_checkpoint", **profile)
    from service.engine import Engine

    return Engine(stand_in_checkpoint(), stand_in_config(slots))


def worker_engine(streams: int, max_tokens: int) -> dict:
    """In-process: ``streams`` requests served together by ``Engine.run``; CPU s per token."""
    from service.engine.types import Request, SamplingParams

    engine = stand_in_engine(streams)
    prompt = tuple(engine.tokenizer.encode(PROMPT))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    list(engine.iterate([Request("warm", prompt, SamplingParams(max_tokens=4, temperature=0.0))]))
    rounds = max(1, 64 // streams)  # at least 8,192 tokens at every width
    tokens, cpu, wall = 0, 0.0, 0.0
    steps = getattr(engine, "steps", None)  # this tree: each step's events as columns
    for r in range(rounds):
        requests = [Request(f"r{r}-{i}", prompt, params) for i in range(streams)]
        c0, w0 = time.process_time(), time.perf_counter()
        if steps is not None:
            tokens += sum(events.num_tokens for events in steps(requests))
        else:  # the baseline: one RequestOutput per token, made by the step itself
            tokens += sum(out.token_id is not None for out in engine.iterate(requests))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
    return {"streams": streams, "tokens": tokens, "cpu_s": cpu, "wall_s": wall}


def worker_server(port: int, slots: int, core: str, profile: Path | None = None) -> None:
    """The production server (``service.server.serve``) over the stand-in engine, its core on
    a thread or in a process of its own (``core``). SIGUSR1 writes its threads' names by native
    id to ``THREAD_NAMES`` (read by ``_thread_report``; the core's threads are named by pid).
    ``profile``: cProfile the main thread (the event loop) in its own CPU time
    (``time.thread_time``: other threads and processes, and waiting for a CPU, do not count)
    and write the stats there on exit; a process core writes its own beside it (suffix
    ``.core``)."""
    import threading

    from service.logs import configure_logging
    from service.server import serve
    from service.settings import Settings
    from service.transport.sockets import bind

    settings = Settings.create(port=port, max_batch_size=slots, max_queue=256, device="cpu",
                               dtype="float32", log_level="warning",
                               checkpoint=HERE / "weights" / "shakespeare-char")
    configure_logging(settings.log_level, settings.log_format)
    sockets = bind(settings.host, settings.port)

    def name_threads(_sig, _frame) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        Path(THREAD_NAMES.format(pid=os.getpid())).write_text(json.dumps(names))

    signal.signal(signal.SIGUSR1, name_threads)
    if hasattr(settings, "transport"):
        limits = settings.transport
    else:  # a baseline tree from before Settings.transport
        from service.transport.limits import TransportLimits

        limits = TransportLimits.from_settings(settings)
    engine = stand_in_engine(slots, core, None if profile is None else profile.with_suffix(".core"))
    if profile is None:
        sys.exit(serve(settings, sockets, limits, engine=engine))
    import cProfile

    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        status = serve(settings, sockets, limits, engine=engine)
    finally:
        profiler.disable()
        profiler.dump_stats(profile)
    sys.exit(status)


# ---- the load generator (raw sockets: the client must never be the limit) --------------------

async def _one_request(port: int, body: bytes) -> tuple[int, int]:
    """One streamed request: the tokens it got (its usage) and the SSE events that carried
    them (one per token when the client keeps up; fewer when the server merged a backlog)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    data = await reader.read()  # Connection: close: the server closes after the stream
    writer.close()
    tail = data[data.rfind(b'"completion_tokens":') + 20:]
    if not data.startswith(b"HTTP/1.1 200") or b"[DONE]" not in data:
        raise RuntimeError(f"bad response: {data[:200]!r}")
    # every event but the usage chunk and [DONE] carried text (the stand-in's " the" tokens)
    return int(tail[: tail.index(b",")]), data.count(b"data: ") - 2


async def _client(port: int, streams: int, requests: int, max_tokens: int
                  ) -> tuple[int, int]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    left = [requests]

    async def stream() -> tuple[int, int]:
        tokens = events = 0
        while left[0] > 0:
            left[0] -= 1
            got = await _one_request(port, body)
            tokens, events = tokens + got[0], events + got[1]
        return tokens, events

    counts = await asyncio.gather(*(stream() for _ in range(streams)))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def worker_client(port: int, streams: int, requests: int, max_tokens: int) -> None:
    tokens, events = asyncio.run(_client(port, streams, requests, max_tokens))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tokens": tokens, "events": events,
                      "cpu_s": usage.ru_utime + usage.ru_stime}))


# ---- the driver ------------------------------------------------------------------------------

def _process_stats() -> dict[int, list[str]]:
    """Every live process's /proc/<pid>/stat fields after the name (the parent pid is [1])."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            stats[int(entry)] = text[text.rindex(")") + 2:].split()
    return stats


def _tree(root: int, stats: dict[int, list[str]]) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live process below it, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = _process_stats()
    # utime, stime: fields 14 and 15 of stat (11, 12 after the name)
    return sum((int(stats[pid][11]) + int(stats[pid][12])) / tick
               for pid in _tree(root, stats) if pid in stats)


def tree_threads(root: int) -> dict[tuple[int, int], tuple[str, int]]:
    """Every thread of ``root``'s process tree: (pid, tid) -> (its comm, its CPU ticks)."""
    pids = _tree(root, _process_stats())
    threads = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            name = text[text.index("(") + 1:text.rindex(")")]
            threads[pid, int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return threads


def _thread_report(server: subprocess.Popen, before: dict, after: dict, tokens: int) -> None:
    """Print each busy thread's CPU per streamed token, by process: the front end (the server
    worker; thread names from its SIGUSR1 dump), its engine-core process (``main`` steps)."""
    names: dict[str, str] = {}
    path = Path(THREAD_NAMES.format(pid=server.pid))
    server.send_signal(signal.SIGUSR1)
    for _ in range(50):
        if path.exists():
            try:
                names = json.loads(path.read_text())
                break
            except ValueError:  # being written
                pass
        time.sleep(0.1)
    path.unlink(missing_ok=True)
    tick = os.sysconf("SC_CLK_TCK")
    rows = []
    for (pid, tid), (comm, ticks) in after.items():
        used = ticks - before.get((pid, tid), (comm, 0))[1]
        if used <= 0:
            continue
        process = "front end" if pid == server.pid else f"core {pid}"
        name = "main" if tid == pid else names.get(str(tid), comm) if pid == server.pid else comm
        rows.append((process, name, tid, used / tick / tokens * 1e6))
    for process, name, tid, us in sorted(rows, key=lambda r: (r[0], -r[3])):
        print(f"      {process:>12}  {name:>22} (tid {tid:7d})  {us:7.1f} us/token", flush=True)


def _run_worker(tree: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--tree", str(tree),
                             *args], env=env, cwd=tree, stdout=subprocess.PIPE, text=True)


def engine_figures(tree: Path, streams: list[int], max_tokens: int) -> dict[int, float]:
    out = {}
    for s in streams:
        proc = _run_worker(tree, "--worker", "engine", "--n", str(s), "--max-tokens",
                           str(max_tokens))
        result = json.loads(proc.communicate()[0].strip().splitlines()[-1])
        out[s] = result["cpu_s"] / result["tokens"]
        print(f"  {tree.name:>24}  engine  {s:5d} streams  {out[s] * 1e6:8.1f} us/token "
              f"({result['tokens']} tokens, {result['wall_s']:.2f} s wall)", flush=True)
    return out


def _best(runs: list):
    """The lowest figure of repeated runs (a shared machine only ever adds time)."""
    if isinstance(runs[0], dict):
        return {k: min(run[k] for run in runs) for k in runs[0]}
    return min(runs)


def server_figure(tree: Path, core: str, port: int, streams: int, clients: int, requests: int,
                  max_tokens: int, profile: Path | None = None) -> float:
    server = _run_worker(tree, "--worker", "server", "--port", str(port), "--n", str(streams),
                         "--core", core, *(["--profile", str(profile)] if profile else []))
    try:
        _wait_ready(port, server)
        warm = _run_worker(tree, "--worker", "client", "--port", str(port), "--n", "4",
                           "--requests", "8", "--max-tokens", "8")
        warm.communicate()
        cpu0, threads0 = tree_cpu(server.pid), tree_threads(server.pid)
        steps0, start = _steps(port), time.perf_counter()
        per = streams // clients
        procs = [_run_worker(tree, "--worker", "client", "--port", str(port), "--n", str(per),
                             "--requests", str(requests // clients), "--max-tokens",
                             str(max_tokens)) for _ in range(clients)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        cpu, threads = tree_cpu(server.pid) - cpu0, tree_threads(server.pid)
        wall = time.perf_counter() - start
        steps = [b - a for a, b in zip(steps0, _steps(port), strict=True)]
        tokens = sum(r["tokens"] for r in results)
        events = sum(r["events"] for r in results)
        client_cpu = ", ".join(f"{r['cpu_s']:.1f}" for r in results)
        print(f"  {tree.name:>24}  server ({core:>7} core)  {streams:5d} streams  "
              f"{cpu / tokens * 1e6:8.1f} us/token ({tokens} tokens in {wall:.1f} s, server "
              f"{cpu:.1f} CPU s; load processes {client_cpu} CPU s; {steps[0]:.0f} engine steps "
              f"of {steps[1] / max(steps[0], 1):.1f} rows on average; {tokens / events:.2f} "
              "tokens per SSE event)", flush=True)
        _thread_report(server, threads0, threads, tokens)
    finally:
        server.terminate()
        server.wait(60)
    if profile is not None:
        import pstats

        print(f"      the event loop's CPU by function (cProfile, thread time, its overhead "
              f"included; whole run, warm-up too; stats in {profile}):")
        pstats.Stats(str(profile), stream=sys.stdout).sort_stats("tottime").print_stats(30)
        if core == "process":
            print("      the engine core's loop by function (cProfile, thread time; stats in "
                  f"{profile.with_suffix('.core')}):")
            pstats.Stats(str(profile.with_suffix(".core")), stream=sys.stdout).sort_stats(
                "tottime").print_stats(30)
    return cpu / tokens


def _steps(port: int) -> tuple[float, float]:
    """The engine steps taken so far and the rows they ran (``gptserve_batch_size``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    found = {}
    for line in data.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("gptserve_batch_size_count", "gptserve_batch_size_sum"):
            found[name] = float(value)
    return found["gptserve_batch_size_count"], found["gptserve_batch_size_sum"]


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not get ready")


def baseline_tree(commit: str) -> Path:
    """A detached worktree of ``commit`` in /tmp (made once, reused)."""
    path = Path(f"/tmp/gptserve-{commit}")
    if not path.exists():
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(path), commit],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-commit", default="1446e4f")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--http-streams", type=int, default=256)
    parser.add_argument("--http-requests", type=int, default=512)
    parser.add_argument("--clients", type=int, default=4, help="load generator processes")
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--cores", nargs="+", choices=("thread", "process"),
                        default=["thread", "process"],
                        help="this tree's server engine cores")
    parser.add_argument("--baseline-core", choices=("thread", "process"), default="thread",
                        help="the baseline's server engine core (1446e4f has only a thread)")
    parser.add_argument("--profile", type=Path,
                        help="cProfile the server's event loop; stats to this file (the "
                             "profiler's overhead inflates that run's figure)")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--only-new", action="store_true", help="skip the baseline tree")
    parser.add_argument("--repeat", type=int, default=1, help="keep the best of this many runs")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="each stand-in step sleeps this long (0: steps cost ~0 CPU and "
                             "time; 40: one token per SSE event, like the shipped model)")
    # worker mode (internal)
    parser.add_argument("--worker", choices=("engine", "server", "client"))
    parser.add_argument("--tree", type=Path)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--core", choices=("thread", "process"), default="thread")
    args = parser.parse_args(argv)
    if args.worker == "engine":
        print(json.dumps(worker_engine(args.n, args.max_tokens)))
        return
    if args.worker == "server":
        worker_server(args.port, args.n, args.core, args.profile)
        return
    if args.worker == "client":
        worker_client(args.port, args.n, args.requests, args.max_tokens)
        return
    os.environ[STEP_MS] = str(args.step_ms)  # the workers and their engine cores inherit it
    trees = [baseline_tree(args.baseline_commit), HERE]
    if args.only_new:
        trees = [HERE, HERE]
    # the baseline's server, then this tree's with each core asked for
    servers = list(dict.fromkeys([(trees[0], args.baseline_core)]
                                 + [(HERE, core) for core in args.cores]))
    runs: dict[Path, list] = {tree: [] for tree in trees}
    server_runs: dict[tuple[Path, str], list] = {server: [] for server in servers}
    for _ in range(args.repeat):  # the trees alternate, so a burst of load hits both alike
        for tree in trees:
            if not args.skip_engine:
                runs[tree].append(engine_figures(tree, args.streams, args.max_tokens))
        for tree, core in servers if not args.skip_server else []:
            server_runs[tree, core].append(server_figure(
                tree, core, args.port, args.http_streams, args.clients, args.http_requests,
                args.max_tokens, args.profile))
    engine = {tree: _best(r) for tree, r in runs.items() if r}
    server = {key: _best(r) for key, r in server_runs.items() if r}
    old, new = trees
    print(f"\nhost cost, {new.name} vs {old.name}, best of {args.repeat} "
          "(new / old; target <= 0.33)")
    for s in args.streams if engine else []:
        print(f"  engine in-process, {s:5d} streams: {engine[old][s] * 1e6:8.1f} -> "
              f"{engine[new][s] * 1e6:8.1f} us/token  ({engine[new][s] / engine[old][s]:.2f}x)")
    base = server.get(servers[0])
    for (_tree, core), figure in list(server.items())[1:]:
        print(f"  server over HTTP, {args.http_streams:5d} streams, {args.baseline_core:>7} -> "
              f"{core:>7} core: {base * 1e6:8.1f} -> {figure * 1e6:8.1f} us/token  "
              f"({figure / base:.2f}x)")


if __name__ == "__main__":
    main()
